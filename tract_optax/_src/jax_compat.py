"""Every use of JAX internals in tract_optax, in one place.

tract_optax needs one thing public JAX does not offer: the names of the mapped
axes bound where a function is traced (``pmap``, ``shard_map``,
``vmap(..., axis_name=...)``), to refuse a per-device statistic that nobody
asked for. Two spellings are tried, newest first:

- ``jax.extend.core.unsafe_get_axis_names_DO_NOT_USE()`` (a public module,
  but marked unsafe; present in jax 0.10.2);
- ``jax._src.core.get_axis_env().axis_sizes`` (private; jax 0.8.0, the oldest
  supported release, through 0.10.2).

If a JAX release moves both, :func:`bound_axis_names` returns None ("cannot
tell") instead of raising, and the callers degrade to a warning
(:mod:`tract_optax._src.axes`). ``tests/test_jax_compat.py`` checks both
spellings against the installed JAX, so a move fails a test before it reaches
users.
"""

from __future__ import annotations

from typing import Callable, Hashable, Optional, Tuple


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
