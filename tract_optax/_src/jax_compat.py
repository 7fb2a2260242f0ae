"""Every use of JAX internals in tract_optax, in one place.

tract_optax needs three things public JAX does not offer, each read here and
nowhere else, each returning "cannot tell" (None / False) rather than raising
when a JAX release moves it, and each tested against the installed JAX in
``tests/test_jax_compat.py``, so a move fails a test before it reaches users:

- ``bound_axis_names``: the names of the mapped axes bound where a
  function is traced (``pmap``, ``shard_map``, ``vmap(..., axis_name=...)``),
  to refuse a per-device statistic that nobody asked for. Two spellings are
  tried, newest first: ``jax.extend.core.unsafe_get_axis_names_DO_NOT_USE()``
  (a public module, but marked unsafe; present in jax 0.10.2) and
  ``jax._src.core.get_axis_env().axis_sizes`` (private; jax 0.8.0, the oldest
  supported release, through 0.10.2). Where neither works the callers degrade
  to a warning (``tract_optax._src.axes``).
- ``custom_vjp_backward``: which custom VJP produced a traced value, to
  refuse a kernel wrapped by TrAct twice.
- ``is_forward_mode_tracer``: whether a value carries a forward-mode
  tangent, to name TrAct in the error for ``jax.jvp`` through a wrapped kernel.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional, Tuple

import jax


def _from_extend() -> Optional[Callable[[], Tuple[Hashable, ...]]]:
  try:
    from jax.extend import core as extend_core  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  getter = getattr(extend_core, 'unsafe_get_axis_names_DO_NOT_USE', None)
  if not callable(getter):
    return None
  return lambda: tuple(getter())


def _from_private_core() -> Optional[Callable[[], Tuple[Hashable, ...]]]:
  try:
    from jax._src import core as private_core  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  getter = getattr(private_core, 'get_axis_env', None)
  if not callable(getter):
    return None
  return lambda: tuple(getter().axis_sizes)


#: The ways of reading the bound axis names, by name, in the order tried.
AXIS_NAME_READERS = (
  ('jax.extend.core.unsafe_get_axis_names_DO_NOT_USE', _from_extend),
  ('jax._src.core.get_axis_env', _from_private_core),
)


def bound_axis_names() -> Optional[Tuple[Hashable, ...]]:
  """The named axes bound where this is traced, or None if JAX cannot tell.

  ``pmap``, ``shard_map`` and ``vmap`` with ``axis_name`` bind names; ``jit``
  with a sharded batch binds none (its statistic is already global).

  Returns:
    A tuple of axis names (empty outside any named axis), or None when no
    reader works with the installed JAX.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> bound_axis_names()
    ()
    >>> jax.vmap(lambda x: (print(bound_axis_names()), x)[1], axis_name='i')(jnp.ones(2))
    ('i',)
    Array([1., 1.], dtype=float32)
  """
  for _, make_reader in AXIS_NAME_READERS:
    reader = make_reader()
    if reader is None:
      continue
    try:
      return reader()
    except Exception:  # pylint: disable=broad-except  # moved or changed: try the next
      continue
  return None


def custom_vjp_backward(value: object) -> Optional[Callable[..., Any]]:
  """The backward function of the ``jax.custom_vjp`` that produced ``value``, if any.

  Reads the trace: under reverse-mode differentiation ``value`` is a
  linearisation tracer whose tangent was made by a ``custom_lin`` equation;
  under ``jit`` alone it is a jaxpr tracer made by a ``custom_vjp_call``
  equation. Both carry the custom VJP's backward function in their ``bwd``
  parameter. A ``vmap``'s tracer is looked through to the value it batches,
  and the closure ``vmap`` wraps the backward function in is looked through to
  the user's function. Where JAX does not expose this (a concrete value,
  another tracer, another release) it returns None: nothing is assumed.

  Example:
    >>> import jax
    >>> custom_vjp_backward(jax.numpy.ones(2)) is None
    True
  """
  pending = [value]
  try:
    for _ in range(8):  # a few nested transformations at most
      if not pending:
        return None
      tracer = pending.pop()
      if not isinstance(tracer, jax.core.Tracer):
        continue
      parent = getattr(tracer, 'parent', None)
      backward = None if parent is None else parent.params.get('bwd')
      if backward is not None:
        return _unwrapped(backward)
      pending.extend(getattr(tracer, field, None) for field in ('val', 'tangent'))
  except Exception:  # pylint: disable=broad-except  # internals moved: cannot tell
    return None
  return None


def _unwrapped(backward: object) -> Optional[Callable[..., Any]]:
  """The function a custom VJP's (possibly ``vmap``-wrapped) backward was made from."""
  for _ in range(4):
    core = getattr(backward, 'f', None)
    inner = [
      cell.cell_contents
      for cell in getattr(core, '__closure__', None) or ()
      if hasattr(cell.cell_contents, 'f') and hasattr(cell.cell_contents, 'call_wrapped')
    ]
    if not inner:
      return core
    backward = inner[0]
  return None


def is_forward_mode_tracer(value: object) -> bool:
  """Whether ``value`` carries a forward-mode (JVP) tangent.

  With JAX's direct linearisation (the default since JAX 0.5) reverse mode
  never traces a JVP tracer, so a JVP tracer means ``jax.jvp`` /
  ``jax.jacfwd``. Where JAX does not say (the tracer type or the flag moved),
  returns False: nothing is assumed.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> jax.jvp(lambda x: (print(is_forward_mode_tracer(x)), x)[1], (1.0,), (1.0,))[0]
    True
    1.0
  """
  tracer_type = getattr(getattr(jax.interpreters, 'ad', None), 'JVPTracer', None)
  direct = getattr(jax.config, 'jax_use_direct_linearize', None)  # None: moved
  return direct is True and tracer_type is not None and isinstance(value, tracer_type)


#: Raised for a comparison that symbolic shapes leave open (``jax.errors`` has
#: it in current releases, ``jax.core`` in older ones).
INCONCLUSIVE_DIMENSION: type[Exception] = getattr(
  jax.errors, 'InconclusiveDimensionOperation', None
) or (jax.core.InconclusiveDimensionOperation)


def varying_axes(value: object) -> frozenset:
  """The ``shard_map`` mesh axes ``value`` varies over (empty outside ``shard_map``).

  Its type names them ``vma`` in older jax and ``mat.varying`` in jax 0.10;
  where ``jax.typeof`` is missing, none.

  Example:
    >>> varying_axes(jax.numpy.ones(2))
    frozenset()
  """
  typeof = getattr(jax, 'typeof', None)
  if typeof is None:
    return frozenset()
  aval = typeof(value)
  varying = getattr(aval, 'vma', None)
  if varying is None:
    varying = getattr(getattr(aval, 'mat', None), 'varying', None)
  return frozenset(varying or ())


def varying_over(value: jax.Array, axes: Tuple[Hashable, ...]) -> jax.Array:
  """``value`` marked as varying over the ``shard_map`` mesh ``axes`` too.

  ``lax.pcast(..., to='varying')`` in jax 0.10, ``lax.pvary`` before; where
  neither exists (a jax without varying types) ``value`` itself.
  """
  pcast = getattr(jax.lax, 'pcast', None)
  if pcast is not None:
    return pcast(value, axes, to='varying')
  pvary = getattr(jax.lax, 'pvary', None)
  return value if pvary is None else pvary(value, axes)
