"""Flax NNX glue: first-layer input statistics captured in the forward pass.

NNX has no method interceptor. For the duration of one forward pass, each
``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv`` of the model (and each
named layer) is given a thin subclass whose ``__call__`` computes the TrAct
statistic of its input (never keeping the input) and ``sow``s it as a
:class:`TractInputStats` variable; the original classes are restored before
the pass returns. The subclass is part of the module's type, so it survives the
copies NNX transforms make (``nnx.remat`` and friends), and the sown variable
leaves those transforms as module state does.

The statistics are collected with ``nnx.capture`` where Flax has it (0.12.6
and later), otherwise (or when an outer ``nnx.capture`` is active) they are
set as attributes and taken off again with ``nnx.pop``. Either way the
model's state and graph are the same before and after.

Module paths in the result are those of the kernels in ``nnx.state(model)``
and in gradients, e.g. ``('stem',)`` or ``('backbone', 'layers', 0)``.

Inside ``nnx.vmap`` / ``nnx.scan`` the sown statistics need their own axis:
pass the module with ``in_axes=nnx.StateAxes({TractInputStats: 0, ...: None})``.
A layer whose kernel is shared across the transform then gets the exact
statistic of all its rows; one with a kernel per iteration is rejected, since
``tract`` treats a kernel as one ``(n, m)`` matrix.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
from flax import nnx

from tract_optax import _capture
from tract_optax import conv as conv_lib
from tract_optax import paths as paths_lib
from tract_optax import stats as stats_lib
from tract_optax.stats import TractStats

Path = Tuple[Any, ...]

_SOW_NAME = 'tract_input_stats'

#: Whether to collect with ``nnx.capture``; ``False`` uses attributes and
#: ``nnx.pop`` (the route for Flax before 0.12.6). Tests switch it off.
USE_CAPTURE = hasattr(nnx, 'capture')

#: Layers whose input statistic this module computes.
SUPPORTED_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv)
#: Layers with a kernel that are recognised (for auto-selection and errors) but
#: rejected: their kernel is not a single ``(n, m)`` map of input rows.
_KERNEL_LAYERS = SUPPORTED_LAYERS + (nnx.ConvTranspose, nnx.Einsum)


_TRANSFORM_HINT = (
    'An NNX transform (nnx.vmap, nnx.scan, ...) around a layer must give the '
    'TractInputStats variables it sows their own axis, e.g. in_axes=(nnx.StateAxes('
    '{tract_optax.nnx.TractInputStats: 0, ...: None}), ...) for the module.')


class TractInputStats(nnx.Intermediate):
  """Variable type of statistics sown during a captured forward pass.

  Only exists while :func:`capture_stats` runs; never left on a model.
  """


def _get(variable):
  if hasattr(variable, 'get_value'):
    return variable.get_value()
  return variable.value


def _set(variable, value) -> None:
  if hasattr(variable, 'set_value'):
    variable.set_value(value)
  else:
    variable.value = value


def _iter_modules(model):
  if hasattr(nnx, 'iter_modules'):
    return nnx.iter_modules(model)
  return model.iter_modules()


def layer_input_stats(layer: nnx.Module, x: jax.Array, *, path: Path = (),
                      precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
                      max_chunk_bytes: Optional[int] = conv_lib.DEFAULT_MAX_CHUNK_BYTES
                      ) -> TractStats:
  """Statistic of input ``x`` of an NNX layer, with the layer's own settings.

  Args:
    layer: an ``nnx.Linear``, ``nnx.LinearGeneral`` or ``nnx.Conv``.
    x: the input the layer is (or would be) called with; gradients are stopped.
    path: the layer's path, for error messages.
    precision: matmul precision of the moment.
    max_chunk_bytes: patch bytes materialised at once (convolutions).

  Returns:
    The :class:`~tract_optax.TractStats` that fits the layer's kernel.

  Raises:
    ValueError: for layers or settings TrAct does not support
      (``nnx.ConvTranspose``, ``nnx.Einsum``, ``input_dilation``, ``mask``,
      LinearGeneral with several output axes or batch axes).

  Example:
    >>> from flax import nnx
    >>> make = lambda: nnx.Conv(3, 8, (3, 3), strides=2, rngs=nnx.Rngs(0))
    >>> conv = nnx.eval_shape(make)  # only the settings matter
    >>> s = layer_input_stats(conv, jnp.ones((2, 8, 8, 3)))
    >>> s.moment.shape, float(s.count)
    ((27, 27), 32.0)
  """
  type_name = f'nnx.{type(layer).__name__}'
  if isinstance(layer, nnx.Conv):
    return _capture.conv_layer_stats(path, type_name, x, layer, precision=precision,
                                      max_chunk_bytes=max_chunk_bytes)
  if isinstance(layer, nnx.Linear):
    return stats_lib.dense_stats(_capture.as_float(x), precision=precision)
  if isinstance(layer, nnx.LinearGeneral):
    return _capture.general_layer_stats(
        path, type_name, x, axis=layer.axis,
        num_out_axes=len(tuple(layer.out_features)),
        batch_axes=tuple(layer.batch_axis), precision=precision)
  if isinstance(layer, _KERNEL_LAYERS):
    reason = 'its kernel does not map input rows to output rows.'
  else:
    reason = 'it is not a Linear or Conv layer.'
  raise _capture.unsupported_layer(path, type_name, reason)


_active = threading.local()


def _active_recorder() -> Optional['_Recorder']:
  stack = getattr(_active, 'stack', None)
  return stack[-1] if stack else None


@functools.lru_cache(maxsize=None)
def _hooked_class(cls: type, path: Path) -> type:
  """A subclass of ``cls`` whose ``__call__`` reports to the active recorder."""

  def __call__(self, *args, **kwargs):
    recorder = _active_recorder()
    if recorder is not None:
      recorder.observe(self, path, args, kwargs)
    return cls.__call__(self, *args, **kwargs)

  namespace = {'__call__': __call__, '__module__': cls.__module__,
               '__qualname__': cls.__qualname__, '_tract_original_class': cls}
  return type(cls.__name__, (cls,), namespace)


def _store(module: nnx.Module, stats: TractStats) -> None:
  """Sows ``stats`` (into ``nnx.capture``) or appends to the attribute."""
  if hasattr(module, '__captures__') and module.sow(TractInputStats, _SOW_NAME, stats):
    return
  current = getattr(module, _SOW_NAME, None)
  if current is None:
    setattr(module, _SOW_NAME, TractInputStats((stats,)))
  else:
    _set(current, tuple(_get(current)) + (stats,))


class _Recorder:
  """Which layers to watch, and what happened in one forward pass."""

  def __init__(self, model: nnx.Module, selected, precision, max_chunk_bytes):
    self.precision = precision
    self.max_chunk_bytes = max_chunk_bytes
    self.modules: Dict[Path, nnx.Module] = {}
    kernel_paths = []
    for path, module in _iter_modules(model):
      if isinstance(module, _KERNEL_LAYERS):
        self.modules[path] = module
        kernel_paths.append(path)
    self.selected: Optional[List[Path]] = None
    if selected is not None:
      by_name = {paths_lib.normalize_path(p): (p, m) for p, m in _iter_modules(model)}
      self.selected = []
      for name in selected:
        if name not in by_name:
          raise ValueError(
              f'The model has no submodule at path {paths_lib.format_path(name)!r}. '
              f'Its Conv/Linear layers: {_capture.format_paths(kernel_paths)}.')
        path, module = by_name[name]
        self.selected.append(path)
        self.modules[path] = module
    self.auto_path: Optional[Path] = None
    self.called: List[Path] = []
    self.recorded: List[Path] = []
    self.kernel_shapes: Dict[Path, Tuple[int, ...]] = {}

  def observe(self, module, path, args, kwargs) -> None:
    if isinstance(module, _KERNEL_LAYERS) and path not in self.called:
      self.called.append(path)
    if self.selected is not None:
      if path not in self.selected:
        return
    elif self.auto_path is None:
      self.auto_path = path
    elif path != self.auto_path:
      return
    inputs = _capture.call_input(path, args, kwargs)
    stats = layer_input_stats(module, inputs, path=path, precision=self.precision,
                              max_chunk_bytes=self.max_chunk_bytes)
    _store(module, stats)
    kernel = getattr(module, 'kernel', None)
    if kernel is not None:
      self.kernel_shapes[path] = tuple(_get(kernel).shape)
    if path not in self.recorded:
      self.recorded.append(path)

  def hook(self) -> None:
    for path, module in self.modules.items():
      if hasattr(type(module), '_tract_original_class'):
        raise RuntimeError(
            'tract_optax.nnx.capture_stats is already active on the layer '
            f'{paths_lib.format_path(paths_lib.normalize_path(path))!r}; '
            'captures of the same model cannot be nested.')
    for path, module in self.modules.items():
      object.__setattr__(module, '__class__', _hooked_class(type(module), path))

  def unhook(self) -> None:
    for module in self.modules.values():
      original = getattr(type(module), '_tract_original_class', None)
      if original is not None:
        object.__setattr__(module, '__class__', original)

  def annotate(self, error: Exception) -> None:
    """Adds a hint to an error raised after statistics were sown."""
    if self.recorded and hasattr(error, 'add_note'):
      error.add_note(
          f'tract_optax.nnx sowed statistics in layer(s) '
          f'{_capture.format_paths(self.recorded)} before this error. ' + _TRANSFORM_HINT)

  def check_selection(self) -> None:
    _capture.check_selection(self.selected, self.auto_path, self.recorded, self.called)

  def collect(self, sown) -> Dict[Path, TractStats]:
    result = {}
    for path in self.recorded:
      node = sown
      for name in path + (_SOW_NAME,):
        if name not in node:
          raise ValueError(
              f'The statistic of layer {_capture.format_paths([path])} did not '
              'come out of the forward pass. ' + _TRANSFORM_HINT)
        node = node[name]
      calls = _get(node)
      kernel = getattr(self.modules[path], 'kernel', None)
      outer = None if kernel is None else tuple(_get(kernel).shape)
      result[path] = _capture.combine_calls(
          path, calls, outer, self.kernel_shapes.get(path), self.precision)
    return result


def _registered_nodes(model: nnx.Module) -> List[Tuple[nnx.Module, Any]]:
  """Each module of ``model`` with its set of registered data attributes.

  Flax before 0.12 registers an attribute that holds a Variable in the
  module's ``_pytree__nodes`` when it is set, but ``nnx.pop`` deletes the
  attribute without unregistering it, so its name would stay in the model's
  GraphDef. :func:`_unregister_popped` undoes that from this snapshot.
  """
  return [(module, vars(module).get('_pytree__nodes'))
          for _, module in _iter_modules(model)]


def _unregister_popped(registered: List[Tuple[nnx.Module, Any]]) -> None:
  """Unregisters the popped statistics attribute (see :func:`_registered_nodes`)."""
  for module, before in registered:
    nodes = vars(module).get('_pytree__nodes')
    if (not isinstance(nodes, frozenset) or _SOW_NAME not in nodes
        or _SOW_NAME in vars(module)):
      continue  # Flax 0.12+ keeps a mapping and unregisters on delete
    after = nodes - {_SOW_NAME}
    # the very object from before keeps the GraphDef's text (set order) as it was
    object.__setattr__(module, '_pytree__nodes', before if before == after else after)


def _drop_captures(model: nnx.Module) -> None:
  """Removes what a failed ``nnx.capture`` leaves on the modules."""
  for _, module in _iter_modules(model):
    if hasattr(module, '__captures__'):
      delattr(module, '__captures__')


def capture_stats(fn: Callable[..., Any], *, layers: _capture.LayersLike = None,
                  precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
                  max_chunk_bytes: Optional[int] = conv_lib.DEFAULT_MAX_CHUNK_BYTES
                  ) -> Callable[..., Tuple[Any, Dict[Path, TractStats]]]:
  """Wraps ``fn(model, *args, **kwargs)`` to also return TrAct statistics.

  Args:
    fn: a function whose first argument is the NNX model; it may call the
      model any number of times.
    layers: ``None`` for the first ``nnx.Conv`` / ``nnx.Linear`` /
      ``nnx.LinearGeneral`` called, or a list of attribute paths (tuples like
      ``('backbone', 'layers', 0)`` or strings like ``'backbone/layers/0'``);
      a single string names one layer.
    precision: matmul precision of the statistics.
    max_chunk_bytes: patch bytes materialised at once for convolutions.

  Returns:
    ``wrapped(model, *args, **kwargs) -> (fn(model, *args, **kwargs),
    tract_stats)`` with ``tract_stats`` mapping each selected layer's path (as
    in ``nnx.state(model)``) to the statistic of all its calls' inputs.

  Raises:
    ValueError: (when called) a selected path is not in the model or its layer
      was never called, no Conv/Linear layer was called, the layer is of an
      unsupported kind, it has one kernel per ``scan``/``vmap`` iteration, or
      its statistic did not leave an NNX transform (see the module docstring).
    TypeError: ``layers`` is an ambiguous tuple of names, or (when called) a
      selected layer was called without a positional or ``inputs=`` input.
    RuntimeError: (when called) a capture of the same model is already active.

  Example:
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu)
    >>> forward = capture_stats(lambda m, x: m(x))
    >>> out, stats = forward(model, jnp.ones((8, 3)))
    >>> list(stats), stats[('layers', 0)].moment.shape
    ([('layers', 0)], (3, 3))
  """
  selected = _capture.normalize_layers(layers)

  @functools.wraps(fn)
  def wrapped(model, *args, **kwargs):
    recorder = _Recorder(model, selected, precision, max_chunk_bytes)
    use_capture = USE_CAPTURE and not hasattr(model, '__captures__')
    if not hasattr(_active, 'stack'):
      _active.stack = []
    recorder.hook()
    _active.stack.append(recorder)
    try:
      if use_capture:
        try:
          result, sown = nnx.capture(fn, TractInputStats)(model, *args, **kwargs)
        except Exception as error:
          _drop_captures(model)
          recorder.annotate(error)
          raise
      else:
        registered = _registered_nodes(model)
        try:
          result = fn(model, *args, **kwargs)
        except Exception as error:
          recorder.annotate(error)
          raise
        finally:
          sown = nnx.pop(model, TractInputStats)
          _unregister_popped(registered)
    finally:
      _active.stack.pop()
      recorder.unhook()
    recorder.check_selection()
    return result, recorder.collect(sown)

  return wrapped


def apply_with_stats(model: nnx.Module, *args, layers: _capture.LayersLike = None,
                     precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
                     max_chunk_bytes: Optional[int] = conv_lib.DEFAULT_MAX_CHUNK_BYTES,
                     **kwargs) -> Tuple[Any, Dict[Path, TractStats]]:
  """``model(*args, **kwargs)`` and the TrAct statistics of chosen layers.

  Args:
    model: the NNX model.
    *args: positional arguments of ``model.__call__``.
    layers: ``None`` for the first Conv/Linear layer called, or a list of
      attribute paths (see :func:`capture_stats`).
    precision: matmul precision of the statistics.
    max_chunk_bytes: patch bytes materialised at once for convolutions.
    **kwargs: keyword arguments of ``model.__call__``.

  Returns:
    ``(output, tract_stats)``, ``tract_stats`` as for ``tx.update``.

  Raises:
    ValueError: see :func:`capture_stats`.

  Example:
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> out, stats = apply_with_stats(model, jnp.ones((8, 3)))
    >>> list(stats)
    [()]
  """
  forward = capture_stats(lambda m, *a, **k: m(*a, **k), layers=layers,
                          precision=precision, max_chunk_bytes=max_chunk_bytes)
  return forward(model, *args, **kwargs)


def value_and_grad_with_stats(loss_fn: Callable[..., Any], model: nnx.Module, *args,
                              layers: _capture.LayersLike = None, has_aux: bool = False,
                              wrt: Any = nnx.Param,
                              precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
                              max_chunk_bytes: Optional[int] = conv_lib.DEFAULT_MAX_CHUNK_BYTES,
                              **kwargs) -> Tuple[Any, Any, Dict[Path, TractStats]]:
  """``nnx.value_and_grad`` of ``loss_fn(model, *args, **kwargs)``, with statistics.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    model: the NNX model; gradients are taken with respect to its ``wrt``
      variables.
    *args: further positional arguments of ``loss_fn`` (not differentiated).
    layers: ``None`` for the first Conv/Linear layer called, or a list of
      attribute paths (see :func:`capture_stats`).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    wrt: NNX filter of the differentiated variables (default ``nnx.Param``).
    precision: matmul precision of the statistics.
    max_chunk_bytes: patch bytes materialised at once for convolutions.
    **kwargs: keyword arguments of ``loss_fn``.

  Returns:
    ``(value, grads, tract_stats)``: ``value`` is ``loss`` or ``(loss, aux)``
    as from ``nnx.value_and_grad``; ``grads`` the gradient State; pass
    ``tract_stats`` to ``nnx.Optimizer.update(model, grads, tract_stats=...)``.

  Raises:
    ValueError: see :func:`capture_stats`.

  Example:
    >>> import optax
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> tx = optax.chain(tract_optax.tract(0.1), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    >>> loss, grads, stats = value_and_grad_with_stats(loss_fn, model, jnp.ones((8, 3)))
    >>> _ = optimizer.update(model, grads, tract_stats=stats)
  """
  forward = capture_stats(loss_fn, layers=layers, precision=precision,
                          max_chunk_bytes=max_chunk_bytes)

  def loss_with_stats(model, *args):  # keywords are closed over: NNX transforms
    value, tract_stats = forward(model, *args, **kwargs)  # map positions only
    loss, aux = value if has_aux else (value, None)
    return loss, (aux, tract_stats)

  grad_fn = nnx.value_and_grad(loss_with_stats, argnums=nnx.DiffState(0, wrt),
                               has_aux=True)
  (loss, (aux, tract_stats)), grads = grad_fn(model, *args)
  return ((loss, aux) if has_aux else loss), grads, tract_stats
