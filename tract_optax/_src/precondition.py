"""The TrAct gradient of one kernel: a symmetric positive definite solve.

``G_tract = (A^T A / N + lam I)^{-1} G`` with ``G`` the kernel gradient reshaped
to ``(n, m)``. In Woodbury form (``N < n``) the equivalent
``(G - A^T (N lam I_N + A A^T)^{-1} A G) / lam`` solves an ``N x N`` system.
Both use a Cholesky factorisation; no inverse is ever formed.

Two guards keep a bad ridge or a hopeless solve from passing silently:

- a ridge that is not a finite number > 0 at run time (a traced or injected
  ``lam`` that reached 0 or went negative) makes the kernel's TrAct gradient
  NaN, which ``optax.apply_if_finite`` skips and any NaN check sees;
- when the solved system is too ill-conditioned for its float type
  (``eps * condition > 1e-3``, e.g. raw 0..255 pixels with an absolute
  ``lam``) a :class:`ConditioningWarning` names the cure: at once for concrete
  (eager) values, and inside ``jit`` when ``check_condition=True``. In the
  Woodbury form the condition reported is that of the ``n x n`` system, which
  the result's cancellation inherits.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from tract_optax._src import ridge as ridge_lib
from tract_optax._src.stats import TractStats

_HIGHEST = jax.lax.Precision.HIGHEST

#: ``eps * condition`` above which the float solve is reported as unresolved.
CONDITION_TOLERANCE = 1e-3

_POWER_ITERATIONS = 16


class ConditioningWarning(UserWarning):
  """The TrAct system is too ill-conditioned for its float type."""


def _solve_moment(moment: jax.Array, grad: jax.Array, lam):
  n = moment.shape[-1]
  system = moment + lam * jnp.eye(n, dtype=moment.dtype)
  factor = jsl.cho_factor(system, lower=True)
  return jsl.cho_solve(factor, grad), system, factor[0]


def _solve_woodbury(rows: jax.Array, count, grad: jax.Array, lam):
  num_rows = rows.shape[0]
  outer = jnp.matmul(rows, rows.T, precision=_HIGHEST)
  system = outer + (count * lam) * jnp.eye(num_rows, dtype=rows.dtype)
  factor = jsl.cho_factor(system, lower=True)
  projected = jnp.matmul(rows, grad, precision=_HIGHEST)
  correction = jnp.matmul(rows.T, jsl.cho_solve(factor, projected), precision=_HIGHEST)
  return (grad - correction) / lam, system, factor[0]


def condition_estimate(
  system: jax.Array, factor: jax.Array, smallest: Optional[jax.Array] = None
) -> jax.Array:
  """Estimated 2-norm condition number of an SPD ``system`` (a lower bound).

  Power iteration for the largest eigenvalue and inverse iteration (with the
  lower Cholesky ``factor`` already computed) for the smallest; 16 steps each, a
  few ``n x n`` products, far cheaper than the factorisation.

  Args:
    system: the SPD matrix solved.
    factor: its lower Cholesky factor.
    smallest: the smallest eigenvalue that matters, if known (the Woodbury
      form's ``N lam``: then the estimate is that of the ``n x n`` system,
      whose accuracy the Woodbury result shares through its cancellation).
  """
  size = system.shape[-1]
  if size == 0:
    return jnp.ones([], system.dtype)
  start = 1.0 + jnp.arange(size, dtype=system.dtype) / size

  def normalized(v):
    return v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(v.dtype).tiny)

  def power(_, v):
    return normalized(jnp.matmul(system, v, precision=_HIGHEST))

  def inverse(_, v):
    return normalized(jsl.cho_solve((factor, True), v))

  top = jax.lax.fori_loop(0, _POWER_ITERATIONS, power, normalized(start))
  largest = top @ jnp.matmul(system, top, precision=_HIGHEST)
  if smallest is None:
    bottom = jax.lax.fori_loop(0, _POWER_ITERATIONS, inverse, normalized(start))
    smallest = bottom @ jnp.matmul(system, bottom, precision=_HIGHEST)
  return largest / smallest


def _is_concrete(*values) -> bool:
  return not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(values))


def _warn_condition(condition, dtype_name: str, eps: float, relative: bool, name: str) -> None:
  condition = float(np.max(np.asarray(condition)))
  if not math.isfinite(condition) or eps * condition <= CONDITION_TOLERANCE:
    return
  where = f' of {name!r}' if name else ''
  cure = (
    'standardise the inputs (mean 0, std 1) or pass relative_lam=True'
    if not relative
    else 'standardise the inputs (mean 0, std 1) or raise lam'
  )
  warnings.warn(
    f'TrAct: the system solved for the kernel{where} has condition number '
    f'~{condition:.2g}, too large for {dtype_name} (eps {eps:.1g}): the '
    f'relative error of its TrAct gradient can reach eps x condition = '
    f'{eps * condition:.1g}. The usual cause is unscaled inputs (e.g. raw '
    f'0..255 pixels) with an absolute lambda; {cure}.',
    ConditioningWarning,
    stacklevel=3,
  )


def precondition(
  grad_kernel: jax.Array,
  stats: TractStats,
  lam: Union[float, jax.Array],
  *,
  relative_lam: bool = False,
  check_condition: Optional[bool] = None,
  name: Optional[str] = None,
) -> jax.Array:
  """Returns the TrAct gradient of one kernel.

  Args:
    grad_kernel: the ordinary gradient of a kernel in Flax layout: Dense
      ``(n_in, n_out)``, Conv ``(*window, c_in / groups, c_out)``.
    stats: the layer's input statistic (:func:`~tract_optax.dense_stats`,
      :func:`~tract_optax.conv_stats`), with ``n = prod(kernel.shape[:-1])``.
    lam: the ridge strength lambda (> 0); a float or a scalar array.
    relative_lam: use the ridge ``lam * trace(A^T A / N) / n`` (per feature
      group) instead of ``lam``, which makes the update invariant to the
      input's scale.
    check_condition: whether to warn (a :class:`ConditioningWarning`) when
      the system is too ill-conditioned for its float type. None (default):
      for concrete (eager) values only; True: inside ``jit`` too (via
      ``jax.debug.callback``); False: never (no estimate is computed).
    name: the layer's name for messages.

  Returns:
    ``(A^T A / N + lam I)^{-1} G`` reshaped to ``grad_kernel``'s shape and dtype;
    the solve runs in float32, or float64 for float64 statistics. All NaN if
    the ridge is not a finite number > 0 at run time.

  Raises:
    ValueError: if the statistic's ``n`` or groups do not fit the kernel, or
      ``lam`` is not a scalar.
    TypeError: if ``stats`` is not a well-formed TractStats.

  Example:
    >>> import jax.numpy as jnp
    >>> stats = tract_optax.dense_stats(jnp.zeros((16, 3)))  # A^T A = 0
    >>> g = tract_optax.precondition(jnp.ones((3, 2)), stats, lam=0.5)
    >>> [round(v, 5) for v in g[0].tolist()]  # G / lam
    [2.0, 2.0]
  """
  if not isinstance(stats, TractStats):
    raise TypeError(f'stats must be a tract_optax.TractStats, got {type(stats)}.')
  stats.validate('precondition')
  shape = grad_kernel.shape
  if len(shape) < 2:
    raise ValueError(f'grad_kernel must be at least 2-D (n_in, n_out); got {shape}.')
  if jnp.ndim(lam) != 0:
    raise ValueError(
      f'lam must be a scalar (the ridge strength lambda); got shape {jnp.shape(lam)}.'
    )
  n, m = math.prod(shape[:-1]), shape[-1]
  groups = stats.groups
  data = stats.moment if stats.moment is not None else stats.rows
  if stats.num_features != n:
    raise ValueError(
      f'The statistic (shape {data.shape}, n = {stats.num_features}) does not '
      f'fit the kernel gradient of shape {shape}: it needs n = '
      f'prod(kernel.shape[:-1]) = {n}. Was the statistic computed from this '
      "layer's input, with its kernel_size and feature groups?"
    )
  if m % groups:
    raise ValueError(
      f'The statistic has {groups} feature groups, which do not divide the '
      f'{m} output features of the kernel gradient of shape {shape}.'
    )
  dtype = jnp.promote_types(data.dtype, jnp.float32)
  ridges = ridge_lib.ridge(stats, lam, relative_lam, dtype)
  valid = ridge_lib.valid_ridge(ridges)
  safe_ridges = jnp.where(valid, ridges, jnp.ones_like(ridges))
  grad = grad_kernel.reshape(n, groups, m // groups).astype(dtype)
  grad = jnp.moveaxis(grad, 1, 0)  # (groups, n, m / groups)

  with jax.named_scope('tract_precondition'):
    if stats.moment is not None:
      moment = stats.moment.astype(dtype).reshape(groups, n, n)
      solved, system, factor = jax.vmap(_solve_moment)(moment, grad, safe_ridges)
    else:
      rows = stats.rows.astype(dtype).reshape(groups, -1, n)
      count = jnp.asarray(stats.count, dtype)
      solved, system, factor = jax.vmap(_solve_woodbury, (0, None, 0, 0))(
        rows, count, grad, safe_ridges
      )
    solved = jnp.where(valid[:, None, None], solved, jnp.nan)
    eager = check_condition is None and _is_concrete(stats, lam, grad_kernel)
    if check_condition or eager:
      if stats.moment is not None:
        condition = jax.vmap(condition_estimate)(system, factor)
      else:
        floor = jnp.asarray(stats.count, dtype) * safe_ridges
        condition = jax.vmap(condition_estimate)(system, factor, floor)

      def report(c):
        return _warn_condition(
          c, jnp.dtype(dtype).name, float(jnp.finfo(dtype).eps), relative_lam, name or ''
        )

      if _is_concrete(condition):
        report(condition)
      else:
        jax.debug.callback(report, condition)
  return jnp.moveaxis(solved, 0, 1).reshape(shape).astype(grad_kernel.dtype)
