"""The TrAct gradient of one kernel: a symmetric positive definite solve.

``G_tract = (A^T A / N + lam I)^{-1} G`` with ``G`` the kernel gradient reshaped
to ``(n, m)``. In Woodbury form (``N < n``) the equivalent
``(G - A^T (N lam I_N + A A^T)^{-1} A G) / lam`` solves an ``N x N`` system.
Both use a Cholesky factorisation; no inverse is ever formed. The Woodbury
form's subtraction cancels (in float32 it lost up to 7x the moment form's
accuracy), so its result gets one step of iterative refinement, which brings
it to the moment form's accuracy or better at the cost of two more products
with the rows (docs/numerics.md, "Woodbury form").

Three guards keep a bad ridge or a hopeless solve from passing silently:

- a ``lam`` whose value is known (a Python number or a concrete array) must
  be a normal float32 number > 0, or ``ValueError``; a traced ``lam`` (inside
  ``jit``: an injected or scheduled value) that is not (0, negative, NaN,
  subnormal) makes the kernel's TrAct gradient NaN, which
  ``optax.apply_if_finite`` skips and any NaN check sees;
- when the solved system is too ill-conditioned for its float type
  (``eps * condition > 1e-3``, e.g. raw 0..255 pixels with an absolute
  ``lam``) a ``ConditioningWarning`` names the cure. In the Woodbury form
  the condition reported is that of the ``n x n`` system, which the result's
  cancellation inherits;
- when the Cholesky factorisation fails (the rounded system is not positive
  definite: float32 rounding of a statistic whose largest eigenvalue dwarfs
  the ridge, or NaN/inf in the statistic) the TrAct gradient is NaN and a
  ``ConditioningWarning`` says so with the numbers (largest eigenvalue,
  ridge, eps x their ratio, non-finite entries); a traced ridge that is not
  valid is reported the same way.

The last two checks run at once for concrete (eager) values, and inside
``jit``, ``pmap`` and ``shard_map`` when ``check_condition=True`` (through
``jax.debug.callback``).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple, Optional, Tuple, Union, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from tract_optax._src import docs_link
from tract_optax._src import ridge as ridge_lib
from tract_optax._src.stats import TractStats

_HIGHEST = jax.lax.Precision.HIGHEST

#: ``eps * condition`` above which the float solve is reported as unresolved.
CONDITION_TOLERANCE = 1e-3

_POWER_ITERATIONS = 16

#: What a solve returns, per feature group: the solution, the system solved, its
#: lower Cholesky factor.
_Solved = Tuple[jax.Array, jax.Array, jax.Array]
#: What the conditioning report reads, per feature group (see ``_report``).
_Checked = Tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]


class ConditioningWarning(UserWarning):
  """The TrAct system is too ill-conditioned for its float type."""


def _cho_solve(factor: jax.Array, rhs: jax.Array) -> jax.Array:
  """``(L L^T)^{-1} rhs`` for a lower Cholesky factor ``L``; ``rhs`` 1-D or 2-D.

  Solved transposed, ``rhs^T L^{-T} L^{-1}``, by two right-side triangular
  solves: the same LAPACK ``trsm`` as ``jax.scipy.linalg.cho_solve``, but on
  CPU XLA compiles a wide left-side right-hand side with a layout change
  (8 x 768: 125 ms of compile per solve against 50 ms this way).
  """
  rows = rhs.T if rhs.ndim == 2 else rhs[None, :]
  solve = functools.partial(jax.lax.linalg.triangular_solve, factor, left_side=False, lower=True)
  solved = solve(solve(rows, transpose_a=True), transpose_a=False)
  return solved.T if rhs.ndim == 2 else solved[0]


def _solve_moment(moment: jax.Array, grad: jax.Array, lam: jax.Array) -> _Solved:
  n = moment.shape[-1]
  system = moment + lam * jnp.eye(n, dtype=moment.dtype)
  factor = jax.lax.linalg.cholesky(system, symmetrize_input=False)
  return _cho_solve(factor, grad), system, factor


def _solve_woodbury(rows: jax.Array, count: jax.Array, grad: jax.Array, lam: jax.Array) -> _Solved:
  """Woodbury solve plus one step of iterative refinement (see the module notes)."""
  num_rows = rows.shape[0]
  outer = jnp.matmul(rows, rows.T, precision=_HIGHEST)
  system = outer + (count * lam) * jnp.eye(num_rows, dtype=rows.dtype)
  factor = jax.lax.linalg.cholesky(system, symmetrize_input=False)

  def woodbury(rhs: jax.Array) -> jax.Array:
    projected = jnp.matmul(rows, rhs, precision=_HIGHEST)
    correction = jnp.matmul(rows.T, _cho_solve(factor, projected), precision=_HIGHEST)
    return (rhs - correction) / lam

  solved = woodbury(grad)
  # One refinement step: the residual of the n x n system, (A^T A / N + lam I) X
  # against G, formed from the rows, is solved again and added. It costs two
  # (N, n) x (n, m) products and reuses the factor; it restores the accuracy
  # that the Woodbury form's cancellation G - A^T (...) A G loses.
  applied = jnp.matmul(rows.T, jnp.matmul(rows, solved, precision=_HIGHEST), precision=_HIGHEST)
  residual = grad - (applied / jnp.where(count > 0, count, 1) + lam * solved)
  return solved + woodbury(residual), system, factor


def _solve_identity(
  rows: jax.Array, count: jax.Array, cotangent: jax.Array, lam: jax.Array
) -> _Solved:
  """``A^T (A A^T / N + lam I)^{-1} d``: the TrAct gradient from the output cotangent.

  Equal to ``(A^T A / N + lam I)^{-1} A^T d`` (push-through identity) without
  the Woodbury form's subtraction, so nothing cancels.
  """
  num_rows = rows.shape[0]
  outer = jnp.matmul(rows, rows.T, precision=_HIGHEST)
  system = outer + (count * lam) * jnp.eye(num_rows, dtype=rows.dtype)
  factor = jax.lax.linalg.cholesky(system, symmetrize_input=False)
  solved = jnp.matmul(rows.T, _cho_solve(factor, cotangent), precision=_HIGHEST)
  return count * solved, system, factor


def condition_estimate(
  system: jax.Array,
  factor: jax.Array,
  largest: Optional[jax.Array] = None,
  smallest: Optional[jax.Array] = None,
) -> jax.Array:
  """Estimated 2-norm condition number of an SPD ``system`` (a lower bound).

  Power iteration for the largest eigenvalue and inverse iteration (with the
  lower Cholesky ``factor`` already computed) for the smallest; 16 steps each, a
  few ``n x n`` products, far cheaper than the factorisation. The solve's
  conditioning check uses it (one group at a time, under ``vmap``).

  Args:
    system: the SPD matrix solved.
    factor: its lower Cholesky factor.
    largest: its largest eigenvalue, if already estimated.
    smallest: the smallest eigenvalue that matters, if known (the Woodbury
      form's ``N lam``: then the estimate is that of the ``n x n`` system,
      whose accuracy the Woodbury result shares through its cancellation).

  Returns:
    A scalar: largest over smallest eigenvalue (1 for an empty system).

  Example:
    >>> system = jnp.diag(jnp.asarray([1.0, 4.0, 2.0]))
    >>> factor = jnp.linalg.cholesky(system)
    >>> round(float(condition_estimate(system, factor)), 3)
    4.0
  """
  if system.shape[-1] == 0:
    return jnp.ones([], system.dtype)
  if largest is None:
    largest = largest_eigenvalue(system)
  if smallest is None:
    smallest = _smallest_eigenvalue(system, factor)
  return largest / smallest


def _smallest_eigenvalue(system: jax.Array, factor: jax.Array) -> jax.Array:
  """Inverse-iteration estimate, with the lower Cholesky ``factor`` of ``system``."""

  def inverse(_: jax.Array, v: jax.Array) -> jax.Array:
    return _normalized(_cho_solve(factor, v))

  bottom = jax.lax.fori_loop(0, _POWER_ITERATIONS, inverse, _start(system.shape[-1], system.dtype))
  return bottom @ jnp.matmul(system, bottom, precision=_HIGHEST)


def _normalized(v: jax.Array) -> jax.Array:
  return v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(v.dtype).tiny)


def _start(size: int, dtype: DTypeLike) -> jax.Array:
  return _normalized(1.0 + jnp.arange(size, dtype=dtype) / size)


def largest_eigenvalue(system: jax.Array) -> jax.Array:
  """Power-iteration estimate of the largest eigenvalue of a symmetric ``system``.

  Needs no factorisation, so it is available when the Cholesky one failed.

  Example:
    >>> round(float(largest_eigenvalue(jnp.diag(jnp.asarray([1.0, 4.0, 2.0])))), 3)
    4.0
  """
  size = system.shape[-1]
  if size == 0:
    return jnp.zeros([], system.dtype)

  def power(_: jax.Array, v: jax.Array) -> jax.Array:
    return _normalized(jnp.matmul(system, v, precision=_HIGHEST))

  top = jax.lax.fori_loop(0, _POWER_ITERATIONS, power, _start(size, system.dtype))
  return top @ jnp.matmul(system, top, precision=_HIGHEST)


# Compiled once per shape: eager calls would otherwise re-trace the iterations'
# loops (new closures) on every call.
_largest_eigenvalues = jax.jit(jax.vmap(largest_eigenvalue))
_condition_estimates = jax.jit(jax.vmap(condition_estimate))


def _is_concrete(*values: Any) -> bool:
  return not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(values))


class _Context(NamedTuple):
  """What the report says besides the numbers (static)."""

  dtype_name: str
  eps: float
  relative: bool
  name: str


def _cure(relative: bool) -> str:
  return (
    'standardise the inputs (mean 0, std 1) or pass relative_lam=True'
    if not relative
    else 'standardise the inputs (mean 0, std 1) or raise lam'
  )


def _report(
  context: _Context,
  condition: ArrayLike,
  largest: ArrayLike,
  ridges: ArrayLike,
  valid: ArrayLike,
  factored: ArrayLike,
  nonfinite: ArrayLike,
) -> None:
  """Warns about the worst feature group's solve, if it was bad (host side).

  Args:
    context: dtype, eps, ridge kind and layer name.
    condition: per group, the estimated condition number (NaN where the
      factorisation failed).
    largest: per group, the largest eigenvalue of ``A^T A / N + ridge I``.
    ridges: per group, the ridge (lambda, relative or not).
    valid: per group, whether the ridge was a valid number.
    factored: per group, whether the Cholesky factor is finite.
    nonfinite: per group, how many entries of the statistic are NaN or inf.
  """
  condition, largest, ridges = (np.asarray(v, np.float64) for v in (condition, largest, ridges))
  valid, factored, nonfinite = (np.asarray(v) for v in (valid, factored, nonfinite))
  of = f' of {context.name!r}' if context.name else ''
  groups = f' (in {int(np.sum(~valid))} of {valid.size} feature groups)' if valid.size > 1 else ''
  if not np.all(valid):
    bad = float(ridges[~valid][0])
    warnings.warn(
      f'TrAct: the ridge of the kernel{of} is {bad!r} at run time{groups}, not a '
      f'finite normal {context.dtype_name} number > 0 (an injected, traced or '
      'scheduled lam that reached 0 or went negative, or a relative ridge that '
      'under- or overflowed), so its TrAct gradient is NaN; optax.apply_if_finite '
      'after tract skips such steps. Keep lambda > 0.',
      ConditioningWarning,
      stacklevel=2,
    )
    return
  if np.any(nonfinite):
    count = int(np.sum(nonfinite))
    warnings.warn(
      f'TrAct: the statistic of the kernel{of} holds {count} non-finite '
      f"entr{'y' if count == 1 else 'ies'} (NaN or inf in the layer's input), so "
      'its Cholesky factorisation failed and its TrAct gradient is NaN. Check '
      'the input pipeline; optax.apply_if_finite after tract skips such steps.',
      ConditioningWarning,
      stacklevel=2,
    )
    return
  if not np.all(factored):
    failed = np.flatnonzero(~factored)
    group = int(failed[np.argmax(largest[failed] / ridges[failed])])
    top, ridge = float(largest[group]), float(ridges[group])
    groups = f' (in {failed.size} of {factored.size} feature groups)' if factored.size > 1 else ''
    warnings.warn(
      f'TrAct: the Cholesky factorisation of the system solved for the '
      f'kernel{of} failed in {context.dtype_name}{groups}, so its TrAct gradient '
      f'is NaN. The system A^T A / N + ridge I has largest eigenvalue ~{top:.3g} '
      f'against a ridge of {ridge:.3g}: {context.dtype_name} rounding of the '
      f'statistic (eps {context.eps:.1g} x {top:.3g} = {context.eps * top:.2g}) '
      f'reaches the ridge; {_cure(context.relative)}.' + docs_link.see('lambda', 'Conditioning'),
      ConditioningWarning,
      stacklevel=2,
    )
    return
  worst = float(np.max(condition)) if condition.size else 1.0
  if not math.isfinite(worst) or context.eps * worst <= CONDITION_TOLERANCE:
    return
  warnings.warn(
    f'TrAct: the system solved for the kernel{of} has condition number '
    f'~{worst:.2g}, too large for {context.dtype_name} (eps {context.eps:.1g}): the '
    f'relative error of its TrAct gradient can reach eps x condition = '
    f'{context.eps * worst:.1g}. The usual cause is unscaled inputs (e.g. raw '
    f'0..255 pixels) with an absolute lambda; {_cure(context.relative)}.',
    ConditioningWarning,
    stacklevel=2,
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
    stats: the layer's input statistic (``dense_stats``,
      ``conv_stats``), with ``n = prod(kernel.shape[:-1])``.
    lam: the ridge strength lambda (> 0); a float or a scalar array.
    relative_lam: use the ridge ``lam * trace(A^T A / N) / n`` (per feature
      group) instead of ``lam``, which makes the update invariant to the
      input's scale.
    check_condition: whether to warn (a ``ConditioningWarning``) when
      the system is too ill-conditioned for its float type, its Cholesky
      factorisation failed (the result is NaN), or a traced ridge is not
      valid. None (default): for concrete (eager) values only; True: inside
      ``jit``, ``pmap`` and ``shard_map`` too (via ``jax.debug.callback``);
      False: never (no estimate is computed).
    name: the layer's name for messages.

  Returns:
    ``(A^T A / N + lam I)^{-1} G`` reshaped to ``grad_kernel``'s shape and dtype;
    the solve runs in float32, or float64 for float64 statistics. All NaN if
    a traced ridge is not a finite normal number > 0 at run time, or the
    factorisation fails.

  Raises:
    ValueError: if the statistic's ``n`` or groups do not fit the kernel, or
      ``lam`` is not a scalar, or a concrete ``lam`` is not a finite normal
      float32 number > 0.
    TypeError: if ``stats`` is not a well-formed TractStats, or
      ``grad_kernel`` is not floating-point.

  Warns:
    ConditioningWarning: see ``check_condition``.

  Example:
    >>> import jax.numpy as jnp
    >>> stats = tract_optax.dense_stats(jnp.zeros((16, 3)))  # A^T A = 0
    >>> g = tract_optax.precondition(jnp.ones((3, 2)), stats, lam=0.5)
    >>> [round(v, 5) for v in g[0].tolist()]  # G / lam
    [2.0, 2.0]
  """
  return precondition_layer(
    grad_kernel,
    stats,
    lam,
    relative_lam=relative_lam,
    check_condition=check_condition,
    name=name,
  )


def precondition_layer(
  grad_kernel: jax.Array,
  stats: TractStats,
  lam: Union[float, jax.Array],
  *,
  relative_lam: bool = False,
  check_condition: Optional[bool] = None,
  name: Optional[str] = None,
  cotangent: Optional[jax.Array] = None,
) -> jax.Array:
  """``precondition``, optionally from the layer's output cotangent ``d``.

  With ``cotangent`` (``(N, m)``, its rows those of ``stats.rows``, which
  must then be in the rows form) the result is ``A^T (A A^T / N + lam I)^{-1}
  d``, equal to the TrAct gradient of ``G = A^T d`` without the Woodbury
  form's cancellation (the layer ops, ``tract_optax._src.layer_ops``).
  """
  if not isinstance(stats, TractStats):
    raise TypeError(f'stats must be a tract_optax.TractStats, got {type(stats)}.')
  stats.validate('precondition')
  shape = grad_kernel.shape
  if len(shape) < 2:
    raise ValueError(f'grad_kernel must be at least 2-D (n_in, n_out); got {shape}.')
  grad_dtype = jnp.result_type(grad_kernel)
  if not jnp.issubdtype(grad_dtype, jnp.floating):
    raise TypeError(
      f'grad_kernel must be a floating-point gradient; got dtype {grad_dtype} '
      '(its TrAct gradient would be truncated to integers, mostly zeros). Pass '
      "the kernel's gradient from jax.grad, or cast it: grad.astype(jnp.float32)."
    )
  if jnp.ndim(lam) != 0:
    raise ValueError(
      f'lam must be a scalar (the ridge strength lambda); got shape {jnp.shape(lam)}.'
    )
  if _is_concrete(lam):  # known now: refuse at once; a traced one is guarded below
    ridge_lib.validate_lam(lam)
  n, m = math.prod(shape[:-1]), shape[-1]
  groups = stats.groups
  # validated above: exactly one of moment and rows is set
  data = cast(jax.Array, stats.moment if stats.moment is not None else stats.rows)
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
  check = bool(check_condition) or (
    check_condition is None and _is_concrete(stats, lam, grad_kernel)
  )
  if cotangent is not None and (stats.rows is None or cotangent.shape[0] != stats.rows.shape[-2]):
    raise ValueError(
      f'precondition: an output cotangent of {cotangent.shape[0]} rows needs a statistic '
      'holding those rows.'
    )
  result, values = _solve(
    grad_kernel, stats, lam, cotangent, relative_lam=relative_lam, check=check
  )
  if values is not None:
    dtype = jnp.promote_types(data.dtype, jnp.float32)
    context = _Context(jnp.dtype(dtype).name, float(jnp.finfo(dtype).eps), relative_lam, name or '')
    if _is_concrete(values):
      _report(context, *values)
    else:
      jax.debug.callback(functools.partial(_report, context), *values)
  return result


@functools.partial(jax.jit, static_argnames=('relative_lam', 'check'))
def _solve(
  grad_kernel: jax.Array,
  stats: TractStats,
  lam: Union[float, jax.Array],
  cotangent: Optional[jax.Array],
  *,
  relative_lam: bool,
  check: bool,
) -> Tuple[jax.Array, Optional[_Checked]]:
  """The solve (and, with ``check``, the numbers the report needs), compiled once per shape."""
  shape = grad_kernel.shape
  n, m = math.prod(shape[:-1]), shape[-1]
  groups = stats.groups
  data = cast(jax.Array, stats.moment if stats.moment is not None else stats.rows)
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
      rows = cast(jax.Array, stats.rows).astype(dtype).reshape(groups, -1, n)
      count = jnp.asarray(stats.count, dtype)
      if cotangent is None:
        solved, system, factor = jax.vmap(_solve_woodbury, (0, None, 0, 0))(
          rows, count, grad, safe_ridges
        )
      else:  # (N, m) -> (groups, N, m / groups), output features grouped as the kernel's
        out = cotangent.astype(dtype).reshape(cotangent.shape[0], groups, m // groups)
        solved, system, factor = jax.vmap(_solve_identity, (0, None, 1, 0))(
          rows, count, out, safe_ridges
        )
    solved = jnp.where(valid[:, None, None], solved, jnp.nan)
    values = None
    if check:
      largest = _largest_eigenvalues(system)
      smallest = None  # estimated, unless the Woodbury form's cancellation decides
      if stats.moment is not None:
        unit = jnp.ones([], dtype)
      else:
        count = jnp.asarray(stats.count, dtype)
        if cotangent is None:  # the n x n system's condition, which the cancellation shares
          smallest = count * safe_ridges
        unit = jnp.where(count > 0, count, jnp.ones_like(count))  # N (lam I + M) -> n x n
      condition = _condition_estimates(system, factor, largest, smallest)
      values = (
        condition,
        largest / unit,
        ridges,
        valid,
        jnp.all(jnp.isfinite(factor), axis=(-2, -1)),
        jnp.sum(~jnp.isfinite(data.reshape(groups, -1)), axis=-1),
      )
  return jnp.moveaxis(solved, 0, 1).reshape(shape).astype(grad_kernel.dtype), values
