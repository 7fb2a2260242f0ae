"""The TrAct gradient of one kernel: a symmetric positive definite solve.

``G_tract = (A^T A / N + lam I)^{-1} G`` with ``G`` the kernel gradient reshaped
to ``(n, m)``. In Woodbury form (``N < n``) the equivalent
``(G - A^T (N lam I_N + A A^T)^{-1} A G) / lam`` solves an ``N x N`` system.
Both use a Cholesky factorisation; no inverse is ever formed.
"""

from __future__ import annotations

import math
from typing import Union

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from tract_optax.stats import TractStats

_HIGHEST = jax.lax.Precision.HIGHEST


def _solve_moment(moment: jax.Array, grad: jax.Array, lam) -> jax.Array:
  n = moment.shape[-1]
  system = moment + lam * jnp.eye(n, dtype=moment.dtype)
  factor = jsl.cho_factor(system, lower=True)
  return jsl.cho_solve(factor, grad)


def _solve_woodbury(rows: jax.Array, count, grad: jax.Array, lam) -> jax.Array:
  num_rows = rows.shape[0]
  outer = jnp.matmul(rows, rows.T, precision=_HIGHEST)
  system = outer + (count * lam) * jnp.eye(num_rows, dtype=rows.dtype)
  factor = jsl.cho_factor(system, lower=True)
  projected = jnp.matmul(rows, grad, precision=_HIGHEST)
  correction = jnp.matmul(rows.T, jsl.cho_solve(factor, projected),
                          precision=_HIGHEST)
  return (grad - correction) / lam


def precondition(grad_kernel: jax.Array, stats: TractStats,
                 lam: Union[float, jax.Array]) -> jax.Array:
  """Returns the TrAct gradient of one kernel.

  Args:
    grad_kernel: the ordinary gradient of a kernel in Flax layout: Dense
      ``(n_in, n_out)``, Conv ``(*window, c_in / groups, c_out)``.
    stats: the layer's input statistic (:func:`~tract_optax.dense_stats`,
      :func:`~tract_optax.conv_stats`), with ``n = prod(kernel.shape[:-1])``.
    lam: the ridge strength lambda (> 0); a float or a scalar array.

  Returns:
    ``(A^T A / N + lam I)^{-1} G`` reshaped to ``grad_kernel``'s shape and dtype;
    the solve runs in float32, or float64 for float64 statistics.

  Raises:
    ValueError: if the statistic's ``n`` or groups do not fit the kernel.

  Example:
    >>> import jax.numpy as jnp
    >>> stats = tract_optax.dense_stats(jnp.zeros((16, 3)))  # A^T A = 0
    >>> g = tract_optax.precondition(jnp.ones((3, 2)), stats, lam=0.5)
    >>> [round(v, 5) for v in g[0].tolist()]  # G / lam
    [2.0, 2.0]
  """
  if not isinstance(stats, TractStats):
    raise TypeError(f'stats must be a tract_optax.TractStats, got {type(stats)}.')
  shape = grad_kernel.shape
  if len(shape) < 2:
    raise ValueError(f'grad_kernel must be at least 2-D (n_in, n_out); got {shape}.')
  n, m = math.prod(shape[:-1]), shape[-1]
  groups = stats.groups
  data = stats.moment if stats.moment is not None else stats.rows
  if stats.num_features != n:
    raise ValueError(
        f'The statistic (shape {data.shape}, n = {stats.num_features}) does not '
        f'fit the kernel gradient of shape {shape}: it needs n = '
        f'prod(kernel.shape[:-1]) = {n}. Was the statistic computed from this '
        'layer\'s input, with its kernel_size and feature groups?')
  if m % groups:
    raise ValueError(
        f'The statistic has {groups} feature groups, which do not divide the '
        f'{m} output features of the kernel gradient of shape {shape}.')
  dtype = jnp.promote_types(data.dtype, jnp.float32)
  lam = jnp.asarray(lam, dtype)
  grad = grad_kernel.reshape(n, groups, m // groups).astype(dtype)
  grad = jnp.moveaxis(grad, 1, 0)  # (groups, n, m / groups)

  with jax.named_scope('tract_precondition'):
    if stats.moment is not None:
      moment = stats.moment.astype(dtype).reshape(groups, n, n)
      solved = jax.vmap(_solve_moment, (0, 0, None))(moment, grad, lam)
    else:
      rows = stats.rows.astype(dtype).reshape(groups, -1, n)
      count = jnp.asarray(stats.count, dtype)
      solved = jax.vmap(_solve_woodbury, (0, None, 0, None))(rows, count, grad, lam)
  return jnp.moveaxis(solved, 0, 1).reshape(shape).astype(grad_kernel.dtype)
