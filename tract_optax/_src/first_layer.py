"""Which layer is a first layer: one whose input depends on no parameter.

Automatic selection (``layers=None`` in the Linen and NNX glue) must find the
image stem or refuse. It traces the forward pass once more, abstractly
(``jax.eval_shape``: no computation), under ``jax.jvp`` with respect to the
parameters, and marks the input of every Conv/Dense call with an identity
whose JVP rule reports whether a tangent reaches it: a symbolic zero means
the input is computed from data alone. This works through nested ``jit``,
``scan``, ``remat`` and ``vmap``, whose JVP rules run the marker's rule on
their bodies.

The verdict: the layer is selected when exactly one Conv/Dense takes
data-only input and it is the first one called; otherwise an error lists the
candidates so the user can name the stem with ``layers=[...]``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from tract_optax._src import capture as _capture
from tract_optax._src import paths as paths_lib

Path = Tuple[Any, ...]

DATA, PARAMS, UNKNOWN = 'data only', 'parameters', 'unknown'

_PROBES: Dict[int, DependencyProbe] = {}
_probe_ids = itertools.count()


@dataclasses.dataclass
class LayerCall:
  """One Conv/Dense call seen by the probe."""

  path: Path
  type_name: str
  input_depends_on: str = UNKNOWN


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _marker(x, token, probe_id: int, index: int):
  del token, probe_id, index
  return x


def _marker_jvp(probe_id, index, primals, tangents):
  x, _ = primals
  x_tangent, _ = tangents
  probe = _PROBES.get(probe_id)
  data_only = isinstance(x_tangent, SymbolicZero)
  if probe is not None:
    probe.calls[index].input_depends_on = DATA if data_only else PARAMS
  if data_only:
    x_tangent = jnp.zeros(jnp.shape(x), jnp.result_type(x))
  return x, x_tangent


_marker.defjvp(_marker_jvp, symbolic_zeros=True)


class DependencyProbe:
  """Records, for each Conv/Dense call, whether its input depends on params.

  Use as a context manager around one abstract trace; call :meth:`mark` on
  each layer input and use what it returns in place of the input.
  """

  def __init__(self):
    self.calls: List[LayerCall] = []
    self.token = None
    self._id = next(_probe_ids)

  def __enter__(self):
    _PROBES[self._id] = self
    return self

  def __exit__(self, *exc):
    _PROBES.pop(self._id, None)
    return False

  def mark(self, x, path: Path, type_name: str):
    index = len(self.calls)
    self.calls.append(LayerCall(path, type_name))
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      # Integer inputs carry no tangent: they are data (or indices) by nature.
      self.calls[index].input_depends_on = DATA
      return x
    return _marker(x, self.token, self._id, index)

  def trace(self, run, params) -> None:
    """Traces ``run(params, token)`` abstractly under ``jvp`` in ``params``.

    Only inexact leaves of ``params`` are differentiated (others are closed
    over); the token, which every marker takes, always has a tangent, so a
    marker whose rule never ran is reported as unknown, never as data-only.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    inexact = [jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in leaves]
    differentiated = [leaf for leaf, flag in zip(leaves, inexact, strict=False) if flag]

    def rebuild(values):
      values = iter(values)
      return jax.tree_util.tree_unflatten(
        treedef,
        [next(values) if flag else leaf for leaf, flag in zip(leaves, inexact, strict=False)],
      )

    def with_token(values, token):
      self.token = token
      run(rebuild(values), token)
      return jnp.zeros([], jnp.float32)

    def jvp_of_forward(values, token):
      tangents = [jnp.zeros_like(v) for v in values]
      return jax.jvp(with_token, (values, token), (tangents, jnp.ones_like(token)))

    with self:
      jax.eval_shape(jvp_of_forward, differentiated, jnp.zeros([], jnp.float32))
    self.token = None


def _text(path: Path) -> str:
  return _capture.format_paths([path])


def choose(calls: Sequence[LayerCall], kind: str = 'Conv/Dense') -> Path:
  """The first layer among the probed calls, or an error that lists candidates.

  Args:
    calls: the probe's Conv/Dense calls, in call order.
    kind: how the layers are called in messages (Linen vs NNX names).

  Returns:
    The path of the one layer whose every call takes data-only input, when it
    is also the first layer called.

  Raises:
    ValueError: no layer called; no layer (or several) with data-only input;
      the first layer called takes a parameter-dependent input; or the probe
      could not tell (ask for ``layers=[...]``).
  """
  status: Dict[Path, str] = {}
  for call in calls:
    previous = status.get(call.path)
    current = call.input_depends_on
    if previous is None or previous == DATA:
      status[call.path] = current
    elif previous == UNKNOWN and current == PARAMS:
      status[call.path] = PARAMS
  if not status:
    raise ValueError(
      f'No {kind} layer was called in the forward pass, so there is no first layer to precondition.'
    )
  listing = ', '.join(f'{_text(p)} (input depends on {s})' for p, s in status.items())
  candidates = [p for p, s in status.items() if s == DATA]
  first = next(iter(status))
  example = paths_lib.format_path(paths_lib.normalize_path(candidates[0] if candidates else first))
  fix = (
    f'Name the image stem explicitly with layers=[<its module path>], e.g. layers=[{example!r}].'
  )
  unknown = [p for p, s in status.items() if s == UNKNOWN]
  if unknown:
    raise ValueError(
      f'Cannot tell whether the input of {", ".join(_text(p) for p in unknown)} '
      f'depends on parameters (the layers called: {listing}). ' + fix
    )
  if not candidates:
    raise ValueError(
      f'Every {kind} layer called takes an input that depends on parameters, '
      f'so none is a first layer (the layers called: {listing}). ' + fix
    )
  if len(candidates) > 1:
    raise ValueError(
      f'Several {kind} layers take input computed from data alone: '
      f'{", ".join(_text(p) for p in candidates)} (e.g. an image stem and a '
      f'label or time embedding); TrAct cannot tell which is the image stem '
      f'(the layers called: {listing}). ' + fix
    )
  if candidates[0] != first:
    raise ValueError(
      f'The first {kind} layer called, {_text(first)}, takes an input that '
      f'depends on parameters, so it is no first layer; the only layer with '
      f'data-only input is {_text(candidates[0])} (the layers called: '
      f'{listing}). ' + fix
    )
  return first
