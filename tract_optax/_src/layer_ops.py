"""Layer ops: a first layer and its TrAct gradient from one input and one geometry.

``conv(x, kernel, ...)`` takes ``jax.lax.conv_general_dilated``'s arguments and
``dense(x, kernel)`` computes ``x @ kernel``; each returns the layer's output,
and ``jax.grad`` through it gives the kernel its TrAct gradient. The statistic
is computed inside the op from the very ``x`` and geometry the layer uses
(``conv_stats`` / ``dense_stats``), so it
cannot disagree with the layer: no padding, stride or patch order is written
twice.

The op is a ``custom_vjp`` around the layer: its backward pass takes the
layer's ordinary VJP (the input's gradient is unchanged) and replaces the
kernel's by the TrAct gradient. Having the output cotangent ``d`` and the rows
``A``, it uses ``(A^T A / N + lam I)^{-1} A^T d = A^T (A A^T / N + lam I)^{-1}
d`` when the statistic keeps the rows (``N < n``), which avoids the Woodbury
form's cancellation; otherwise the moment form of
``precondition``. Everything else (axes, lanes, checks) is
``tract_kernel``'s.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from tract_optax._src import axes as axes_lib
from tract_optax._src import conv as conv_lib
from tract_optax._src import gradient_route, jax_compat, lanes
from tract_optax._src import stats as stats_lib
from tract_optax._src.precondition import precondition_layer
from tract_optax._src.stats import TractStats, all_reduce_stats

Padding = Union[str, Sequence[Tuple[int, int]]]


class _Layer(NamedTuple):
  """The layer's static description (hashable: a ``custom_vjp`` static argument)."""

  dimension_numbers: Optional[jax.lax.ConvDimensionNumbers]  # None: dense
  strides: Tuple[int, ...]
  padding: Tuple[Tuple[int, int], ...]
  lhs_dilation: Tuple[int, ...]
  rhs_dilation: Tuple[int, ...]
  groups: int
  precision: stats_lib.PrecisionLike
  relative_lam: bool
  check_condition: Optional[bool]
  name: Optional[str]
  rows_are_local: bool  # the statistic's rows are this call's rows (not gathered)


def _apply(layer: _Layer, x: jax.Array, kernel: jax.Array) -> jax.Array:
  if layer.dimension_numbers is None:
    return jnp.matmul(x, kernel, precision=layer.precision)
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    layer.strides,
    layer.padding,
    layer.lhs_dilation,
    layer.rhs_dilation,
    layer.dimension_numbers,
    layer.groups,
    precision=layer.precision,
  )


def _flax_order(layer: _Layer, ndim: int) -> Tuple[int, ...]:
  """Axes of the kernel in Flax order ``(*window, in / groups, out)``."""
  if layer.dimension_numbers is None:
    return tuple(range(ndim))
  out_dim, in_dim, *spatial = layer.dimension_numbers.rhs_spec
  return tuple(spatial) + (in_dim, out_dim)


def _output_rows(layer: _Layer, out: jax.Array) -> jax.Array:
  """The output (or its cotangent) as ``(N, m)`` rows, ordered as the patch rows."""
  if layer.dimension_numbers is not None:
    batch, feature, *spatial = layer.dimension_numbers.out_spec
    out = jnp.transpose(out, (batch, *spatial, feature))
  return out.reshape(-1, out.shape[-1])


#: What the forward pass keeps for the backward pass: ``x, kernel, stats, lam``.
_Residuals = Tuple[jax.Array, jax.Array, TractStats, jax.Array]
#: The backward pass's cotangents of ``x, kernel, stats, lam`` (the last two zero).
_Cotangents = Tuple[jax.Array, jax.Array, TractStats, jax.Array]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer_op(
  layer: _Layer, x: jax.Array, kernel: jax.Array, stats: TractStats, lam: jax.Array
) -> jax.Array:
  del stats, lam
  return _apply(layer, x, kernel)


def _forward(
  layer: _Layer, x: jax.Array, kernel: jax.Array, stats: TractStats, lam: jax.Array
) -> Tuple[jax.Array, _Residuals]:
  return _apply(layer, x, kernel), (x, kernel, stats, lam)


def _backward(layer: _Layer, residuals: _Residuals, cotangent: jax.Array) -> _Cotangents:
  x, kernel, stats, lam = residuals
  _, vjp = jax.vjp(functools.partial(_apply, layer), x, kernel)
  grad_x, grad_kernel = vjp(cotangent)
  order = _flax_order(layer, kernel.ndim)
  flax_grad = jnp.transpose(grad_kernel, order)
  identity = stats.rows is not None and layer.rows_are_local
  solved = precondition_layer(
    flax_grad,
    stats,
    lam,
    relative_lam=layer.relative_lam,
    check_condition=layer.check_condition,
    name=layer.name,
    cotangent=_output_rows(layer, cotangent) if identity else None,
  )
  solved = jnp.transpose(solved, tuple(np.argsort(order)))
  zeros = jax.tree_util.tree_map(jnp.zeros_like, (stats, lam))
  return (grad_x, solved) + zeros


_layer_op.defvjp(_forward, _backward)


def backward_function() -> Callable[[_Layer, _Residuals, jax.Array], _Cotangents]:
  """The layer ops' backward function (for the wrapped-twice check)."""
  return _backward


def _conv_stats(
  x: jax.Array, kernel_shape: Tuple[int, ...], layer: _Layer, precision: stats_lib.PrecisionLike
) -> TractStats:
  """The statistic of the patches the convolution's kernel multiplies."""
  dnums = layer.dimension_numbers
  assert dnums is not None
  batch, feature, *spatial = dnums.lhs_spec
  x = jnp.transpose(x, (batch, *spatial, feature))  # channels last, rhs-spatial order
  if any(d > 1 for d in layer.lhs_dilation):  # zeros between input positions
    config = [(0, 0, 0)] + [(0, 0, d - 1) for d in layer.lhs_dilation] + [(0, 0, 0)]
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
  window = tuple(kernel_shape[axis] for axis in dnums.rhs_spec[2:])
  return conv_lib.conv_stats(
    x,
    window,
    layer.strides,
    layer.padding,
    layer.rhs_dilation,
    feature_group_count=layer.groups,
    precision=precision,
  )


def _call(
  x: jax.Array,
  kernel: jax.Array,
  layer: _Layer,
  stats_of: Callable[[jax.Array], TractStats],
  *,
  lam: Union[float, jax.Array],
  axis_name: axes_lib.AxisName,
  local_stats: bool,
  per_lane_stats: bool,
  owner: str,
) -> jax.Array:
  """Shared by ``dense`` and ``conv``: checks, statistic, guards, the op."""
  reduce_over = gradient_route.check_settings(lam, axis_name, local_stats, owner)
  if jax_compat.is_forward_mode_tracer(kernel):
    raise gradient_route._forward_mode_error(layer.name)
  gradient_route.check_not_wrapped(kernel, owner, layer.name)
  stats = jax.tree_util.tree_map(jax.lax.stop_gradient, stats_of(jax.lax.stop_gradient(x)))
  if reduce_over is not None:
    stats = all_reduce_stats(stats, reduce_over)
  stats = lanes.lane_guard(layer.name, bool(per_lane_stats), owner)(
    jax.lax.stop_gradient(kernel), stats
  )
  dtype = jnp.promote_types(stats_lib.stats_dtype(stats.count.dtype), jnp.float32)
  layer = layer._replace(rows_are_local=reduce_over is None)
  try:
    return _layer_op(layer, x, kernel, stats, jnp.asarray(lam, dtype))
  except TypeError as error:  # JAX's generic message for jvp of a custom_vjp
    if 'forward-mode' in str(error):
      raise gradient_route._forward_mode_error(layer.name) from error
    raise


def dense(
  x: jax.Array,
  kernel: jax.Array,
  *,
  lam: Union[float, jax.Array] = 0.1,
  axis_name: axes_lib.AxisName = None,
  local_stats: bool = False,
  relative_lam: bool = False,
  check_condition: Optional[bool] = None,
  per_lane_stats: bool = False,
  precision: stats_lib.PrecisionLike = None,
  name: Optional[str] = None,
) -> jax.Array:
  """``x @ kernel``, whose kernel gradient is TrAct's for the rows of ``x``.

  Args:
    x: ``(..., n)`` inputs; every leading axis counts rows (a ViT's batch x
      tokens).
    kernel: ``(n, m)`` kernel (Flax Dense layout; for an ``(m, n)`` weight
      pass ``weight.T``).
    lam: the ridge strength lambda > 0.
    axis_name: ``pmap`` / ``shard_map`` / ``vmap`` axes splitting the rows:
      the statistic is all-reduced over them (as ``tract_kernel``).
    local_stats: each device's own statistic on purpose.
    relative_lam: ridge ``lam * trace(A^T A / N) / n``.
    check_condition: as for ``tract_kernel``.
    per_lane_stats: under ``jax.vmap`` with a kernel per lane, each lane's
      own statistic (as ``tract_kernel``).
    precision: matmul precision of the product and of the statistic.
    name: the layer's name for messages.

  Returns:
    ``x @ kernel``, shape ``(..., m)``.

  Raises:
    ValueError, TypeError: as ``tract_kernel``; the kernel
      is not ``(n, m)`` with ``n = x.shape[-1]``.

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (64, 3))
    >>> w = jnp.ones((3, 2))
    >>> g = jax.grad(lambda w: jnp.sum(tract_optax.dense(x, w) ** 2))(w)
    >>> plain = jax.grad(lambda w: jnp.sum((x @ w) ** 2))(w)
    >>> want = tract_optax.precondition(plain, tract_optax.dense_stats(x), 0.1)
    >>> bool(jnp.allclose(g, want, atol=1e-5))
    True
  """
  x = stats_lib.as_real_input(x, 'dense')
  if jnp.ndim(kernel) != 2 or x.ndim < 1 or x.shape[-1] != jnp.shape(kernel)[0]:
    raise ValueError(
      f'dense: x @ kernel needs x of shape (..., n) and a kernel (n, m); got x '
      f'{x.shape} and kernel {jnp.shape(kernel)}.'
    )
  layer = _Layer(
    None, (), (), (), (), 1, precision, bool(relative_lam), check_condition, name, True
  )
  return _call(
    x,
    kernel,
    layer,
    functools.partial(stats_lib.dense_stats, precision=precision),
    lam=lam,
    axis_name=axis_name,
    local_stats=local_stats,
    per_lane_stats=per_lane_stats,
    owner='dense',
  )


def conv(
  x: jax.Array,
  kernel: jax.Array,
  window_strides: Sequence[int],
  padding: Padding,
  lhs_dilation: Optional[Sequence[int]] = None,
  rhs_dilation: Optional[Sequence[int]] = None,
  dimension_numbers: jax.lax.ConvGeneralDilatedDimensionNumbers = None,
  feature_group_count: int = 1,
  *,
  lam: Union[float, jax.Array] = 0.1,
  axis_name: axes_lib.AxisName = None,
  local_stats: bool = False,
  relative_lam: bool = False,
  check_condition: Optional[bool] = None,
  per_lane_stats: bool = False,
  precision: stats_lib.PrecisionLike = None,
  name: Optional[str] = None,
) -> jax.Array:
  """``jax.lax.conv_general_dilated``, whose kernel gradient is TrAct's.

  The positional arguments are ``lax.conv_general_dilated``'s, with its
  defaults (``dimension_numbers=None``: ``('NCHW', 'OIHW', 'NCHW')`` and their
  1-D / 3-D analogues), and the output is exactly its output. The statistic
  is that of the patches the kernel multiplies, read off the same arguments.
  (``batch_group_count`` and ``preferred_element_type`` are not taken.)

  Args:
    x: the input, laid out as ``dimension_numbers`` says.
    kernel: the kernel, laid out as ``dimension_numbers`` says.
    window_strides: one stride per spatial dimension.
    padding: 'SAME', 'SAME_LOWER', 'VALID', or one ``(low, high)`` pair per
      spatial dimension.
    lhs_dilation: input dilation (a transposed convolution), or None.
    rhs_dilation: kernel dilation, or None.
    dimension_numbers: as for ``lax.conv_general_dilated``.
    feature_group_count: feature groups.
    lam: the ridge strength lambda > 0.
    axis_name: ``pmap`` / ``shard_map`` / ``vmap`` axes splitting the batch.
    local_stats: each device's own statistic on purpose.
    relative_lam: ridge ``lam * trace(A^T A / N) / n`` per group.
    check_condition: as for ``tract_kernel``.
    per_lane_stats: under ``jax.vmap`` with a kernel per lane, each lane's
      own statistic.
    precision: precision of the convolution and of the statistic.
    name: the layer's name for messages.

  Returns:
    The convolution's output.

  Raises:
    ValueError, TypeError: as ``lax.conv_general_dilated`` and
      ``tract_kernel``.

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (2, 3, 8, 8))  # NCHW
    >>> w = 0.1 * jnp.ones((4, 3, 3, 3))  # OIHW
    >>> y = tract_optax.conv(x, w, (1, 1), 'SAME')
    >>> bool(jnp.allclose(y, jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME')))
    True
  """
  x = stats_lib.as_real_input(x, 'conv')
  kernel_shape = tuple(jnp.shape(kernel))
  num_spatial = len(kernel_shape) - 2
  strides = tuple(int(s) for s in window_strides)
  lhs_dil = (1,) * num_spatial if lhs_dilation is None else tuple(int(d) for d in lhs_dilation)
  rhs_dil = (1,) * num_spatial if rhs_dilation is None else tuple(int(d) for d in rhs_dilation)
  # lax checks every argument (its own messages) before anything else runs
  jax.eval_shape(
    lambda a, b: jax.lax.conv_general_dilated(
      a, b, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count
    ),
    x,
    kernel,
  )
  dnums = jax.lax.conv_dimension_numbers(x.shape, kernel_shape, dimension_numbers)
  if isinstance(padding, str):  # as lax resolves it (lax refuses it with lhs_dilation)
    spatial = np.take(x.shape, dnums.lhs_spec)[2:]
    window = np.take(kernel_shape, dnums.rhs_spec)[2:]
    effective = [(k - 1) * d + 1 for k, d in zip(window, rhs_dil, strict=True)]
    pads = tuple(
      (int(lo), int(hi)) for lo, hi in jax.lax.padtype_to_pads(spatial, effective, strides, padding)
    )
  else:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  layer = _Layer(
    dnums,
    strides,
    pads,
    lhs_dil,
    rhs_dil,
    int(feature_group_count),
    precision,
    bool(relative_lam),
    check_condition,
    name,
    True,
  )
  return _call(
    x,
    kernel,
    layer,
    lambda inputs: _conv_stats(inputs, kernel_shape, layer, precision),
    lam=lam,
    axis_name=axis_name,
    local_stats=local_stats,
    per_lane_stats=per_lane_stats,
    owner='conv',
  )
