"""TrAct for Equinox layers: geometry and layout read off the layer.

Equinox layers take one example, channels first (``Conv2d``: ``(C, H, W)``),
and are batched with ``jax.vmap``; their weights are in PyTorch layout
``(out, in / groups, *window)``, their padding defaults to 0 and may be
``'SAME'``, ``'SAME_LOWER'``, ``'VALID'``, an int, or one int or
``(low, high)`` pair per spatial axis, with a ``padding_mode`` of zeros,
reflection, replication or wrapping. Written by hand, each of these is a
chance to compute the statistic of the wrong rows (Flax's ``'SAME'`` default
of ``conv_stats``, a patch order that is not the kernel's)
or to read the kernel the wrong way. The functions here read all of it off
``eqx.nn.Linear`` / ``eqx.nn.Conv`` (1-3 spatial dims) and take the whole
batch, so the statistic is that of every row the layer sees:

- ``layer_stats``: the layer's input statistic for a batch;
- ``tract_layer``: the layer whose weight's gradient is TrAct's, for the
  usual ``jax.vmap(model)(x)``: wrap it outside the vmap;
- ``apply_tract``: the layer applied to the whole batch with that weight;
- ``TractLayer``: the layer itself, its statistic taken from the input
  it receives in ``__call__`` (through ``tract_optax.dense`` /
  ``tract_optax.conv``): nothing is written twice, under Equinox's
  per-example ``jax.vmap`` too (with ``axis_name``).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import equinox as eqx
import jax
import jax.numpy as jnp

from tract_optax._src import axes as axes_lib
from tract_optax._src import conv as conv_lib
from tract_optax._src import docs_link, gradient_route, layer_ops
from tract_optax._src import stats as stats_lib

Layer = Union[eqx.nn.Linear, eqx.nn.Conv]

_PAD_MODES = {'REFLECT': 'reflect', 'REPLICATE': 'edge', 'CIRCULAR': 'wrap'}


def _check_layer(layer: object, owner: str) -> None:
  """Refuses anything but an Equinox Linear or Conv computed as Equinox does."""
  for base in (eqx.nn.Linear, eqx.nn.Conv):
    if isinstance(layer, base):
      if type(layer).__call__ is not base.__call__:
        raise TypeError(
          f'{owner}: {type(layer).__name__} subclasses eqx.nn.{base.__name__} '
          "but overrides __call__, so its output need not be the plain layer's and TrAct's "
          "gradient would be another layer's. Use the plain layer, or "
          'tract_optax.tract_kernel on the weight your __call__ multiplies.'
          + docs_link.see('routes', 'Equinox')
        )
      return
  inner = getattr(layer, 'layer', None)
  if isinstance(inner, (eqx.nn.Linear, eqx.nn.Conv)):  # a wrapper that rewrites the weight
    raise TypeError(
      f'{owner}: {type(layer).__name__} computes the weight its '
      f'{type(inner).__name__} multiplies from the stored one, so TrAct of either weight is '
      'not TrAct of the layer. Use a plain layer as the stem (its inner layer swapped back '
      'in is the same mistake).' + docs_link.see('limits', 'Layers whose kernel is transformed')
    )
  raise TypeError(
    f'{owner} takes an eqx.nn.Linear or eqx.nn.Conv (Conv1d, Conv2d, Conv3d); got '
    f'{type(layer).__name__}. For a layer of your own, compute it with tract_optax.conv / '
    'tract_optax.dense on its input.' + docs_link.see('routes', 'Equinox')
  )


def _batch_axes(layer: Layer, x: jax.Array, owner: str) -> int:
  """Number of leading batch axes of ``x`` for ``layer`` (0: one example)."""
  if isinstance(layer, eqx.nn.Linear):
    if layer.in_features == 'scalar':
      return x.ndim
    if x.ndim < 1 or x.shape[-1] != layer.in_features:
      raise ValueError(
        f'{owner}: the Linear layer takes inputs of shape (..., '
        f'{layer.in_features}) (any leading batch axes); got shape {x.shape}.'
      )
    return x.ndim - 1
  example_rank = layer.num_spatial_dims + 1
  if x.ndim < example_rank or x.shape[-example_rank] != layer.in_channels:
    raise ValueError(
      f'{owner}: the Conv layer ({layer.num_spatial_dims}-D, {layer.in_channels} '
      'input channels) takes channels-first inputs of shape (..., '
      f'{layer.in_channels}, *{layer.num_spatial_dims} spatial) (any leading '
      f'batch axes, as Equinox uses under jax.vmap); got shape {x.shape}.'
    )
  return x.ndim - example_rank


def conv_padding(layer: eqx.nn.Conv, spatial_shape: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
  """The explicit ``(low, high)`` padding per spatial axis that ``layer`` applies.

  Args:
    layer: an Equinox convolution.
    spatial_shape: the spatial shape of one input example.

  Returns:
    One ``(low, high)`` pair per spatial axis, Equinox's string paddings
    (``'SAME'``, ``'SAME_LOWER'``, ``'VALID'``) resolved for this input.

  Example:
    >>> import equinox as eqx, jax
    >>> layer = eqx.nn.Conv2d(1, 1, 4, padding='SAME', key=jax.random.key(0))
    >>> conv_padding(layer, (8, 8))
    ((1, 2), (1, 2))
  """
  if isinstance(layer.padding, str):
    window = tuple(d * (k - 1) + 1 for k, d in zip(layer.kernel_size, layer.dilation, strict=True))
    pads = jax.lax.padtype_to_pads(tuple(spatial_shape), window, layer.stride, layer.padding)
    return tuple((int(lo), int(hi)) for lo, hi in pads)
  return tuple((int(lo), int(hi)) for lo, hi in layer.padding)


def layer_stats(
  layer: Layer,
  x: jax.Array,
  *,
  precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
  max_chunk_bytes: Optional[int] = conv_lib.DEFAULT_MAX_CHUNK_BYTES,
) -> stats_lib.TractStats:
  """The statistic of an Equinox layer's input rows for a batch ``x``.

  Kernel size, stride, padding (and ``padding_mode``), dilation and groups
  are read off the layer, so the rows are exactly those the layer's weight
  multiplies, in the order of its weight.

  Args:
    layer: an ``eqx.nn.Linear`` or ``eqx.nn.Conv`` (1-3 spatial dims).
    x: the whole batch: Linear ``(..., in_features)``; Conv channels first
      ``(..., in_channels, *spatial)``; any number of leading batch axes
      (none: one example).
    precision: matmul precision of the moment ('default', 'high', 'highest').
    max_chunk_bytes: conv patch bytes materialised at once (see
      ``conv_stats``).

  Returns:
    The layer's ``TractStats``; ``N`` counts every row of
    every example (output positions of a conv).

  Raises:
    TypeError: ``layer`` is no Equinox Linear / Conv, or a subclass that
      computes differently.
    ValueError: ``x`` does not fit the layer.

  Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> conv = eqx.nn.Conv2d(3, 4, 3, key=jax.random.key(0))  # padding 0
    >>> s = layer_stats(conv, jnp.ones((2, 3, 8, 8)))
    >>> s.moment.shape, float(s.count)  # 2 images x 6 x 6 outputs
    ((27, 27), 72.0)
  """
  _check_layer(layer, 'layer_stats')
  x = stats_lib.as_real_input(x, 'layer_stats')
  batch = _batch_axes(layer, x, 'layer_stats')
  if isinstance(layer, eqx.nn.Linear):
    rows = x[..., None] if layer.in_features == 'scalar' else x
    return stats_lib.dense_stats(rows, precision=precision)
  spatial = layer.num_spatial_dims
  pads = conv_padding(layer, x.shape[-spatial:])
  if layer.padding_mode != 'ZEROS':  # Equinox pads the input, then 'VALID'
    mode = _PAD_MODES[layer.padding_mode]
    x = jnp.pad(x, [(0, 0)] * (batch + 1) + list(pads), mode=mode)
    pads = ((0, 0),) * spatial
  channels_last = jnp.moveaxis(x, batch, -1)
  return conv_lib.conv_stats(
    channels_last,
    tuple(layer.kernel_size),
    tuple(layer.stride),
    pads,
    tuple(layer.dilation),
    feature_group_count=layer.groups,
    precision=precision,
    max_chunk_bytes=max_chunk_bytes,
  )


def tract_layer(
  layer: Layer,
  x: jax.Array,
  *,
  lam: Union[float, jax.Array] = 0.1,
  axis_name: axes_lib.AxisName = None,
  local_stats: bool = False,
  relative_lam: bool = False,
  check_condition: Optional[bool] = None,
  name: Optional[str] = None,
) -> Layer:
  """The layer, unchanged in value, whose weight's gradient is TrAct's for ``x``.

  For the usual Equinox loss, ``jax.vmap(model)(x)``: swap the first layer
  for ``tract_layer(model.stem, x)`` *before* the vmap (e.g. with
  ``eqx.tree_at``). The wrapped weight is then shared by every lane, its
  cotangent is the whole batch's, and the statistic is that of the whole
  batch: the gradient is TrAct's. Inside the vmap the statistic would be
  one example's, which ``tract_optax.tract_kernel`` refuses. ``x`` must
  be what the layer receives; where the model transforms its input before
  the layer (patches rearranged), use ``TractLayer``, which takes the
  statistic from the layer's own input.

  Args:
    layer: an ``eqx.nn.Linear`` or ``eqx.nn.Conv`` (1-3 spatial dims).
    x: the whole batch the layer sees in this step (see ``layer_stats``);
      for several views, all of them concatenated.
    lam: the ridge strength lambda > 0.
    axis_name: the ``pmap`` / ``shard_map`` axis (or axes) splitting the
      batch: the statistic is all-reduced over them.
    local_stats: inside ``pmap`` / ``shard_map``, each device's own statistic
      on purpose.
    relative_lam: ridge ``lam * trace(A^T A / N) / n`` (scale-invariant).
    check_condition: as for ``tract_optax.tract_kernel``.
    name: the layer's name for messages.

  Returns:
    ``layer`` with its weight wrapped by ``tract_optax.tract_kernel``
    (layout read off the layer); the bias is untouched.

  Raises:
    TypeError, ValueError: as ``layer_stats`` and
      ``tract_optax.tract_kernel``.

  Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> stem = eqx.nn.Linear(3, 3, key=jax.random.key(0))  # square: no guessing
    >>> x = jax.random.normal(jax.random.key(1), (16, 3))
    >>> loss = lambda s: jnp.sum(jax.vmap(tract_layer(s, x))(x) ** 2)
    >>> g = eqx.filter_grad(loss)(stem)
    >>> plain = eqx.filter_grad(lambda s: jnp.sum(jax.vmap(s)(x) ** 2))(stem)
    >>> want = tract_optax.precondition(plain.weight.T, layer_stats(stem, x), 0.1).T
    >>> bool(jnp.allclose(g.weight, want, atol=1e-5))
    True
  """
  stats = layer_stats(layer, x)
  weight = gradient_route.tract_kernel(
    layer.weight,
    stats,
    lam=lam,
    axis_name=axis_name,
    local_stats=local_stats,
    relative_lam=relative_lam,
    channels_first=True,  # Equinox: (out, in / groups, *window), Linear (out, in)
    check_condition=check_condition,
    name=name or type(layer).__name__,
  )
  return eqx.tree_at(lambda current: current.weight, layer, weight)


def apply_tract(
  layer: Layer,
  x: jax.Array,
  *,
  lam: Union[float, jax.Array] = 0.1,
  axis_name: axes_lib.AxisName = None,
  local_stats: bool = False,
  relative_lam: bool = False,
  check_condition: Optional[bool] = None,
  name: Optional[str] = None,
) -> jax.Array:
  """The layer applied to the whole batch ``x``, with TrAct's weight gradient.

  Equivalent to ``jax.vmap(layer)(x)`` over the leading batch axes (exactly
  the same output), with the weight wrapped by ``tract_layer`` for the
  statistic of all of ``x``. Call it once per step on everything the layer
  sees: two ``apply_tract`` calls (two views) each use their own view's
  statistic, which is not TrAct's update for the pair; concatenate the views
  instead and split the output.

  Args:
    layer: an ``eqx.nn.Linear`` or ``eqx.nn.Conv`` (1-3 spatial dims).
    x: Linear ``(..., in_features)``; Conv ``(..., in_channels, *spatial)``.
    lam: the ridge strength lambda > 0.
    axis_name: the ``pmap`` / ``shard_map`` axis (or axes) splitting the batch.
    local_stats: inside ``pmap`` / ``shard_map``, each device's own statistic.
    relative_lam: ridge ``lam * trace(A^T A / N) / n`` (scale-invariant).
    check_condition: as for ``tract_optax.tract_kernel``.
    name: the layer's name for messages.

  Returns:
    The layer's output for every example, with ``x``'s leading axes.

  Raises:
    TypeError, ValueError: as ``tract_layer``.

  Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> conv = eqx.nn.Conv2d(3, 4, 3, padding='SAME', key=jax.random.key(0))
    >>> x = jnp.ones((2, 3, 8, 8))
    >>> apply_tract(conv, x).shape
    (2, 4, 8, 8)
  """
  wrapped = tract_layer(
    layer,
    x,
    lam=lam,
    axis_name=axis_name,
    local_stats=local_stats,
    relative_lam=relative_lam,
    check_condition=check_condition,
    name=name,
  )
  batch = _batch_axes(layer, jnp.asarray(x), 'apply_tract')
  if batch == 0:
    return wrapped(x)
  leading = x.shape[:batch]
  flat = jnp.reshape(x, (math.prod(leading),) + x.shape[batch:])
  out = jax.vmap(wrapped)(flat)
  return jnp.reshape(out, leading + out.shape[1:])


class TractLayer(eqx.Module):
  """An Equinox Linear / Conv whose weight's gradient is TrAct's for the input it receives.

  The statistic is computed inside ``__call__`` from the very input the layer
  is applied to (``tract_optax.dense`` / ``tract_optax.conv``), so a
  model that rearranges its input before the layer (patches in any order)
  cannot hand TrAct other rows than the weight multiplies. Under Equinox's
  per-example ``jax.vmap(model, axis_name='batch')``, pass
  ``axis_name='batch'``: the statistic is then the whole batch's. Without
  it, a per-example statistic is refused.

  Attributes:
    layer: the wrapped ``eqx.nn.Linear`` or ``eqx.nn.Conv`` (its weight and
      bias are the trained parameters).
    lam: the ridge strength lambda > 0, a Python number (an array here
      would be an array leaf of the model, which an optimizer with weight
      decay would change; for a schedule, swap in a new ``TractLayer`` with
      the step's value, or use ``tract_layer``).
    axis_name: the ``vmap`` / ``pmap`` / ``shard_map`` axis (or axes) that
      split the batch.
    local_stats: each device's own statistic on purpose.
    relative_lam: ridge ``lam * trace(A^T A / N) / n``.
    check_condition: as for ``tract_optax.tract_kernel``.
    per_lane_stats: under ``jax.vmap`` with a layer per lane (an ensemble on
      its own data), each lane's own statistic.
    name: the layer's name for messages.

  Example:
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> stem = TractLayer(eqx.nn.Linear(3, 2, key=jax.random.key(0)), axis_name='batch')
    >>> x = jnp.ones((8, 3))
    >>> jax.vmap(stem, axis_name='batch')(x).shape
    (8, 2)
  """

  layer: Layer
  lam: Union[float, jax.Array] = 0.1
  axis_name: axes_lib.AxisName = eqx.field(static=True, default=None)
  local_stats: bool = eqx.field(static=True, default=False)
  relative_lam: bool = eqx.field(static=True, default=False)
  check_condition: Optional[bool] = eqx.field(static=True, default=None)
  per_lane_stats: bool = eqx.field(static=True, default=False)
  name: Optional[str] = eqx.field(static=True, default=None)

  def __check_init__(self) -> None:
    if isinstance(self.layer, TractLayer):
      raise TypeError(
        'TractLayer: the layer is already a TractLayer; its gradient would be '
        'preconditioned twice. Wrap the plain layer once.'
        + docs_link.see('routes', 'A kernel wrapped twice')
      )
    _check_layer(self.layer, 'TractLayer')

  def __call__(self, x: jax.Array, *, key: Optional[jax.Array] = None) -> jax.Array:
    """The layer's output for ``x`` (one example, or with leading batch axes)."""
    del key
    layer = self.layer
    options: dict[str, Any] = dict(
      lam=self.lam,
      axis_name=self.axis_name,
      local_stats=self.local_stats,
      relative_lam=self.relative_lam,
      check_condition=self.check_condition,
      per_lane_stats=self.per_lane_stats,
      name=self.name or type(layer).__name__,
    )
    x = jnp.asarray(x)
    batch = _batch_axes(layer, x, 'TractLayer')
    if isinstance(layer, eqx.nn.Linear):
      rows = x[..., None] if layer.in_features == 'scalar' else x
      out = layer_ops.dense(rows, layer.weight.T, **options)
      if layer.bias is not None:
        out = out + layer.bias
      return out[..., 0] if layer.out_features == 'scalar' else out
    spatial = layer.num_spatial_dims
    leading = x.shape[:batch]
    images = jnp.reshape(x, (math.prod(leading),) + x.shape[batch:])
    pads = conv_padding(layer, images.shape[-spatial:])
    if layer.padding_mode != 'ZEROS':  # Equinox pads the input, then 'VALID'
      images = jnp.pad(images, [(0, 0), (0, 0)] + list(pads), mode=_PAD_MODES[layer.padding_mode])
      pads = ((0, 0),) * spatial
    out = layer_ops.conv(
      images,
      layer.weight,
      tuple(layer.stride),
      pads,
      rhs_dilation=tuple(layer.dilation),
      feature_group_count=layer.groups,
      **options,
    )
    if layer.bias is not None:
      out = out + layer.bias
    return jnp.reshape(out, leading + out.shape[1:])
