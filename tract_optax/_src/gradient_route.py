"""The gradient route: TrAct gradients straight out of backpropagation.

The authors' PyTorch code wraps the first layer in a custom autograd function,
so the kernel's gradient comes out of backpropagation already preconditioned
and no optimizer, trainer or loop changes. :func:`tract_kernel` is the JAX
equivalent, free of any framework: an identity on the kernel whose
``custom_vjp`` replaces the kernel's cotangent ``G`` (the gradient of
everything that flows through the kernel after this point) by its TrAct
gradient, solved with the layer's input statistic.

Use the returned kernel in place of the stored one for the layer's
computation. The backward pass is linear in the cotangent: accumulating
micro-batches (a ``lax.scan``, ``optax.MultiSteps``) gives the mean of each
micro-batch's TrAct gradient with its own statistic, as the Optax route does
with ``tract`` outside ``MultiSteps``; a ``pmean`` of gradients gives the
whole batch's update when the statistic is all-reduced (``axis_name``).
Weight decay written into the loss never passes through it (as in the
authors' code). The Flax glue (:func:`tract_optax.linen.apply_tract`,
:func:`tract_optax.nnx.apply_tract`) does the substitution for you.
"""

from __future__ import annotations

import functools
import math
from typing import Hashable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from tract_optax._src import axes as axes_lib
from tract_optax._src import ridge as ridge_lib
from tract_optax._src import transform
from tract_optax._src.precondition import precondition
from tract_optax._src.stats import TractStats, all_reduce_stats


class _Settings(NamedTuple):
  axis_name: Optional[Hashable]
  relative_lam: bool
  channels_first: bool
  check_condition: bool
  name: Optional[str]


def _to_flax_layout(kernel: jax.Array) -> jax.Array:
  """``(out, in / groups, *window)`` (PyTorch, Equinox, lax 'OI...') to Flax."""
  order = tuple(range(2, kernel.ndim)) + (1, 0)
  return jnp.transpose(kernel, order)


def _from_flax_layout(kernel: jax.Array) -> jax.Array:
  ndim = kernel.ndim
  order = (ndim - 1, ndim - 2) + tuple(range(ndim - 2))
  return jnp.transpose(kernel, order)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tract_identity(settings: _Settings, kernel, stats, lam):
  del settings, stats, lam
  return kernel


def _forward(settings, kernel, stats, lam):
  del settings
  return kernel, (stats, lam)


def _backward(settings, residuals, cotangent):
  local_stats, lam = residuals
  stats = local_stats
  if settings.axis_name is not None:
    stats = all_reduce_stats(local_stats, settings.axis_name)
  grad = _to_flax_layout(cotangent) if settings.channels_first else cotangent
  solved = precondition(
    grad,
    stats,
    lam,
    relative_lam=settings.relative_lam,
    check_condition=settings.check_condition,
    name=settings.name,
  )
  if settings.channels_first:
    solved = _from_flax_layout(solved)
  transform.remember_preconditioned(solved)
  # the statistic and lambda get no gradient
  zeros = jax.tree_util.tree_map(jnp.zeros_like, (local_stats, lam))
  return (solved,) + zeros


_tract_identity.defvjp(_forward, _backward)


def check_fits(kernel_shape, stats: TractStats, channels_first: bool = False) -> None:
  """Raises ``ValueError`` unless ``stats`` fits a kernel of ``kernel_shape``."""
  if len(kernel_shape) < 2:
    raise ValueError(f'A kernel must be at least 2-D; got shape {kernel_shape}.')
  if channels_first:
    n, m = math.prod(kernel_shape[1:]), kernel_shape[0]
  else:
    n, m = math.prod(kernel_shape[:-1]), kernel_shape[-1]
  if stats.num_features != n or m % stats.groups:
    layout = '(out, in / groups, *window)' if channels_first else '(*window, in / groups, out)'
    raise ValueError(
      f'The statistic (n = {stats.num_features} features, {stats.groups} '
      f'group(s)) does not fit the kernel of shape {kernel_shape} in layout '
      f"{layout}, which needs n = {n}. Was it computed from this layer's "
      'input with its kernel size, padding and feature groups'
      + ('' if channels_first else ', or is the kernel channels-first (pass channels_first=True)')
      + '?'
    )


def check_settings(
  lam, axis_name: axes_lib.AxisName, local_stats: bool, owner: str
) -> axes_lib.AxisName:
  """Checks the gradient route's settings up front; returns the axes to reduce.

  Raises:
    TypeError: ``lam`` is a schedule (the route takes its value).
    ValueError: ``lam`` is not a finite number > 0, or named axes are misused.
  """
  if callable(lam):
    raise TypeError(
      f'{owner} takes the value of lambda, not a schedule; evaluate the '
      f'schedule at the step: {owner}(..., lam=schedule(state.step)).'
    )
  ridge_lib.validate_lam(lam)
  reduce_over = axes_lib.resolve_axis_name(axis_name, local_stats, owner=owner)
  return tuple(reduce_over) if isinstance(reduce_over, list) else reduce_over


def tract_kernel(
  kernel: jax.Array,
  stats: TractStats,
  *,
  lam: Union[float, jax.Array] = 0.1,
  axis_name: axes_lib.AxisName = None,
  local_stats: bool = False,
  relative_lam: bool = False,
  channels_first: bool = False,
  check_condition: Optional[bool] = None,
  name: Optional[str] = None,
) -> jax.Array:
  """The kernel, unchanged, whose gradient is the TrAct gradient.

  Args:
    kernel: the layer's stored kernel: Flax layout ``(*window, c_in / groups,
      c_out)`` / ``(n_in, n_out)``, or with ``channels_first=True`` PyTorch /
      Equinox layout ``(c_out, c_in / groups, *window)`` / ``(n_out, n_in)``.
    stats: the statistic of this layer's input in this forward pass
      (:func:`~tract_optax.dense_stats`, :func:`~tract_optax.conv_stats`;
      gradients do not flow into it).
    lam: the ridge strength lambda > 0: a number or a scalar array (e.g. a
      schedule's value the caller computed).
    axis_name: the ``pmap``/``shard_map`` axis (or axes) that split the batch:
      the statistic is all-reduced in the backward pass. Not needed under
      ``jit`` with a sharded batch.
    local_stats: inside ``pmap``/``shard_map``, use each device's own
      statistic on purpose.
    relative_lam: ridge ``lam * trace(A^T A / N) / n`` (scale-invariant).
    channels_first: the kernel is in PyTorch / Equinox layout.
    check_condition: warn when the solve is ill-conditioned (None: eager
      only; True: inside ``jit`` too; False: never).
    name: the layer's name for messages.

  Returns:
    ``kernel`` itself in the forward pass; its cotangent ``G`` becomes
    ``(A^T A / N + lam I)^{-1} G`` in the backward pass.

  Raises:
    ValueError: ``lam`` is not a finite number > 0, the statistic does not fit
      the kernel, or named axes are misused (see :func:`tract_optax.tract`).
    TypeError: ``lam`` is a schedule, or ``stats`` is no TractStats.
    RuntimeError: this JAX version cannot tell whether named axes are bound
      and neither ``axis_name`` nor ``local_stats`` was given.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> w = jnp.ones((3, 2))
    >>> loss = lambda w: jnp.sum(x @ tract_kernel(w, tract_optax.dense_stats(x)))
    >>> g = jax.grad(loss)(w)
    >>> plain = jax.grad(lambda w: jnp.sum(x @ w))(w)
    >>> stats = tract_optax.dense_stats(x)
    >>> bool(jnp.allclose(g, tract_optax.precondition(plain, stats, 0.1), atol=1e-5))
    True
  """
  reduce_over = check_settings(lam, axis_name, local_stats, 'tract_kernel')
  if not isinstance(stats, TractStats):
    raise TypeError(f'stats must be a tract_optax.TractStats, got {type(stats)}.')
  stats.validate('tract_kernel')
  check_fits(jnp.shape(kernel), stats, channels_first)
  stats = jax.tree_util.tree_map(jax.lax.stop_gradient, stats)
  dtype = jnp.promote_types(
    jnp.result_type(*[leaf for leaf in jax.tree_util.tree_leaves(stats)]), jnp.float32
  )
  settings = _Settings(
    reduce_over, bool(relative_lam), bool(channels_first), bool(check_condition), name
  )
  return _tract_identity(settings, kernel, stats, jnp.asarray(lam, dtype))
