"""One table-driven layer core for every framework's glue.

A framework's glue describes its layer classes once, in a ``LayerTable``:
which are convolutions (and how to read their geometry), which are dense maps
of the last axis, which are general contractions (and how to read their axes),
and which have a kernel TrAct cannot precondition (and why). From that table
``layer_input_stats`` computes the statistic of one call's input (after
the checks every framework shares: a kernel used linearly, the input as the
product sees it), and ``Recorder`` keeps what one captured forward pass
saw. The Linen and NNX glue each hold one table; nothing else differs between
them here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax

from tract_optax._src import capture as _capture
from tract_optax._src import stats as stats_lib
from tract_optax._src.paths import ModulePath
from tract_optax._src.stats import TractStats

#: ``reader(layer) -> (axis, num_out_axes, batch_axes)`` of a general contraction.
GeneralReader = Callable[[Any], Optional[Tuple[Any, int, Tuple[int, ...]]]]
#: ``reader(layer, path, type_name) -> conv_stats settings`` of a convolution.
ConvReader = Callable[[Any, ModulePath, str], Dict[str, Any]]


#: Why a transposed convolution or a general einsum is rejected.
NOT_ROWS = 'its kernel does not map input rows to output rows.'


@dataclasses.dataclass(frozen=True)
class LayerTable:
  """How one framework's layer classes map onto TrAct's statistic.

  Attributes:
    prefix: the framework's module name in messages (``'nn'``, ``'nnx'``).
    conv: ``(class, reader)`` pairs of convolutions; the reader gives
      ``tract_optax.conv_stats``' geometry from the layer.
    dense: classes with an ``(n_in, n_out)`` kernel on the input's last axis.
    general: ``(class, reader)`` pairs of general contractions
      (``DenseGeneral``, ``Einsum``); the reader gives ``(axis, num_out_axes,
      batch_axes)``, or None for a layer that is no map of rows.
    rejected: ``(class, reason)`` pairs of layers with a kernel TrAct does
      not precondition; recognised for selection and named in refusals.
    kind: how the layers are called in messages (``'Dense or Conv'``).
  """

  prefix: str
  conv: Tuple[Tuple[type, ConvReader], ...]
  dense: Tuple[type, ...]
  general: Tuple[Tuple[type, GeneralReader], ...]
  rejected: Tuple[Tuple[type, str], ...]
  kind: str = 'Dense or Conv'

  @property
  def supported(self) -> Tuple[type, ...]:
    """The classes whose input statistic the table computes."""
    return tuple(c for c, _ in self.conv) + self.dense + tuple(c for c, _ in self.general)

  @property
  def kernel_layers(self) -> Tuple[type, ...]:
    """Every class with a kernel: supported or rejected."""
    return self.supported + tuple(c for c, _ in self.rejected)

  def type_name(self, layer: Any) -> str:
    """``'nn.Conv'``-style name of ``layer``'s class, for messages."""
    return f'{self.prefix}.{type(layer).__name__}'


def einsum_row_axes(equation: str) -> Optional[Tuple[int, ...]]:
  """The input axes an einsum contracts with its kernel, if it maps rows to rows.

  ``'bi,io->bo'`` (or ``'...i,io->...o'``, ``'btij,ijo->bto'``) is a Dense layer on
  the contracted axes: the kernel holds the contracted letters, in the input's
  order, then one output letter, and every other input letter is a row axis
  that reaches the output. Anything else (a kernel with a batch letter, an
  input axis summed away, the output letter first) is no map of rows.

  Returns:
    The contracted axes' positions in the input (negative after ``...``), or None.

  Example:
    >>> einsum_row_axes('bti,io->bto'), einsum_row_axes('...ij,ijo->...o')
    ((2,), (-2, -1))
    >>> einsum_row_axes('bi,oi->bo') is None  # output letter first
    True
  """
  text = equation.replace(' ', '')
  if '->' not in text or text.count(',') != 1:
    return None
  operands, out = text.split('->')
  lhs, rhs = operands.split(',')
  if '...' in rhs:
    return None
  head, _, tail = lhs.partition('...') if '...' in lhs else ('', '', lhs)
  letters = head + tail
  if len(set(letters)) != len(letters) or len(set(rhs)) != len(rhs):
    return None
  contracted = [c for c in letters if c in rhs and c not in out]
  outputs = [c for c in rhs if c not in letters]
  rows_reach_output = all(c in out for c in letters if c not in rhs)
  if list(rhs) != contracted + outputs or len(outputs) != 1 or not rows_reach_output:
    return None
  if not contracted or outputs[0] not in out:
    return None

  def position(letter: str) -> int:
    if letter in head:
      return head.index(letter)
    return tail.index(letter) - len(tail) if '...' in lhs else tail.index(letter)

  return tuple(position(letter) for letter in contracted)


def _entry(pairs: Sequence[Tuple[type, Any]], layer: Any) -> Optional[Any]:
  return next((value for cls, value in pairs if isinstance(layer, cls)), None)


def layer_input_stats(
  table: LayerTable,
  layer: Any,
  x: jax.Array,
  *,
  path: ModulePath = (),
  precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
  max_chunk_bytes: Optional[int],
) -> TractStats:
  """Statistic of input ``x`` of ``layer``, read through its framework's ``table``.

  Args:
    table: the framework's ``LayerTable``.
    layer: the layer (its settings are read; it is not called).
    x: the input it is (or would be) called with; gradients are stopped.
    path: the layer's module path, for messages.
    precision: matmul precision of the moment.
    max_chunk_bytes: patch bytes materialised at once (convolutions).

  Returns:
    The ``TractStats`` that fits the layer's kernel.

  Raises:
    ValueError: the layer is rejected or unknown to the table, may not use
      its kernel linearly (``tract_optax.mark_linear_kernel``), or has
      settings TrAct does not support.
  """
  type_name = table.type_name(layer)
  if not isinstance(layer, table.supported):
    reason = _entry(table.rejected, layer) or f'it is not a {table.kind} layer.'
    raise _capture.unsupported_layer(path, type_name, reason)
  _capture.check_linear_kernel(path, type_name, layer, table.supported)
  x = _capture.multiplied_input(x, layer)  # what the product sees (dtype=...)
  conv_reader = _entry(table.conv, layer)
  if conv_reader is not None:
    settings = conv_reader(layer, path, type_name)
    return _capture.conv_stats_from_settings(
      x, settings, precision=precision, max_chunk_bytes=max_chunk_bytes
    )
  general_reader = _entry(table.general, layer)
  if general_reader is None:  # a dense layer
    return stats_lib.dense_stats(_capture.as_float(x), precision=precision)
  found = general_reader(layer)
  if found is None:  # an einsum that is no map of rows
    raise _capture.unsupported_layer(path, type_name, NOT_ROWS)
  axis, num_out_axes, batch_axes = found
  return _capture.general_layer_stats(
    path,
    type_name,
    x,
    axis=axis,
    num_out_axes=num_out_axes,
    batch_axes=batch_axes,
    precision=precision,
  )


class EnoughCalls(BaseException):
  """Ends a statistics pass once every selected layer has been recorded (internal).

  A ``BaseException``, as is ``MoreCalls``: a model's own ``except
  Exception`` must not swallow it and go on another way.
  """


class MoreCalls(BaseException):
  """A pass called a selected layer more often than its statistic saw (internal)."""


class CallLimit:
  """Counts the calls of some layers; ``MoreCalls`` past ``limits[path]``."""

  def __init__(self, limits: Dict[ModulePath, int]):
    self.limits = limits
    self.calls: Dict[ModulePath, int] = {}

  def count(self, path: ModulePath) -> None:
    """Counts one call of ``path`` (if limited)."""
    if path in self.limits:
      self.calls[path] = self.calls.get(path, 0) + 1
      if self.calls[path] > self.limits[path]:
        raise MoreCalls()


class Recorder:
  """What one captured forward pass saw (Python-side, static only).

  The framework's recorder (an interceptor for Linen, hooked classes for
  NNX) calls ``saw_call`` for every layer call, ``stats`` and
  ``recorded_call`` for the selected ones, and ``combined`` on the
  statistics that came out of the pass.

  With ``stop_early``, ``keep`` ends the pass (``EnoughCalls``) as
  soon as every selected layer has been called once outside the framework's
  transforms, their statistics kept here (``direct``); the caller then checks
  (``CallLimit``) that the rest of the model calls those layers no more.

  Attributes:
    table: the framework's ``LayerTable``.
    selected: the paths of the layers to record.
    take_first: select the first layer with a kernel called (``selected``
      empty): the provisional choice of ``first_layer.choose_in_pass``.
    called: every kernel layer called, in first-call order.
    recorded: the selected layers whose statistic was taken.
    kernel_shapes: each recorded layer's kernel shape as seen inside the pass
      (per iteration inside ``scan``/``vmap``).
    ended_early: whether the pass ended at ``EnoughCalls``.
  """

  def __init__(
    self,
    table: LayerTable,
    selected: Sequence[ModulePath],
    precision: stats_lib.PrecisionLike,
    max_chunk_bytes: Optional[int],
    stop_early: bool = False,
    take_first: bool = False,
  ):
    self.table = table
    self.selected: List[ModulePath] = list(selected)
    self.take_first = take_first
    self.precision = precision
    self.max_chunk_bytes = max_chunk_bytes
    self.called: List[ModulePath] = []
    self.recorded: List[ModulePath] = []
    self.kernel_shapes: Dict[ModulePath, Tuple[int, ...]] = {}
    self.stop_early = stop_early
    self.ended_early = False
    self.direct: Dict[ModulePath, List[TractStats]] = {}

  def keep(self, path: ModulePath, stats: TractStats, transformed: bool) -> None:
    """With ``stop_early``: keeps the statistic of a call outside transforms and
    ends the pass once every selected layer has one; a call inside a transform
    (its statistic must leave the transform) turns stopping off."""
    if not self.stop_early:
      return
    if transformed:
      self.stop_early, self.direct = False, {}
      return
    self.direct.setdefault(path, []).append(stats)
    if all(selected in self.direct for selected in self.selected):
      self.ended_early = True
      raise EnoughCalls()

  def collect_direct(self) -> Dict[ModulePath, TractStats]:
    """``{path: TractStats}`` of a pass that ended early."""
    return {
      path: self.combined(path, calls, self.kernel_shapes.get(path))
      for path, calls in self.direct.items()
    }

  def limits(self) -> Dict[ModulePath, int]:
    """The calls each layer had in a pass that ended early (for ``CallLimit``)."""
    return {path: len(calls) for path, calls in self.direct.items()}

  def saw_call(self, layer: Any, path: ModulePath) -> None:
    """Notes a call of ``layer`` (kept if it has a kernel); with ``take_first``,
    the first layer with a kernel becomes the selection."""
    if isinstance(layer, self.table.kernel_layers) and path not in self.called:
      self.called.append(path)
      if self.take_first and not self.selected:
        self.selected = [path]

  def stats(
    self,
    layer: Any,
    path: ModulePath,
    inputs: jax.Array,
    args: Tuple[Any, ...] = (),
    kwargs: Optional[Dict[str, Any]] = None,
  ) -> TractStats:
    """The statistic of one call of a selected layer (``args``, ``kwargs``: the call's)."""
    given = (kwargs or {}).get('einsum_str') or (args[1:2] and isinstance(args[1], str))
    if given:  # an Einsum's equation is read off the layer, not the call
      raise _capture.unsupported_layer(
        path,
        self.table.type_name(layer),
        'an einsum_str given at call time is not read: set it on the layer.',
      )
    return layer_input_stats(
      self.table,
      layer,
      inputs,
      path=path,
      precision=self.precision,
      max_chunk_bytes=self.max_chunk_bytes,
    )

  def recorded_call(self, path: ModulePath, kernel_shape: Optional[Tuple[int, ...]]) -> None:
    """Notes that the statistic of a call of ``path`` was stored."""
    if kernel_shape is not None:
      self.kernel_shapes[path] = kernel_shape
    if path not in self.recorded:
      self.recorded.append(path)

  def check_selection(self) -> None:
    """Raises if a selected layer was never called."""
    _capture.check_selection(self.selected, self.recorded, self.called)

  def combined(
    self, path: ModulePath, calls: Sequence[TractStats], outer_shape: Optional[Tuple[int, ...]]
  ) -> TractStats:
    """One statistic of all ``calls`` of ``path`` (lifted axes merged)."""
    return _capture.combine_calls(
      path, calls, outer_shape, self.kernel_shapes.get(path), self.precision
    )
