"""Input statistics of convolutions: patch geometry, the explicit patch matrix,
and the memory-lean chunked second moment.

The rows of a convolution's input matrix ``A`` are its receptive-field patches:
one row per batch element and output position, ``n = prod(kernel_size) *
in_channels / groups`` features, ordered as a Flax kernel
``(*window, c_in / groups, c_out)`` flattens (window-major, channel-minor).

Arguments mean what they mean for ``flax.linen.Conv`` (and ``flax.nnx.Conv``),
defaults included: ``padding='SAME'``, and explicit padding may be negative
(it crops the input, as ``jax.lax.conv_general_dilated`` does).

Patches are built by one of three routes, picked from static shapes by
``patch_route``; all give the same rows (the tests hold each one to an
explicit numpy reference):

* ``'non_overlapping'``: windows that do not overlap (``strides >=
  kernel_size``, no dilation), e.g. a ViT patchify: one reshape and one
  transpose of the padded input, already in Flax order.
* ``'strided_slices'``: small overlapping windows: for each spatial dimension
  in turn, one strided slice per window offset along it, stacked next to the
  channels, so the result is in Flax order. The fastest route on CPU for
  3x3 and 7x7 windows, but its program grows with the window.
* ``'identity_conv'``: large overlapping windows:
  ``jax.lax.conv_general_dilated_patches`` (a convolution with an identity
  filter), whose program does not grow with the window; it orders features
  channel-major, so the small ``n x n`` Gram matrix is permuted to Flax order
  afterwards, never the patch matrix.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Iterable, Optional, Sequence, SupportsIndex, Tuple, TypeGuard, Union

import jax
import jax.numpy as jnp
import numpy as np

from tract_optax._src import stats as stats_lib

IntOrSeq = Union[int, Sequence[int]]
PaddingLike = Union[str, int, Sequence[Union[int, Tuple[int, int]]]]
Pads = Tuple[Tuple[int, int], ...]

#: Patch bytes materialised at once by ``conv_stats``.
DEFAULT_MAX_CHUNK_BYTES = 64 * 2**20

#: Overlapping windows of at most this many offsets take the
#: ``'strided_slices'`` route, larger ones ``'identity_conv'``. Measured on a
#: 2-core CPU (jax 0.10.2, f32): strided slices ran 5x faster for 3x3 windows
#: and 2x for 5x5, the same for 7x7 to 9x9; their compile time grows with the
#: window (7x7: 0.3 s, 16x16: 1.6 s, 64x64: 6-8 s) while the identity
#: convolution's stays at 0.1-0.6 s. (Past 16x16 the identity convolution runs
#: up to 2x slower on CPU: it multiplies by an ``n x n`` one-hot filter.)
SLICES_MAX_WINDOW = 49

ROUTES = ('non_overlapping', 'strided_slices', 'identity_conv')

_MODE_PADDINGS = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}
_NAMED_PADDINGS = ('SAME', 'SAME_LOWER', 'VALID', 'CAUSAL') + tuple(_MODE_PADDINGS)


# ----------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------


def _is_integer(value: object) -> TypeGuard[SupportsIndex]:
  """Whether ``value`` is an integer (Python or numpy), booleans excluded."""
  if isinstance(value, (bool, np.bool_)):
    return False
  if isinstance(value, (int, np.integer)):
    return True
  return (
    isinstance(value, (np.ndarray, jax.Array))
    and value.ndim == 0
    and jnp.issubdtype(value.dtype, jnp.integer)
  )


def _is_sequence(value: object) -> TypeGuard[Iterable[Any]]:
  return not isinstance(value, (str, bytes)) and hasattr(value, '__iter__')


def _kernel_size_tuple(kernel_size: IntOrSeq) -> Tuple[int, ...]:
  """``kernel_size`` as a tuple of positive ints; its length sets 1/2/3-D."""
  sizes: Tuple[int, ...]
  if _is_integer(kernel_size):
    sizes = (operator.index(kernel_size),)
  elif _is_sequence(kernel_size):
    sizes = tuple(kernel_size)
    if not all(_is_integer(k) for k in sizes):
      raise TypeError(
        f'kernel_size={kernel_size!r} must be an int or a sequence of ints, '
        'one window size per spatial dimension.'
      )
    sizes = tuple(operator.index(k) for k in sizes)
  else:
    raise TypeError(
      f'kernel_size={kernel_size!r} must be an int or a sequence of ints, '
      'one window size per spatial dimension.'
    )
  if not 1 <= len(sizes) <= 3:
    raise ValueError(f'kernel_size={kernel_size!r}: 1-D, 2-D or 3-D convolutions are supported.')
  if min(sizes) < 1:
    raise ValueError(f'kernel_size={kernel_size!r}: every window size must be at least 1.')
  return sizes


def _spatial_ints(
  value: IntOrSeq, num_spatial: int, name: str, meaning_of_one: str
) -> Tuple[int, ...]:
  """``strides`` or ``dilation``: one positive int per spatial dimension."""
  if _is_integer(value):
    values = (operator.index(value),) * num_spatial
  elif _is_sequence(value):
    values = tuple(value)
    if not all(_is_integer(v) for v in values):
      raise TypeError(f'{name}={value!r} must be an int or a sequence of {num_spatial} ints.')
    values = tuple(operator.index(v) for v in values)
    if len(values) != num_spatial:
      raise ValueError(
        f'{name}={value!r} has {len(values)} entries but the kernel has '
        f'{num_spatial} spatial dimensions.'
      )
  else:
    raise TypeError(f'{name}={value!r} must be an int or a sequence of {num_spatial} ints.')
  if min(values) < 1:
    raise ValueError(f'{name}={value!r}: every entry must be at least 1 ({meaning_of_one}).')
  return values


def _padding_entry(entry: object, index: int, padding: object) -> Tuple[int, int]:
  """One spatial dimension's ``(low, high)`` from an int or a pair."""
  if _is_integer(entry):
    return (operator.index(entry),) * 2
  if _is_sequence(entry):
    numbers = tuple(entry)
    if all(_is_integer(v) for v in numbers):
      if len(numbers) == 2:
        return operator.index(numbers[0]), operator.index(numbers[1])
      raise ValueError(
        f'padding={padding!r}: entry {index} has {len(numbers)} numbers; each '
        'entry is an int or a (low, high) pair. (lax.pad-style (low, high, '
        'interior) triples are not accepted: interior padding is '
        'input_dilation.)'
      )
  raise TypeError(
    f'padding={padding!r}: entry {index} ({entry!r}) must be an int or a (low, high) pair of ints.'
  )


def _canonical_padding(padding: PaddingLike, num_spatial: int) -> Union[str, Pads]:
  """An upper-case padding name, or explicit ``(low, high)`` pairs."""
  if isinstance(padding, str):
    name = padding.upper()
    if name in _NAMED_PADDINGS:
      return name
    raise ValueError(
      f"padding={padding!r} is not understood; use 'SAME', 'VALID', "
      "'CIRCULAR', 'REFLECT', 'CAUSAL' (1-D), an int, or (low, high) pairs."
    )
  if _is_integer(padding):
    return ((operator.index(padding),) * 2,) * num_spatial
  if not _is_sequence(padding):
    raise TypeError(
      f'padding={padding!r} must be a padding name, an int, or one int or '
      '(low, high) pair per spatial dimension.'
    )
  entries = list(padding)
  if len(entries) != num_spatial:
    raise ValueError(
      f'padding={padding!r} has {len(entries)} entries but the kernel has '
      f'{num_spatial} spatial dimensions; give one int or (low, high) pair '
      'per spatial dimension (no batch or channel entries).'
    )
  return tuple(_padding_entry(e, i, padding) for i, e in enumerate(entries))


def _group_count(feature_group_count: object) -> int:
  if not _is_integer(feature_group_count):
    raise TypeError(f'feature_group_count={feature_group_count!r} must be an int.')
  groups = operator.index(feature_group_count)
  if groups < 1:
    raise ValueError(
      f'feature_group_count={groups} must be at least 1 (1 = an ordinary convolution).'
    )
  return groups


def _batched_shape(shape: Tuple[int, ...], kernel_size: Tuple[int, ...]) -> Tuple[int, ...]:
  """Channels-last input shape with exactly one leading batch axis."""
  num_spatial = len(kernel_size)
  if len(shape) < num_spatial + 1:
    raise ValueError(
      f'A {num_spatial}-D convolution with kernel_size={kernel_size} '
      f'needs channels-last inputs of shape (batch, {num_spatial} spatial '
      f'dims, channels), i.e. rank {num_spatial + 2}; got shape {shape} '
      f'(rank {len(shape)}). Add the channel axis (x[..., None]) or check '
      'kernel_size.'
    )
  example_shape = shape[len(shape) - num_spatial - 1 :]
  batch = math.prod(shape[: len(shape) - num_spatial - 1])  # 1 if unbatched
  return (batch,) + example_shape


# ----------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """Resolved geometry of a convolution over concrete input shapes.

  All fields are static Python values; ``pads`` is the explicit zero padding
  left once 'CIRCULAR' / 'REFLECT' padding has been applied to the input:
  that padding's ``np.pad`` mode is ``mode`` (None without one) and its
  widths ``mode_pads``; ``in_spatial`` is the input's size after it.
  """

  kernel_size: Tuple[int, ...]
  strides: Tuple[int, ...]
  dilation: Tuple[int, ...]
  pads: Pads
  batch: int
  in_spatial: Tuple[int, ...]
  out_spatial: Tuple[int, ...]
  channels: int
  groups: int
  mode: Optional[str] = None
  mode_pads: Pads = ()

  @property
  def window(self) -> int:
    """Number of window offsets, ``prod(kernel_size)``."""
    return math.prod(self.kernel_size)

  @property
  def dilated_window(self) -> Tuple[int, ...]:
    return tuple((k - 1) * d + 1 for k, d in zip(self.kernel_size, self.dilation, strict=False))

  @property
  def extent(self) -> Tuple[int, ...]:
    """Input positions the output reads, per spatial dimension (after padding)."""
    return tuple(
      (o - 1) * s + w
      for o, s, w in zip(self.out_spatial, self.strides, self.dilated_window, strict=False)
    )

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

  @property
  def tiles_without_overlap(self) -> bool:
    """Whether windows are undilated and do not overlap (``strides >= kernel_size``)."""
    return all(
      s >= k and (d == 1 or k == 1)
      for k, s, d in zip(self.kernel_size, self.strides, self.dilation, strict=False)
    )


def conv_geometry(
  x: Union[jax.typing.ArrayLike, jax.ShapeDtypeStruct],
  kernel_size: IntOrSeq,
  strides: IntOrSeq = 1,
  padding: PaddingLike = 'SAME',
  dilation: IntOrSeq = 1,
  *,
  feature_group_count: int = 1,
) -> ConvGeometry:
  """The ``ConvGeometry`` of a convolution of ``x``, from its shape alone.

  Validates every argument; reads no data.

  Args:
    x: the inputs, or anything with their ``shape`` (``jax.ShapeDtypeStruct``).
    kernel_size, strides, padding, dilation, feature_group_count: as for
      ``conv_stats``.

  Returns:
    The resolved geometry: output shape, explicit zero padding, ``N``, ``n``,
    and the mode padding ('CIRCULAR' / 'REFLECT') applied before it.

  Raises:
    ValueError, TypeError: as ``conv_stats``.

  Example:
    >>> g = conv_geometry(jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32), (3, 3), 2)
    >>> g.out_spatial, g.pads, g.num_rows, g.num_features
    ((16, 16), ((0, 1), (0, 1)), 2048, 27)
  """
  kernel_size = _kernel_size_tuple(kernel_size)
  num_spatial = len(kernel_size)
  strides = _spatial_ints(strides, num_spatial, 'strides', '1 = every position')
  dilation = _spatial_ints(dilation, num_spatial, 'dilation', '1 = no dilation')
  padding = _canonical_padding(padding, num_spatial)
  groups = _group_count(feature_group_count)
  batch, *spatial_sizes, channels = _batched_shape(tuple(np.shape(x)), kernel_size)
  window_dilated = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=False))

  mode, mode_pads = None, ((0, 0),) * num_spatial
  if padding in _MODE_PADDINGS:  # as flax.linen.Conv: pad by mode, then VALID
    mode = _MODE_PADDINGS[padding]
    mode_pads = tuple(((w - 1) // 2, w // 2) for w in window_dilated)
    spatial_sizes = [
      size + lo + hi for size, (lo, hi) in zip(spatial_sizes, mode_pads, strict=False)
    ]
    padding = 'VALID'
  elif padding == 'CAUSAL':
    if num_spatial != 1:
      raise ValueError(
        "padding='CAUSAL' is defined for 1-D convolutions only; "
        f'kernel_size={kernel_size} is {num_spatial}-D.'
      )
    padding = ((window_dilated[0] - 1, 0),)

  in_spatial = tuple(spatial_sizes)
  if isinstance(padding, str):
    pads = tuple(
      (int(lo), int(hi))
      for lo, hi in jax.lax.padtype_to_pads(in_spatial, window_dilated, strides, padding)
    )  # older jax: numpy ints
  else:
    pads = padding
  out_spatial = tuple(
    (size + lo + hi - w) // s + 1 if size + lo + hi >= w else 0
    for size, (lo, hi), w, s in zip(in_spatial, pads, window_dilated, strides, strict=False)
  )
  if min(out_spatial) <= 0:
    raise ValueError(
      f'Input spatial shape {in_spatial} with padding {pads} is smaller than '
      f'the dilated kernel {window_dilated}: the convolution has no output.'
    )
  if channels % groups:
    raise ValueError(f'feature_group_count={groups} must divide the {channels} input channels.')
  return ConvGeometry(
    kernel_size,
    strides,
    dilation,
    pads,
    batch,
    in_spatial,
    out_spatial,
    channels,
    groups,
    mode,
    mode_pads if mode is not None else (),
  )


def _prepare(
  x: jax.Array,
  kernel_size: IntOrSeq,
  strides: IntOrSeq,
  padding: PaddingLike,
  dilation: IntOrSeq,
  feature_group_count: int,
  where: str = 'conv_stats',
) -> Tuple[jax.Array, ConvGeometry]:
  """Validates arguments; returns (batched, mode-padded x, ConvGeometry).

  Integer and boolean inputs become float32; complex inputs are rejected.
  """
  geometry = conv_geometry(
    x, kernel_size, strides, padding, dilation, feature_group_count=feature_group_count
  )
  x = stats_lib.as_real_input(x, where)
  num_spatial = len(geometry.kernel_size)
  x = x.reshape((geometry.batch,) + x.shape[x.ndim - num_spatial - 1 :])
  if geometry.mode is not None:
    x = jnp.pad(x, ((0, 0),) + geometry.mode_pads + ((0, 0),), mode=geometry.mode)
  return x, geometry


def _pad_to_extent(x: jax.Array, geometry: ConvGeometry) -> jax.Array:
  """Applies the (possibly negative) zero padding, then crops what no window reads.

  The result has spatial shape ``geometry.extent``: a VALID convolution of it
  is the convolution asked for.
  """
  config = [(0, 0, 0)]
  for size, (lo, _hi), need in zip(x.shape[1:-1], geometry.pads, geometry.extent, strict=False):
    config.append((lo, need - size - lo, 0))  # a negative high end crops
  config.append((0, 0, 0))
  if not any(lo or hi for lo, hi, _ in config):
    return x
  return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def patch_route(geometry: ConvGeometry) -> str:
  """Which of ``ROUTES`` builds the patches of ``geometry``.

  Non-overlapping windows are a reshape; overlapping windows of at most
  ``SLICES_MAX_WINDOW`` offsets are strided slices (fastest at run time);
  larger ones use the identity convolution, whose compile time does not grow
  with the window.

  Example:
    >>> vit_b16 = jax.ShapeDtypeStruct((64, 224, 224, 3), jnp.float32)
    >>> patch_route(conv_geometry(vit_b16, (16, 16), 16))
    'non_overlapping'
    >>> patch_route(conv_geometry(vit_b16, (7, 7), 2))
    'strided_slices'
  """
  if geometry.tiles_without_overlap:
    return 'non_overlapping'
  if geometry.window <= SLICES_MAX_WINDOW:
    return 'strided_slices'
  return 'identity_conv'


# ----------------------------------------------------------------------------
# Patch rows, one route each
# ----------------------------------------------------------------------------


def _group_rows(windows: jax.Array, geometry: ConvGeometry) -> jax.Array:
  """``(B, *out, *window, C)`` -> ``(groups, B * P, n)`` patch rows."""
  num_rows = windows.shape[0] * math.prod(geometry.out_spatial)
  groups, per_group = geometry.groups, geometry.group_channels
  if groups == 1:
    return windows.reshape(1, num_rows, geometry.num_features)
  rows = windows.reshape(num_rows, geometry.window, groups, per_group)
  rows = jnp.moveaxis(rows, 2, 0)
  return rows.reshape(groups, num_rows, geometry.num_features)


def _non_overlapping_rows(padded: jax.Array, geometry: ConvGeometry) -> jax.Array:
  """Patches of non-overlapping windows by one reshape and one transpose.

  Each spatial axis of extent ``(out - 1) * stride + k`` is padded at its end
  to ``out * stride`` and split into ``(out, stride)``; the first ``k`` of each
  stride are the window (the rest is the gap between windows).
  """
  num_spatial = len(geometry.kernel_size)
  x = padded
  if geometry.strides != geometry.kernel_size:
    fill = (
      [(0, 0, 0)]
      + [(0, s - k, 0) for k, s in zip(geometry.kernel_size, geometry.strides, strict=False)]
      + [(0, 0, 0)]
    )
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), fill)
  split = [padded.shape[0]]
  for out, stride in zip(geometry.out_spatial, geometry.strides, strict=False):
    split += [out, stride]
  x = x.reshape(split + [padded.shape[-1]])  # (B, o1, s1, o2, s2, ..., C)
  if geometry.strides != geometry.kernel_size:
    limits = list(x.shape)
    for axis, k in enumerate(geometry.kernel_size):
      limits[2 + 2 * axis] = k
    x = jax.lax.slice(x, [0] * x.ndim, limits)  # (B, o1, k1, o2, k2, ..., C)
  order = (
    [0]
    + [1 + 2 * axis for axis in range(num_spatial)]
    + [2 + 2 * axis for axis in range(num_spatial)]
    + [x.ndim - 1]
  )
  return _group_rows(x.transpose(order), geometry)


def _strided_slice_rows(padded: jax.Array, geometry: ConvGeometry) -> jax.Array:
  """Patches from strided slices, one spatial dimension at a time.

  Along each spatial axis, one strided slice per window offset is stacked just
  before the channels, so window axes accumulate in kernel order:
  ``(B, *out, *window, C)``, the Flax kernel order. ``sum(kernel_size)``
  slices in all, not ``prod(kernel_size)``.
  """
  x = padded
  for axis, (k, s, d, out) in enumerate(
    zip(
      geometry.kernel_size, geometry.strides, geometry.dilation, geometry.out_spatial, strict=False
    )
  ):
    offsets = [
      jax.lax.slice_in_dim(x, j * d, j * d + (out - 1) * s + 1, s, axis=1 + axis) for j in range(k)
    ]
    x = jnp.stack(offsets, axis=x.ndim - 1)
  return _group_rows(x, geometry)


def _dimension_numbers(num_spatial: int) -> Tuple[str, str, str]:
  spatial = 'DHW'[3 - num_spatial :]
  return 'N' + spatial + 'C', spatial + 'IO', 'N' + spatial + 'C'


def _identity_conv_rows(padded: jax.Array, geometry: ConvGeometry) -> jax.Array:
  """Patches by ``conv_general_dilated_patches``, in its channel-major order.

  Features of a group are ordered ``(channel, *window)``; see
  ``_channel_major_to_flax`` for the permutation to Flax order.
  """
  patches = jax.lax.conv_general_dilated_patches(
    padded,
    geometry.kernel_size,
    geometry.strides,
    'VALID',
    rhs_dilation=geometry.dilation,
    dimension_numbers=_dimension_numbers(len(geometry.kernel_size)),
    precision=jax.lax.Precision.HIGHEST,
  )  # an exact copy, even on TPU/GPU
  num_rows = padded.shape[0] * math.prod(geometry.out_spatial)
  rows = patches.reshape(num_rows, geometry.groups, geometry.num_features)
  return jnp.moveaxis(rows, 1, 0)


def _channel_major_to_flax(geometry: ConvGeometry) -> np.ndarray:
  """Index ``perm``: Flax feature ``f`` is channel-major feature ``perm[f]``.

  Flax feature ``f = offset * C + c`` is channel-major feature
  ``c * window + offset`` (``C`` channels per group).
  """
  flax_features = np.arange(geometry.num_features)
  offset, channel = np.divmod(flax_features, geometry.group_channels)
  return channel * geometry.window + offset


_ROUTE_ROWS = {
  'non_overlapping': _non_overlapping_rows,
  'strided_slices': _strided_slice_rows,
  'identity_conv': _identity_conv_rows,
}


def _native_rows(padded: jax.Array, geometry: ConvGeometry, route: str) -> jax.Array:
  """``(groups, rows, n)`` patch rows in the route's own feature order."""
  if route == 'non_overlapping' and not geometry.tiles_without_overlap:
    raise ValueError(f'The non_overlapping route does not apply to {geometry}.')
  return _ROUTE_ROWS[route](padded, geometry)


def _flax_rows(padded: jax.Array, geometry: ConvGeometry, route: str) -> jax.Array:
  """``(groups, rows, n)`` patch rows in Flax kernel order."""
  rows = _native_rows(padded, geometry, route)
  if route == 'identity_conv':
    rows = rows[..., _channel_major_to_flax(geometry)]
  return rows


# ----------------------------------------------------------------------------
# The Gram matrix, chunked
# ----------------------------------------------------------------------------


def _gram_of_all(
  padded: jax.Array, geometry: ConvGeometry, route: str, precision: stats_lib.PrecisionLike
) -> jax.Array:
  """``(groups, n, n)`` Gram matrix of every patch of ``padded``, native order."""
  return stats_lib.gram(_native_rows(padded, geometry, route), precision)


def _gram_by_image_chunks(
  padded: jax.Array,
  geometry: ConvGeometry,
  route: str,
  precision: stats_lib.PrecisionLike,
  per_chunk: int,
) -> jax.Array:
  """Sums the Gram matrices of chunks of ``per_chunk`` images (``lax.scan``)."""
  num_chunks = -(-geometry.batch // per_chunk)
  extra = num_chunks * per_chunk - geometry.batch
  if extra:  # zero images add zero patches, hence nothing to the Gram matrix
    padded = jnp.pad(padded, [(0, extra)] + [(0, 0)] * (padded.ndim - 1))
  chunks = padded.reshape((num_chunks, per_chunk) + padded.shape[1:])
  chunk_geometry = dataclasses.replace(geometry, batch=per_chunk)

  def add_chunk(total: jax.Array, images: jax.Array) -> Tuple[jax.Array, None]:
    return total + _gram_of_all(images, chunk_geometry, route, precision), None

  n = geometry.num_features
  init = jnp.zeros((geometry.groups, n, n), stats_lib.stats_dtype(padded.dtype))
  total, _ = jax.lax.scan(add_chunk, init, chunks)
  return total


def _gram_by_bands(
  padded: jax.Array,
  geometry: ConvGeometry,
  route: str,
  precision: stats_lib.PrecisionLike,
  max_band_rows: int,
) -> jax.Array:
  """Sums Gram matrices of bands of output rows, one image at a time.

  A band of output rows along the first spatial axis reads a band of input
  rows (bands overlap where windows do). Bands have equal size, at most
  ``max_band_rows``; the input is zero-padded at the end of that axis so the
  last band's slice stays in range, and the output rows past the end (whose
  windows may still reach real input rows) are masked out.
  """
  out_rows = geometry.out_spatial[0]
  num_bands = -(-out_rows // max_band_rows)
  band_rows = -(-out_rows // num_bands)  # balanced: less than a row per band wasted
  stride = geometry.strides[0]
  surplus = num_bands * band_rows - out_rows
  if surplus:
    padded = jnp.pad(padded, [(0, 0), (0, surplus * stride)] + [(0, 0)] * (padded.ndim - 2))
  band_geometry = dataclasses.replace(
    geometry, batch=1, out_spatial=(band_rows,) + geometry.out_spatial[1:]
  )
  slice_size = (1, band_geometry.extent[0]) + padded.shape[2:]
  positions_per_row = math.prod(geometry.out_spatial[1:])

  def add_band(total: jax.Array, step: jax.Array) -> Tuple[jax.Array, None]:
    image, band = jnp.divmod(step, num_bands)
    start = [image, band * band_rows * stride] + [0] * (padded.ndim - 2)
    piece = jax.lax.dynamic_slice(padded, start, slice_size)
    rows = _native_rows(piece, band_geometry, route)
    if surplus:  # rows of output positions past the end contribute nothing
      first = band * band_rows * positions_per_row
      position = first + jnp.arange(rows.shape[1])
      inside = (position < out_rows * positions_per_row)[None, :, None]
      rows = jnp.where(inside, rows, jnp.zeros((), rows.dtype))
    return total + stats_lib.gram(rows, precision), None

  n = geometry.num_features
  init = jnp.zeros((geometry.groups, n, n), stats_lib.stats_dtype(padded.dtype))
  total, _ = jax.lax.scan(add_band, init, jnp.arange(geometry.batch * num_bands))
  return total


def _gram_by_image_chunks_any_batch(
  padded: jax.Array,
  geometry: ConvGeometry,
  route: str,
  precision: stats_lib.PrecisionLike,
  per_chunk: int,
) -> jax.Array:
  """``_gram_by_image_chunks`` for a batch of symbolic size ``b``.

  One program must serve every ``b``, including ``b < per_chunk``: the
  ``b // per_chunk`` whole chunks (possibly none) are summed in a
  ``fori_loop`` (a ``lax.scan`` must know that it runs at least once), and the
  last ``b mod per_chunk`` images form one smaller chunk. No zero image is
  added to the work. The loop slices chunks out of a copy of the input with
  ``per_chunk - 1`` zero images appended (never read), since a slice of
  ``per_chunk`` images must fit in the array for every ``b``.
  """
  batch = geometry.batch
  whole_chunks = batch // per_chunk
  covered = whole_chunks * per_chunk
  reachable = padded
  if per_chunk > 1:
    reachable = jnp.pad(padded, [(0, per_chunk - 1)] + [(0, 0)] * (padded.ndim - 1))
  chunk_geometry = dataclasses.replace(geometry, batch=per_chunk)

  def add_chunk(index: jax.Array, total: jax.Array) -> jax.Array:
    images = jax.lax.dynamic_slice_in_dim(reachable, index * per_chunk, per_chunk, axis=0)
    return total + _gram_of_all(images, chunk_geometry, route, precision)

  n = geometry.num_features
  init = jnp.zeros((geometry.groups, n, n), stats_lib.stats_dtype(padded.dtype))
  total = jax.lax.fori_loop(0, jnp.asarray(whole_chunks, jnp.int32), add_chunk, init)
  rest = jax.lax.slice_in_dim(padded, covered, batch, axis=0)
  rest_geometry = dataclasses.replace(geometry, batch=batch - covered)
  return total + _gram_of_all(rest, rest_geometry, route, precision)


def _chunked_gram(
  padded: jax.Array,
  geometry: ConvGeometry,
  route: str,
  precision: stats_lib.PrecisionLike,
  max_chunk_bytes: Optional[int],
) -> jax.Array:
  """``(groups, n, n)`` Gram matrix in the route's order, chunk by chunk.

  At most ``max_chunk_bytes`` of patches exist at once: chunks of whole
  images while one image fits, else bands of output rows of one image (at
  least one output row, whatever the budget). The choice rests on the static
  size of one example's patches, so a symbolic batch size (``jax.export``)
  chunks as a concrete one does; only where the shapes cannot tell whether
  the whole batch fits does the number of chunks wait for the run.
  """
  row_bytes = geometry.groups * geometry.num_features * padded.dtype.itemsize
  example_bytes = geometry.rows_per_example * row_bytes
  if max_chunk_bytes is None:
    return _gram_of_all(padded, geometry, route, precision)
  fits = stats_lib.settled(lambda: geometry.batch * example_bytes <= max_chunk_bytes)
  if fits:
    return _gram_of_all(padded, geometry, route, precision)
  if example_bytes <= max_chunk_bytes:
    per_chunk = max_chunk_bytes // example_bytes
    if jax.export.is_symbolic_dim(geometry.batch):
      return _gram_by_image_chunks_any_batch(padded, geometry, route, precision, per_chunk)
    return _gram_by_image_chunks(padded, geometry, route, precision, per_chunk)
  output_row_bytes = math.prod(geometry.out_spatial[1:]) * row_bytes
  max_band_rows = max(1, max_chunk_bytes // output_row_bytes)
  return _gram_by_bands(padded, geometry, route, precision, max_band_rows)


def _validated_budget(max_chunk_bytes: object) -> Optional[int]:
  """``max_chunk_bytes`` as an int of at least 1, or None."""
  if max_chunk_bytes is None:
    return None
  if isinstance(max_chunk_bytes, (bool, np.bool_)) or not isinstance(
    max_chunk_bytes, (int, float, np.integer, np.floating)
  ):
    raise TypeError(f'max_chunk_bytes={max_chunk_bytes!r} must be a number of bytes or None.')
  if not max_chunk_bytes >= 1:
    raise ValueError(
      f'max_chunk_bytes={max_chunk_bytes!r} must be at least 1 (or None for one chunk).'
    )
  return int(max_chunk_bytes)


# ----------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------


def _patches(
  x: jax.Array,
  kernel_size: IntOrSeq,
  strides: IntOrSeq,
  padding: PaddingLike,
  dilation: IntOrSeq,
  feature_group_count: int,
  route: Optional[str],
) -> jax.Array:
  """``conv_patches`` by ``route`` (one of ``ROUTES``; None: the best)."""
  x, geometry = _prepare(
    x, kernel_size, strides, padding, dilation, feature_group_count, where='conv_patches'
  )
  route = route or patch_route(geometry)
  rows = _flax_rows(_pad_to_extent(x, geometry), geometry, route)
  return rows[0] if geometry.groups == 1 else rows


def _stats(
  x: jax.Array,
  kernel_size: IntOrSeq,
  strides: IntOrSeq,
  padding: PaddingLike,
  dilation: IntOrSeq,
  feature_group_count: int,
  precision: stats_lib.PrecisionLike,
  max_chunk_bytes: Optional[int],
  route: Optional[str],
  form: Optional[str] = None,
) -> stats_lib.TractStats:
  """``conv_stats`` by ``route`` (one of ``ROUTES``; None: the best)."""
  form = stats_lib.check_form(form, 'conv_stats')
  max_chunk_bytes = _validated_budget(max_chunk_bytes)
  x, geometry = _prepare(x, kernel_size, strides, padding, dilation, feature_group_count)
  route = route or patch_route(geometry)
  dtype = stats_lib.stats_dtype(x.dtype)
  count = jnp.asarray(geometry.num_rows, dtype)
  with jax.named_scope('tract_conv_stats'):
    padded = _pad_to_extent(x, geometry)
    # N < n (an empty batch too: N = 0), or the rule for a symbolic batch size
    if stats_lib.woodbury_form(geometry.num_rows, geometry.num_features, form):
      rows = _flax_rows(padded, geometry, route).astype(dtype)
      rows = rows[0] if geometry.groups == 1 else rows
      return stats_lib.TractStats(moment=None, rows=rows, count=count)
    total = _chunked_gram(padded, geometry, route, precision, max_chunk_bytes)
    if route == 'identity_conv':  # permute the n x n result, not the patches
      order = _channel_major_to_flax(geometry)
      total = total[:, order][:, :, order]
    if stats_lib.settled(lambda: geometry.num_rows > 0):
      moment = total / geometry.num_rows
    else:  # form='moment' of an empty batch: zeros, not NaN
      moment = stats_lib.safe_divide(total, count)
    moment = moment[0] if geometry.groups == 1 else moment
    return stats_lib.TractStats(moment=moment, rows=None, count=count)


def conv_patches(
  x: jax.Array,
  kernel_size: IntOrSeq,
  strides: IntOrSeq = 1,
  padding: PaddingLike = 'SAME',
  dilation: IntOrSeq = 1,
  *,
  feature_group_count: int = 1,
) -> jax.Array:
  """The explicit patch matrix ``A`` of a convolution, in Flax kernel order.

  This is the obvious (memory-hungry) reference: it materialises all
  ``N x n`` patch entries. ``conv_stats`` avoids doing so. Arguments and
  defaults are those of ``flax.linen.Conv``, so ``A @ kernel.reshape(n, -1)``
  is the output of ``nn.Conv(..., kernel_size, strides, padding, ...)``, with
  output positions flattened.

  Args:
    x: channels-last inputs ``(batch..., *spatial, channels)``; integer and
      boolean inputs are cast to float32.
    kernel_size: window shape; its length sets 1-D, 2-D or 3-D.
    strides: window strides (int or one per spatial dim).
    padding: 'SAME' (the default, as in Flax), 'VALID', 'CIRCULAR',
      'REFLECT', 'CAUSAL' (1-D), an int, or one int or (low, high) pair per
      spatial dim; negative values crop the input.
    dilation: kernel dilation (int or one per spatial dim).
    feature_group_count: number of input channel groups.

  Returns:
    ``(N, n)`` patch rows, or ``(groups, N, n)`` when ``feature_group_count > 1``;
    feature ``k * (c_in / groups) + c`` pairs window offset ``k`` with channel ``c``.

  Raises:
    ValueError, TypeError: as ``conv_stats``.

  Example:
    >>> import jax.numpy as jnp
    >>> conv_patches(jnp.ones((2, 5, 5, 3)), (3, 3)).shape  # 'SAME': 5 x 5 outputs
    (50, 27)
    >>> conv_patches(jnp.ones((2, 5, 5, 3)), (3, 3), padding='VALID').shape
    (18, 27)
  """
  return _patches(x, kernel_size, strides, padding, dilation, feature_group_count, route=None)


def conv_stats(
  x: jax.Array,
  kernel_size: IntOrSeq,
  strides: IntOrSeq = 1,
  padding: PaddingLike = 'SAME',
  dilation: IntOrSeq = 1,
  *,
  feature_group_count: int = 1,
  precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
  max_chunk_bytes: Optional[int] = DEFAULT_MAX_CHUNK_BYTES,
  form: Optional[str] = None,
) -> stats_lib.TractStats:
  """Statistic of the inputs of a 1-D, 2-D or 3-D convolution.

  The moment ``A^T A / N`` of the patch rows is accumulated chunk by chunk, so
  at most ``max_chunk_bytes`` of patches exist at any time and the full
  ``N x n`` patch matrix is never materialised: chunks of whole images, or,
  when one image's patches exceed the budget, bands of output rows along the
  first spatial axis (at least one output row each). When ``N < n`` (decided
  from static shapes; an empty batch too) the patch rows are kept instead
  (Woodbury form). Arguments and defaults are those of ``flax.linen.Conv``.

  A symbolic batch size (``jax.export`` with ``jax.export.symbolic_shape``)
  works: the chunking rests on the static size of one image's patches
  (chunks of ``max_chunk_bytes // bytes per image`` images, their number
  counted at run time, so a small batch is one chunk), and where the shapes
  cannot tell ``N < n`` for every batch size, the moment is kept when
  ``n <= 4096``, the rows otherwise. ``form`` chooses outright.

  Args:
    x: channels-last inputs ``(batch..., *spatial, channels)``; one batch axis,
      several (flattened), or none (a single example), as Flax allows.
      Integer and boolean inputs (e.g. uint8 images) are cast to float32.
    kernel_size: window shape; its length sets 1-D, 2-D or 3-D.
    strides: window strides (int or one per spatial dim).
    padding: 'SAME' (the default, as in Flax), 'VALID', 'CIRCULAR',
      'REFLECT', 'CAUSAL' (1-D), an int, or one int or (low, high) pair per
      spatial dim; negative values crop the input, as in ``lax``.
    dilation: kernel (rhs) dilation (int or one per spatial dim).
    feature_group_count: input channel groups; the statistic then holds one
      ``n x n`` moment per group, ``n = prod(kernel_size) * channels / groups``.
    precision: matmul precision of the moment ('default', 'high', 'highest').
    max_chunk_bytes: patch bytes materialised at once; ``None`` for one chunk.
    form: 'moment', 'rows' (Woodbury form), or None (the default) to choose
      from the shapes as above.

  Returns:
    The layer's ``TractStats``, ``N = batch * output positions``.

  Raises:
    ValueError: wrong input rank, an argument out of range or with the wrong
      number of entries, channels not divisible by the groups, an empty
      output, or a ``form`` that is not understood.
    TypeError: complex inputs, or an argument of the wrong type (floats,
      booleans).

  Example:
    >>> import jax.numpy as jnp
    >>> s = tract_optax.conv_stats(jnp.ones((2, 8, 8, 3)), (3, 3))  # 'SAME'
    >>> s.moment.shape, float(s.count)
    ((27, 27), 128.0)
    >>> b, = jax.export.symbolic_shape('b')  # any batch size, one program
    >>> exported = jax.export.export(jax.jit(lambda v: tract_optax.conv_stats(v, (3, 3))))(
    ...     jax.ShapeDtypeStruct((b, 8, 8, 3), jnp.float32))
    >>> float(exported.call(jnp.ones((5, 8, 8, 3))).count)
    320.0
  """
  return _stats(
    x,
    kernel_size,
    strides,
    padding,
    dilation,
    feature_group_count,
    precision,
    max_chunk_bytes,
    route=None,
    form=form,
  )
