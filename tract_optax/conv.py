"""Input statistics of convolutions: patch geometry, the explicit patch matrix,
and the memory-lean chunked second moment.

The rows of a convolution's input matrix ``A`` are its receptive-field patches:
one row per batch element and output position, ``n = prod(kernel_size) *
in_channels / groups`` features, ordered as a Flax kernel
``(*window, c_in / groups, c_out)`` flattens (window-major, channel-minor).
Patch rows are built from strided slices of the padded input, already in that
order (``jax.lax.conv_general_dilated_patches`` orders features channel-major,
and was slower on CPU).
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from tract_optax import stats as stats_lib

IntOrSeq = Union[int, Sequence[int]]
PaddingLike = Union[str, int, Sequence[int], Sequence[Tuple[int, int]]]

#: Patch bytes materialised at once by :func:`conv_stats` (per chunk of images).
DEFAULT_MAX_CHUNK_BYTES = 64 * 2**20

_PAD_MODES = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}


def _as_tuple(value: IntOrSeq, size: int, name: str) -> Tuple[int, ...]:
  if isinstance(value, int):
    return (value,) * size
  value = tuple(int(v) for v in value)
  if len(value) != size:
    raise ValueError(
        f'{name}={value} has {len(value)} entries but the kernel has {size} '
        'spatial dimensions.')
  return value


def _flatten_batch(x: jax.Array, num_spatial: int, kernel_size) -> jax.Array:
  """Reshapes channels-last inputs to exactly one leading batch axis."""
  if x.ndim < num_spatial + 1:
    raise ValueError(
        f'A {num_spatial}-D convolution with kernel_size={tuple(kernel_size)} '
        f'needs channels-last inputs of shape (batch, {num_spatial} spatial '
        f'dims, channels), i.e. rank {num_spatial + 2}; got shape {x.shape} '
        f'(rank {x.ndim}). Add the channel axis (x[..., None]) or check '
        'kernel_size.')
  if x.ndim == num_spatial + 1:  # unbatched, as Flax allows
    return x[None]
  return x.reshape((-1,) + x.shape[x.ndim - num_spatial - 1:])


def _padding_pairs(padding: PaddingLike, spatial_shape, window_dilated,
                   strides) -> Tuple[Tuple[int, int], ...]:
  """Explicit (low, high) zero padding per spatial dimension."""
  num_spatial = len(spatial_shape)
  if isinstance(padding, str):
    name = padding.upper()
    if name in ('SAME', 'SAME_LOWER', 'VALID'):
      return tuple(jax.lax.padtype_to_pads(spatial_shape, window_dilated,
                                           strides, name))
    raise ValueError(
        f"padding={padding!r} is not understood; use 'SAME', 'VALID', "
        "'CIRCULAR', 'REFLECT', 'CAUSAL' (1-D), an int, or (low, high) pairs.")
  if isinstance(padding, int):
    return ((padding, padding),) * num_spatial
  padding = list(padding)
  if len(padding) != num_spatial:
    raise ValueError(
        f'padding={padding} has {len(padding)} entries but the kernel has '
        f'{num_spatial} spatial dimensions.')
  pairs = []
  for entry in padding:
    if isinstance(entry, int):
      pairs.append((entry, entry))
    else:
      low, high = entry
      pairs.append((int(low), int(high)))
  return tuple(pairs)


class ConvGeometry:
  """Resolved geometry of a convolution over concrete input shapes.

  Built by :func:`conv_geometry`; all fields are static Python values.
  """

  def __init__(self, kernel_size, strides, dilation, pads, batch, in_spatial,
               out_spatial, channels, groups):
    self.kernel_size = kernel_size
    self.strides = strides
    self.dilation = dilation
    self.pads = pads
    self.batch = batch
    self.in_spatial = in_spatial
    self.out_spatial = out_spatial
    self.channels = channels
    self.groups = groups

  @property
  def window(self) -> int:
    return math.prod(self.kernel_size)

  @property
  def group_channels(self) -> int:
    return self.channels // self.groups

  @property
  def num_features(self) -> int:
    """``n``: features per patch row and group."""
    return self.window * self.group_channels

  @property
  def rows_per_example(self) -> int:
    return math.prod(self.out_spatial)

  @property
  def num_rows(self) -> int:
    """``N``: patch rows, batch x output positions."""
    return self.batch * self.rows_per_example

  def __repr__(self):
    return (f'ConvGeometry(kernel_size={self.kernel_size}, strides={self.strides}, '
            f'dilation={self.dilation}, pads={self.pads}, batch={self.batch}, '
            f'out_spatial={self.out_spatial}, channels={self.channels}, '
            f'groups={self.groups})')


def _prepare(x, kernel_size, strides, padding, dilation, feature_group_count):
  """Normalises arguments; returns (batched, mode-padded x, ConvGeometry)."""
  if isinstance(kernel_size, int):
    kernel_size = (kernel_size,)
  kernel_size = tuple(int(k) for k in kernel_size)
  num_spatial = len(kernel_size)
  if not 1 <= num_spatial <= 3:
    raise ValueError(f'kernel_size={kernel_size}: 1-D, 2-D or 3-D convolutions '
                     'are supported.')
  strides = _as_tuple(strides, num_spatial, 'strides')
  dilation = _as_tuple(dilation, num_spatial, 'dilation')
  x = _flatten_batch(jnp.asarray(x), num_spatial, kernel_size)
  window_dilated = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))

  if isinstance(padding, str) and padding.upper() in _PAD_MODES:
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in window_dilated] + [(0, 0)]
    x = jnp.pad(x, pads, mode=_PAD_MODES[padding.upper()])
    padding = 'VALID'
  elif isinstance(padding, str) and padding.upper() == 'CAUSAL':
    if num_spatial != 1:
      raise ValueError("padding='CAUSAL' is defined for 1-D convolutions only; "
                       f'kernel_size={kernel_size} is {num_spatial}-D.')
    padding = ((window_dilated[0] - 1, 0),)

  in_spatial = tuple(x.shape[1:-1])
  pads = _padding_pairs(padding, in_spatial, window_dilated, strides)
  out_spatial = tuple(
      (size + lo + hi - w) // s + 1
      for size, (lo, hi), w, s in zip(in_spatial, pads, window_dilated, strides))
  if any(o <= 0 for o in out_spatial):
    raise ValueError(
        f'Input spatial shape {in_spatial} with padding {pads} is smaller than '
        f'the dilated kernel {window_dilated}: the convolution has no output.')
  channels = x.shape[-1]
  if feature_group_count < 1 or channels % feature_group_count:
    raise ValueError(
        f'feature_group_count={feature_group_count} must divide the '
        f'{channels} input channels.')
  geometry = ConvGeometry(kernel_size, strides, dilation, pads, x.shape[0],
                          in_spatial, out_spatial, channels, feature_group_count)
  return x, geometry


def _patch_rows(x, geometry: ConvGeometry) -> jax.Array:
  """``(groups, B * P, n)`` patch rows in Flax kernel order.

  Built from one strided slice of the zero-padded input per window offset,
  stacked window-major with channels innermost: exactly how a Flax kernel
  ``(*window, c_in / groups, c_out)`` flattens, so no reordering is needed.
  On a 2-core CPU this measured 1.6x to 2.8x faster than
  ``jax.lax.conv_general_dilated_patches`` (a convolution with an identity
  filter, channel-major) for 3x3, 7x7/2 and 16x16/16 windows.
  """
  padded = jnp.pad(x, [(0, 0)] + list(geometry.pads) + [(0, 0)])
  slices = []
  for offset in itertools.product(*[range(k) for k in geometry.kernel_size]):
    start = [0] + [k * d for k, d in zip(offset, geometry.dilation)] + [0]
    limit = ([padded.shape[0]] +
             [first + (out - 1) * stride + 1 for first, out, stride in
              zip(start[1:-1], geometry.out_spatial, geometry.strides)] +
             [padded.shape[-1]])
    slices.append(jax.lax.slice(padded, start, limit,
                                (1,) + tuple(geometry.strides) + (1,)))
  window = jnp.stack(slices, axis=-2)  # (B, *out, K, C)
  rows = window.reshape(-1, geometry.window, geometry.groups, geometry.group_channels)
  rows = jnp.moveaxis(rows, 2, 0)      # (groups, B * P, K, C / groups)
  return rows.reshape(geometry.groups, -1, geometry.num_features)


def conv_patches(x: jax.Array, kernel_size: IntOrSeq, strides: IntOrSeq = 1,
                 padding: PaddingLike = 'VALID', dilation: IntOrSeq = 1, *,
                 feature_group_count: int = 1) -> jax.Array:
  """The explicit patch matrix ``A`` of a convolution, in Flax kernel order.

  This is the obvious (memory-hungry) reference: it materialises all
  ``N x n`` patch entries. :func:`conv_stats` avoids doing so.

  Args:
    x: channels-last inputs ``(batch..., *spatial, channels)``.
    kernel_size: window shape; its length sets 1-D, 2-D or 3-D.
    strides: window strides (int or one per spatial dim).
    padding: 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL' (1-D), an int,
      or (low, high) pairs, as ``flax.linen.Conv`` accepts it.
    dilation: kernel dilation (int or one per spatial dim).
    feature_group_count: number of input channel groups.

  Returns:
    ``(N, n)`` patch rows, or ``(groups, N, n)`` when ``feature_group_count > 1``;
    feature ``k * (c_in / groups) + c`` pairs window offset ``k`` with channel ``c``.

  Example:
    >>> import jax.numpy as jnp
    >>> conv_patches(jnp.ones((2, 5, 5, 3)), (3, 3)).shape
    (18, 27)
  """
  x, geometry = _prepare(x, kernel_size, strides, padding, dilation,
                         feature_group_count)
  rows = _patch_rows(x, geometry)
  return rows[0] if geometry.groups == 1 else rows


def _chunked_gram(x, geometry: ConvGeometry, precision, max_chunk_bytes):
  """``(groups, n, n)`` Gram matrix of the patch rows, chunk by chunk."""
  def gram_of(images):
    return stats_lib.gram(_patch_rows(images, geometry), precision)

  if max_chunk_bytes is None:
    return gram_of(x)
  bytes_per_example = (geometry.rows_per_example * geometry.groups *
                       geometry.num_features * x.dtype.itemsize)
  per_chunk = max(1, int(max_chunk_bytes) // max(1, bytes_per_example))
  if per_chunk >= geometry.batch:
    return gram_of(x)
  num_chunks = -(-geometry.batch // per_chunk)
  padded = num_chunks * per_chunk - geometry.batch
  if padded:  # zero images add zero patches, hence nothing to the Gram matrix
    x = jnp.pad(x, [(0, padded)] + [(0, 0)] * (x.ndim - 1))
  chunks = x.reshape((num_chunks, per_chunk) + x.shape[1:])

  def body(total, images):
    return total + gram_of(images), None

  dtype = stats_lib.stats_dtype(x.dtype)
  n = geometry.num_features
  init = jnp.zeros((geometry.groups, n, n), dtype)
  total, _ = jax.lax.scan(body, init, chunks)
  return total


def conv_stats(x: jax.Array, kernel_size: IntOrSeq, strides: IntOrSeq = 1,
               padding: PaddingLike = 'VALID', dilation: IntOrSeq = 1, *,
               feature_group_count: int = 1,
               precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
               max_chunk_bytes: Optional[int] = DEFAULT_MAX_CHUNK_BYTES
               ) -> stats_lib.TractStats:
  """Statistic of the inputs of a 1-D, 2-D or 3-D convolution.

  The moment ``A^T A / N`` of the patch rows is accumulated over chunks of the
  batch, so at most ``max_chunk_bytes`` of patches exist at any time and the
  full ``N x n`` patch matrix is never materialised. When ``N < n`` (decided
  from static shapes) the patch rows are kept instead (Woodbury form).

  Args:
    x: channels-last inputs ``(batch..., *spatial, channels)``; one batch axis,
      several (flattened), or none (a single example), as Flax allows.
    kernel_size: window shape; its length sets 1-D, 2-D or 3-D.
    strides: window strides (int or one per spatial dim).
    padding: 'SAME', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL' (1-D), an int,
      or (low, high) pairs, as ``flax.linen.Conv`` accepts it.
    dilation: kernel (rhs) dilation (int or one per spatial dim).
    feature_group_count: input channel groups; the statistic then holds one
      ``n x n`` moment per group, ``n = prod(kernel_size) * channels / groups``.
    precision: matmul precision of the moment ('default', 'high', 'highest').
    max_chunk_bytes: patch bytes materialised at once; ``None`` for one chunk.

  Returns:
    The layer's :class:`~tract_optax.TractStats`, ``N = batch * output positions``.

  Raises:
    ValueError: wrong input rank, a padding or argument that does not fit the
      kernel, channels not divisible by the groups, or an empty output.

  Example:
    >>> import jax.numpy as jnp
    >>> s = tract_optax.conv_stats(jnp.ones((2, 8, 8, 3)), (3, 3), padding='SAME')
    >>> s.moment.shape, float(s.count)
    ((27, 27), 128.0)
  """
  x, geometry = _prepare(x, kernel_size, strides, padding, dilation,
                         feature_group_count)
  dtype = stats_lib.stats_dtype(x.dtype)
  count = jnp.asarray(geometry.num_rows, dtype)
  with jax.named_scope('tract_conv_stats'):
    if geometry.num_rows < geometry.num_features:
      rows = _patch_rows(x, geometry)
      rows = rows[0] if geometry.groups == 1 else rows
      return stats_lib.TractStats(moment=None, rows=rows.astype(dtype), count=count)
    total = _chunked_gram(x, geometry, precision, max_chunk_bytes)
    moment = total / geometry.num_rows
    moment = moment[0] if geometry.groups == 1 else moment
    return stats_lib.TractStats(moment=moment, rows=None, count=count)
