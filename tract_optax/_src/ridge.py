"""The ridge strength lambda: validation, schedules, and the relative ridge.

TrAct solves ``(A^T A / N + ridge I) X = G``. With an absolute ridge
(``ridge = lam``, the paper's convention) the scale of ``lam`` assumes
standardised inputs. With ``relative_lam=True`` the ridge is
``lam * trace(A^T A / N) / n`` per feature group: when the inputs scale by
``s`` (and so does ``G``, for a fixed gradient of the pre-activations) the
TrAct gradient scales as ``1 / s``, so the change of the pre-activations is
the same at every scale, and the solve stays well conditioned for any pixel
range.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from tract_optax._src import docs_link
from tract_optax._src import stats as stats_lib

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]

#: Steps at which a schedule is evaluated when ``tract`` is built: powers of
#: two up to the largest int32 count, which reveals where an Optax decay
#: schedule ends (they hold their final value after the last step).
PROBE_STEPS = (0,) + tuple(2**k for k in range(31)) + (2**31 - 1,)

#: The range of lambda: normal float32 numbers (the solve runs in float32
#: unless the statistic is float64). Below it lambda is 0 or subnormal in
#: float32 (flushed to 0 on CPUs and GPUs), above it infinite.
SMALLEST_LAM = float(np.finfo(np.float32).tiny)  # 1.1754944e-38
LARGEST_LAM = float(np.finfo(np.float32).max)  # 3.4028235e+38


def _range_message(name: str, value: float) -> str:
  state = 'infinite' if value > LARGEST_LAM else '0 or subnormal (flushed to 0)'
  return (
    f'{name} = {value!r} is {state} in float32, where the solve runs, so the '
    f'TrAct gradient would be NaN: use a value between {SMALLEST_LAM:.3g} and '
    f'{LARGEST_LAM:.3g} (the paper uses 0.1; its scale assumes standardised '
    'inputs).'
  )


def _message(name: str, value: object) -> str:
  return (
    f'{name} must be a finite number > 0 (the ridge strength lambda; the '
    f'paper uses 0.1); got {value!r}.'
  )


def validate_lam(lam: object, name: str = 'lam') -> bool:
  """Raises ``ValueError`` unless ``lam`` is a schedule or a finite number > 0.

  A schedule is evaluated at ``PROBE_STEPS``; a traced value (inside
  ``jit`` or ``inject_hyperparams``) can only be checked for its shape, and
  is refused at run time instead (see ``refuse_traced_invalid``).

  Args:
    lam: the ridge strength, a scalar or a schedule ``step -> lambda``.
    name: the argument's name, for the message.

  Returns:
    True if ``lam`` was checked here in full; False for a traced value or a
    schedule that cannot be evaluated outside a trace (check those at run
    time, ``refuse_traced_invalid``).

  Raises:
    ValueError: if ``lam`` is not a scalar > 0 that float32 represents as a
      normal number (``SMALLEST_LAM`` to ``LARGEST_LAM``), or a
      schedule reaches a value that is not.

  Example:
    >>> validate_lam(0.1)
    True
    >>> validate_lam(0.0)
    Traceback (most recent call last):
    ...
    ValueError: lam must be a finite number > 0 (the ridge strength lambda; the paper uses 0.1); got 0.0.
  """
  if callable(lam):
    return _probe_schedule(lam, name)
  if isinstance(lam, jax.core.Tracer):
    if jnp.ndim(lam) != 0:
      raise ValueError(_message(name, f'a traced array of shape {jnp.shape(lam)}'))
    return False
  if isinstance(lam, (bool, np.bool_, str, bytes)):
    raise ValueError(_message(name, lam))
  try:
    array = np.asarray(lam)
  except Exception:  # pylint: disable=broad-except
    raise ValueError(_message(name, lam)) from None
  # jnp.issubdtype also knows bfloat16 (inject_hyperparams stores lam in the
  # params dtype), which np.issubdtype does not count as a number.
  if array.ndim != 0 or not jnp.issubdtype(array.dtype, jnp.number):
    raise ValueError(_message(name, lam))
  if jnp.issubdtype(array.dtype, jnp.complexfloating):
    raise ValueError(_message(name, lam))
  value = float(array)
  if not math.isfinite(value) or value <= 0:
    raise ValueError(_message(name, lam))
  if not SMALLEST_LAM <= value <= LARGEST_LAM:
    raise ValueError(_range_message(name, value))
  return True


def _probe_schedule(schedule: Callable[[jax.Array], object], name: str) -> bool:
  """Evaluates a schedule at ``PROBE_STEPS``; raises at a value <= 0.

  Returns False if the schedule cannot be evaluated outside a trace.
  """
  for step in PROBE_STEPS:
    try:
      value = schedule(jnp.asarray(step, jnp.int32))
      value = np.asarray(value)
    except Exception:  # pylint: disable=broad-except  # not probeable: traced later
      return False
    if value.ndim != 0:
      raise ValueError(
        f'The {name} schedule must return a scalar; at step {step} it returned shape {value.shape}.'
      )
    number = float(value)
    if not math.isfinite(number) or number <= 0:
      raise ValueError(
        f'The {name} schedule reaches {number!r} at step {step}: lambda must '
        'stay > 0 (at 0 the solve divides by zero). Give the decay a floor, '
        'e.g. optax.cosine_decay_schedule(0.1, steps, alpha=0.1).'
      )
    if not SMALLEST_LAM <= number <= LARGEST_LAM:
      raise ValueError(f'The {name} schedule at step {step}: ' + _range_message(name, number))
  return True


def _raise_if_invalid(name: str, value: ArrayLike) -> None:
  """The run-time half of ``refuse_traced_invalid`` (a host callback)."""
  values = np.asarray(value, np.float64).ravel()
  ok = np.isfinite(values) & (values >= SMALLEST_LAM) & (values <= LARGEST_LAM)
  if not ok.all():
    bad = float(values[~ok][0])
    raise ValueError(
      f'{name} = {bad!r} reached tract inside jit (a traced value, e.g. an '
      'optax.inject_hyperparams schedule that reaches 0): the TrAct gradient would be NaN. '
      f'Keep {name} a normal float32 number > 0 (give the schedule a floor).'
      + docs_link.see('limits', 'A lambda known only inside `jit`')
    )


def refuse_traced_invalid(lam: Union[float, jax.Array], name: str = 'lam') -> None:
  """Refuses, at run time, a traced ``lam`` that is not a normal float32 number > 0.

  A value known when ``tract`` is built is checked by ``validate_lam``;
  one that arrives traced (``optax.inject_hyperparams`` rebuilds ``tract``
  inside ``jit`` with the schedule's value) is checked in the computation,
  and only an invalid value runs a host callback that raises, so the jitted
  call fails with this message instead of returning NaN parameters. A valid
  step pays a scalar predicate (about 60 us a call on a 2-core CPU, where a
  host callback in the program costs that much); ``jax.export`` cannot
  serialise the callback. Concrete values and schedules pass through.

  Args:
    lam: the value the solve is about to use.
    name: the argument's name, for the message.

  Example:
    >>> f = jax.jit(lambda lam: refuse_traced_invalid(lam) or lam)
    >>> float(f(0.1))
    0.10000000149011612
  """
  if isinstance(lam, jax.core.Tracer):
    value = jnp.asarray(lam)
    ok = jnp.all(valid_ridge(value.astype(jnp.float32)))  # the range validate_lam checks
    # the callback runs only when the value is invalid: a valid step pays a predicate
    jax.lax.cond(
      ok,
      lambda v: None,
      lambda v: jax.debug.callback(functools.partial(_raise_if_invalid, name), v),
      value,
    )


def ridge(
  stats: stats_lib.TractStats, lam: Union[float, jax.Array], relative: bool, dtype: DTypeLike
) -> jax.Array:
  """The ridge added to ``A^T A / N``, one per feature group: ``(groups,)``.

  With ``relative=True`` it is ``lam * trace(A^T A / N) / n`` (falling back to
  ``lam`` for a statistic of no rows or all-zero inputs, whose gradient is 0
  anyway); otherwise ``lam``. Not checked for sign here: see
  ``valid_ridge``.

  Example:
    >>> s = tract_optax.dense_stats(2.0 * jnp.ones((8, 4)))  # trace / n = 4
    >>> ridge(s, 0.1, True, jnp.float32).tolist()
    [0.4000000059604645]
  """
  lam = jnp.asarray(lam, dtype)
  if jnp.ndim(lam) != 0:
    raise ValueError(_message('lam', f'an array of shape {jnp.shape(lam)}'))
  groups = stats.groups
  if not relative:
    return jnp.broadcast_to(lam, (groups,))
  scale = stats_lib.mean_eigenvalue(stats).astype(dtype)
  usable = jnp.isfinite(scale) & (scale > 0)
  return lam * jnp.where(usable, scale, jnp.ones_like(scale))


def valid_ridge(value: jax.Array) -> jax.Array:
  """Whether each ridge is a finite, normal number > 0 (traced values: checked here).

  Example:
    >>> valid_ridge(jnp.asarray([0.1, 0.0, -1.0, 1e-40, jnp.inf])).tolist()
    [True, False, False, False, False]
  """
  return jnp.isfinite(value) & (value >= jnp.finfo(value.dtype).tiny)
