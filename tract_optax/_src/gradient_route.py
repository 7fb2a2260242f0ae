"""The gradient route: TrAct gradients straight out of backpropagation.

The authors' PyTorch code wraps the first layer in a custom autograd function,
so the kernel's gradient comes out of backpropagation already preconditioned
and no optimizer, trainer or loop changes. ``tract_kernel`` is the JAX
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
authors' code). The Flax glue (``tract_optax.linen.apply_tract``,
``tract_optax.nnx.apply_tract``) and the Equinox helpers
(``tract_optax.equinox``) do the substitution for you.

One statistic per batch. TrAct's statistic is that of every row the layer
saw in the step. Two things split the rows silently unless refused:

- ``jax.vmap`` over examples (per-example gradients, Equinox's
  ``jax.vmap(model)(x)`` with the kernel swapped inside the vmap): each lane
  would be preconditioned with its own example's statistic. A batching rule
  sees the batched statistic and refuses it; an unbatched statistic with
  batched kernels (an ensemble of models on shared data) is exact. Compute
  the statistic of the whole batch outside the vmap (or name the vmap's axis
  and pass ``axis_name``), or opt in with ``per_lane_stats=True`` where each
  lane really is an independent model on its own data, with its own
  (batched) kernel; with a kernel shared by the lanes the summed gradient
  would mix every lane's statistic with every lane's gradient, so the rule
  refuses that too.
- Several calls in one loss (two views of a batch): each call's kernel is
  preconditioned with that call's statistic, and the gradients of the calls
  are summed: ``sum_v P_v G_v``, where the Optax route (its capture combines
  the calls' statistics) gives ``P (sum_v G_v)``. The two routes agree when
  the layer is called once per step; for several views, call the layer once
  on the concatenated views (then split its output), or wrap the kernel once
  with the combined statistic (``tract_optax.combine_stats``) and use
  that one wrapped kernel in every call.

A kernel wrapped twice (``tract_kernel(tract_kernel(w, s), s)``, or the
output of ``tract_optax.dense`` / ``tract_optax.conv`` wrapped again)
would be preconditioned twice. The trace shows it: the kernel handed in is
the direct output of this module's custom VJP, which is refused. A wrapped
kernel passed through other operations first (a reshape, a cast) is not
detected (docs/routes.md, "A kernel wrapped twice").

For the first layer itself prefer the layer ops ``tract_optax.conv`` and
``tract_optax.dense``: they compute the statistic from the layer's own
input and geometry, so it cannot disagree with the layer.

Forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``)
with respect to the wrapped kernel is not defined: the custom VJP only
replaces the reverse-mode gradient. Differentiate the plain model (the stored
kernel, no ``tract_kernel``) for Jacobian-vector products and second-order
quantities. Forward-over-reverse (``jax.jvp`` of ``jax.grad``,
``jax.hessian``) through a wrapped kernel runs, but gives TrAct's
preconditioner applied to the Hessian, ``P H v``, not ``H v``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from tract_optax._src import axes as axes_lib
from tract_optax._src import docs_link, jax_compat, lanes
from tract_optax._src import ridge as ridge_lib
from tract_optax._src.precondition import precondition
from tract_optax._src.stats import TractStats, all_reduce_stats


class _Settings(NamedTuple):
  relative_lam: bool
  channels_first: bool
  check_condition: Optional[bool]  # None: eager calls only (see precondition)
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
def _tract_identity(
  settings: _Settings, kernel: jax.Array, stats: TractStats, lam: jax.Array
) -> jax.Array:
  del settings, stats, lam
  return kernel


def _forward(
  settings: _Settings, kernel: jax.Array, stats: TractStats, lam: jax.Array
) -> Tuple[jax.Array, Tuple[TractStats, jax.Array]]:
  del settings
  return kernel, (stats, lam)


def _backward(
  settings: _Settings, residuals: Tuple[TractStats, jax.Array], cotangent: jax.Array
) -> Tuple[jax.Array, TractStats, jax.Array]:
  stats, lam = residuals  # already all-reduced in the forward pass
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
  # the statistic and lambda get no gradient
  zeros = jax.tree_util.tree_map(jnp.zeros_like, (stats, lam))
  return (solved,) + zeros


_tract_identity.defvjp(_forward, _backward)


_FLAX_LAYOUT = '(*window, in / groups, out)'
_CHANNELS_FIRST_LAYOUT = '(out, in / groups, *window)'


def _fits(kernel_shape: Tuple[int, ...], stats: TractStats, channels_first: bool) -> bool:
  if channels_first:
    n, m = math.prod(kernel_shape[1:]), kernel_shape[0]
  else:
    n, m = math.prod(kernel_shape[:-1]), kernel_shape[-1]
  return stats.num_features == n and m % stats.groups == 0


def resolve_layout(
  kernel_shape: Sequence[int],
  stats: TractStats,
  channels_first: Optional[bool],
  owner: str = 'tract_kernel',
) -> bool:
  """Whether the kernel is channels-first, checked against the statistic.

  With ``channels_first=None`` the layout is read off the shapes: the one of
  Flax's ``(*window, in / groups, out)`` and PyTorch / Equinox's
  ``(out, in / groups, *window)`` whose ``n`` matches the statistic. When
  both match (a square Dense kernel, a conv kernel with as many output
  channels as its first window size) the shapes cannot tell, and the caller
  must say it.

  Args:
    kernel_shape: the kernel's shape.
    stats: the layer's input statistic.
    channels_first: the caller's word on the layout, or None to infer it.
    owner: the API to name in messages.

  Returns:
    True for PyTorch / Equinox layout, False for Flax layout.

  Raises:
    ValueError: the kernel is not at least 2-D, the statistic fits no layout
      (or not the one given), or the layout is ambiguous and not given.
  """
  kernel_shape = tuple(kernel_shape)
  if len(kernel_shape) < 2:
    raise ValueError(f'{owner}: a kernel must be at least 2-D; got shape {kernel_shape}.')
  if channels_first is not None:
    channels_first = bool(channels_first)
    if _fits(kernel_shape, stats, channels_first):
      return channels_first
    layout = _CHANNELS_FIRST_LAYOUT if channels_first else _FLAX_LAYOUT
    n = math.prod(kernel_shape[1:] if channels_first else kernel_shape[:-1])
    other = _fits(kernel_shape, stats, not channels_first)
    raise ValueError(
      f'{owner}: the statistic (n = {stats.num_features} features, {stats.groups} '
      f'group(s)) does not fit the kernel of shape {kernel_shape} in layout '
      f'{layout}, which needs n = {n}. '
      + (
        f'It fits the other layout: pass channels_first={not channels_first}.'
        if other
        else "Was it computed from this layer's input with its kernel size, "
        'padding and feature groups?'
      )
    )
  flax, first = _fits(kernel_shape, stats, False), _fits(kernel_shape, stats, True)
  if flax and first:
    raise ValueError(
      f'{owner}: the kernel of shape {kernel_shape} fits the statistic (n = '
      f'{stats.num_features}) in both layouts, so its shape cannot tell which axis holds '
      'the outputs. Pass channels_first=True for PyTorch / Equinox kernels '
      f'{_CHANNELS_FIRST_LAYOUT}, channels_first=False for Flax kernels {_FLAX_LAYOUT}.'
      + docs_link.see('numerics', 'Layout')
    )
  if flax or first:
    return first
  raise ValueError(
    f'{owner}: the statistic (n = {stats.num_features} features, {stats.groups} '
    f'group(s)) fits the kernel of shape {kernel_shape} in neither layout: Flax '
    f'{_FLAX_LAYOUT} needs n = {math.prod(kernel_shape[:-1])}, PyTorch / Equinox '
    f'{_CHANNELS_FIRST_LAYOUT} needs n = {math.prod(kernel_shape[1:])}. Was it '
    "computed from this layer's input with its kernel size, padding and "
    'feature groups?'
  )


def _tract_backward_functions() -> Tuple[object, ...]:
  """The backward functions of the custom VJPs that precondition a kernel."""
  from tract_optax._src import layer_ops  # pylint: disable=g-import-not-at-top

  return (_backward, layer_ops.backward_function())


def check_not_wrapped(kernel: jax.Array, owner: str, name: Optional[str]) -> None:
  """Refuses a kernel that is already the output of a TrAct custom VJP.

  Raises:
    ValueError: ``kernel`` comes straight out of ``tract_kernel`` (or a layer
      op): its gradient would be preconditioned twice.
  """
  producer = jax_compat.custom_vjp_backward(kernel)
  if producer is not None and producer in _tract_backward_functions():
    where = f' for {name!r}' if name else ''
    raise ValueError(
      f'{owner}{where}: the kernel is already TrAct-wrapped (the output of tract_kernel, '
      'tract_layer or a layer op), so its gradient would be preconditioned twice. Wrap '
      'the stored kernel once.' + docs_link.see('routes', 'A kernel wrapped twice')
    )


_FORWARD_MODE_MESSAGE = (
  'tract_kernel{where}: forward-mode differentiation (jax.jvp, jax.jacfwd, jax.linearize) '
  'through a TrAct-wrapped kernel is not defined: TrAct replaces only the reverse-mode '
  'gradient. For JVPs and Hessians differentiate the plain model (jvp of grad through it '
  'gives P H v, not H v).' + docs_link.see('limits', 'Forward-mode differentiation')
)


def _forward_mode_error(name: Optional[str]) -> TypeError:
  return TypeError(_FORWARD_MODE_MESSAGE.format(where=f' ({name!r})' if name else ''))


def check_settings(
  lam: Union[float, jax.Array], axis_name: axes_lib.AxisName, local_stats: bool, owner: str
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


def kernel_wrapper(
  owner: str,
  *,
  lam: Union[float, jax.Array],
  axis_name: axes_lib.AxisName,
  local_stats: bool,
  relative_lam: bool,
  check_condition: Optional[bool],
  per_lane_stats: bool,
) -> Callable[..., jax.Array]:
  """``tract_kernel`` with a glue's settings bound, checked up front.

  For the Flax glue's ``apply_tract`` (``owner`` in messages): its kernels
  are channels-last, so ``channels_first=False`` (a square Dense is
  ambiguous by shape). The result takes ``(kernel, stats, name=...)``.

  Raises:
    TypeError, ValueError: as ``check_settings``.
  """
  check_settings(lam, axis_name, local_stats, owner)
  return functools.partial(
    tract_kernel,
    lam=lam,
    axis_name=axis_name,
    local_stats=local_stats,
    relative_lam=relative_lam,
    channels_first=False,
    check_condition=check_condition,
    per_lane_stats=per_lane_stats,
  )


def tract_kernel(
  kernel: jax.Array,
  stats: TractStats,
  *,
  lam: Union[float, jax.Array] = 0.1,
  axis_name: axes_lib.AxisName = None,
  local_stats: bool = False,
  relative_lam: bool = False,
  channels_first: Optional[bool] = None,
  check_condition: Optional[bool] = None,
  per_lane_stats: bool = False,
  name: Optional[str] = None,
) -> jax.Array:
  """The kernel, unchanged, whose gradient is the TrAct gradient.

  Wrap the kernel once per step, with the statistic of every row the layer
  sees in the step, outside any ``jax.vmap`` over examples (see the module
  notes: per-example ``vmap`` and several calls in one loss).

  Args:
    kernel: the layer's stored kernel: Flax layout ``(*window, c_in / groups,
      c_out)`` / ``(n_in, n_out)``, or PyTorch / Equinox layout ``(c_out,
      c_in / groups, *window)`` / ``(n_out, n_in)``.
    stats: the statistic of this layer's input in this forward pass
      (``dense_stats``, ``conv_stats``;
      gradients do not flow into it).
    lam: the ridge strength lambda > 0: a number or a scalar array (e.g. a
      schedule's value the caller computed).
    axis_name: the axis (or axes) of ``pmap`` / ``shard_map`` / ``vmap`` that
      split the batch: the statistic is all-reduced over them (in the forward
      pass, where the axes are bound). Not needed under ``jit`` with a
      sharded batch.
    local_stats: inside ``pmap``/``shard_map``, use each device's own
      statistic on purpose.
    relative_lam: ridge ``lam * trace(A^T A / N) / n`` (scale-invariant).
    channels_first: the kernel's layout: True for PyTorch / Equinox, False
      for Flax; None (default) reads it off the shapes, and refuses a kernel
      that fits the statistic both ways (a square Dense kernel; a conv kernel
      whose output channels equal its first window size).
    check_condition: warn (a ``ConditioningWarning``) when
      the solve is ill-conditioned. None (default): when the backward pass
      runs eagerly (``jax.grad`` outside ``jit``); True: inside ``jit`` too;
      False: never.
    per_lane_stats: under ``jax.vmap``, accept a statistic that differs
      from lane to lane: only for independent models, each with its own
      kernel (batched: ``vmap(grad)`` over stacked kernels) and its own data.
      A kernel shared by the lanes (``grad`` of a ``vmap``) is refused.
    name: the layer's name for messages.

  Returns:
    ``kernel`` itself in the forward pass; its cotangent ``G`` becomes
    ``(A^T A / N + lam I)^{-1} G`` in the backward pass.

  Raises:
    ValueError: ``lam`` is not a finite number > 0, the statistic does not fit
      the kernel, the layout is ambiguous and not given, named axes are
      misused (see ``tract_optax.tract``), (when traced under
      ``jax.vmap``) the statistic is batched without ``per_lane_stats``, or
      with it while the kernel is shared by the lanes, or the kernel is
      already the output of ``tract_kernel`` (wrapped twice).
    TypeError: ``lam`` is a schedule, ``stats`` is no TractStats, or the
      kernel is differentiated in forward mode (``jax.jvp``, ``jax.jacfwd``).

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

  References:
    Petersen, Borgelt, Ermon: "TrAct: Making First-layer Pre-Activations
    Trainable", NeurIPS 2024, arXiv:2410.23970,
    <https://arxiv.org/abs/2410.23970>.
  """
  reduce_over = check_settings(lam, axis_name, local_stats, 'tract_kernel')
  if not isinstance(stats, TractStats):
    raise TypeError(f'stats must be a tract_optax.TractStats, got {type(stats)}.')
  stats.validate('tract_kernel')
  channels_first = resolve_layout(jnp.shape(kernel), stats, channels_first)
  if jax_compat.is_forward_mode_tracer(kernel):
    raise _forward_mode_error(name)
  check_not_wrapped(kernel, 'tract_kernel', name)
  stats = jax.tree_util.tree_map(jax.lax.stop_gradient, stats)
  if reduce_over is not None:
    # In the forward pass, where the named axes are bound (a vmap's axis is
    # not bound any more when its backward pass is traced).
    stats = all_reduce_stats(stats, reduce_over)
  stats = lanes.lane_guard(name, bool(per_lane_stats))(jax.lax.stop_gradient(kernel), stats)
  dtype = jnp.promote_types(
    jnp.result_type(*[leaf for leaf in jax.tree_util.tree_leaves(stats)]), jnp.float32
  )
  settings = _Settings(bool(relative_lam), channels_first, check_condition, name)
  try:
    return _tract_identity(settings, kernel, stats, jnp.asarray(lam, dtype))
  except TypeError as error:  # JAX's generic message for jvp of a custom_vjp
    if 'forward-mode' in str(error):
      raise _forward_mode_error(name) from error
    raise
