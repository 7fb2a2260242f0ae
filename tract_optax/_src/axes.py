"""Named mapped axes: whether ``tract`` runs where each device sees part of a batch.

Inside ``pmap``, ``shard_map`` or ``vmap(..., axis_name=...)`` every member of
the named axis computes the statistic of its own part of the batch. TrAct is
exact only with the statistic of the whole batch, so the transformation (and
the gradient route) must either all-reduce over the axes that split the batch
(``axis_name=...``) or be told that local statistics are wanted on purpose
(``local_stats=True``). This module finds the bound axes and turns the two
settings into one decision, with messages that name the fix.
"""

from __future__ import annotations

import warnings
from typing import Hashable, Optional, Sequence, Tuple, Union

from tract_optax._src import docs_link, jax_compat

AxisName = Union[Hashable, Sequence[Hashable], None]


def bound_axis_names() -> Optional[Tuple[Hashable, ...]]:
  """The named axes bound where this is traced, or None if JAX cannot tell.

  See ``tract_optax._src.jax_compat.bound_axis_names``.

  Example:
    >>> bound_axis_names()
    ()
  """
  return jax_compat.bound_axis_names()


class AxisDetectionWarning(UserWarning):
  """This JAX gives no way to see bound named axes; TrAct assumes none."""


_UNDETECTABLE = (
  'This JAX offers no way to see whether TrAct runs inside pmap/shard_map, so TrAct '
  'assumes its statistic covers the whole batch (right under jit). Inside pmap/shard_map '
  'pass axis_name=... (the axes that split the batch), or local_stats=True (which also '
  'says so under jit and silences this).'
)


def _warn_undetectable() -> None:
  # Warned wherever it is traced (once per compile under jit): no state is kept here to
  # show it once, and naming the choice (axis_name or local_stats) ends it.
  warnings.warn(
    _UNDETECTABLE + docs_link.see('limits', 'If a JAX release hides the bound axis names'),
    AxisDetectionWarning,
    stacklevel=3,
  )


def _names(axis_name: AxisName) -> Tuple[Hashable, ...]:
  if isinstance(axis_name, (tuple, list)):
    return tuple(axis_name)
  return (axis_name,)


def resolve_axis_name(axis_name: AxisName, local_stats: bool, *, owner: str = 'tract') -> AxisName:
  """The axes to all-reduce statistics over, checked against the bound axes.

  Args:
    axis_name: the axis (or axes) the caller named, or None.
    local_stats: whether the caller asked for per-device statistics on purpose.
    owner: the API to name in messages, e.g. ``'tract'`` or ``'apply_tract'``.

  Returns:
    ``axis_name`` (None: no reduction).

  Raises:
    ValueError: if a named axis is not bound here, if named axes are bound but
      neither ``axis_name`` nor ``local_stats=True`` was given, or if both
      were given.

  Warns:
    AxisDetectionWarning: wherever it is traced, if this JAX version gives no way
      to see bound axes and neither setting was given; the statistic is then
      taken as global (no reduction).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> resolve_axis_name(None, False) is None  # not inside pmap/shard_map
    True
  """
  if axis_name is not None and local_stats:
    raise ValueError(
      f'{owner}: pass either axis_name={axis_name!r} (all-reduce the statistic '
      "over the devices) or local_stats=True (keep each device's own), not "
      'both.'
    )
  bound = bound_axis_names()
  if axis_name is not None:
    if bound is not None:
      missing = [name for name in _names(axis_name) if name not in bound]
      if missing:
        raise ValueError(
          f'{owner}(axis_name={axis_name!r}): the axis {missing[0]!r} is not '
          f'bound here (bound named axes: {list(bound) or "none"}). Use '
          'axis_name inside pmap or shard_map over that axis; under jit with '
          'a sharded batch the statistic is already global, so leave '
          'axis_name out there.'
        )
    return axis_name
  if local_stats:
    return None
  if bound is None:
    _warn_undetectable()
    return None
  if bound:
    suggestion = bound[0] if len(bound) == 1 else tuple(bound)
    raise ValueError(
      f'{owner} runs inside the named axis {list(bound)} without axis_name. For data '
      f'parallelism build it with {owner}(..., axis_name={suggestion!r}), so the statistic '
      "is the whole batch's; for an ensemble (one model per lane) pass local_stats=True, "
      'and per_lane_stats=True where each model has its own data.'
      + docs_link.see('parallel', 'Ensembles and named axes')
    )
  return None
