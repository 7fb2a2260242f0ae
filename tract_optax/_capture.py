"""Framework-neutral pieces of the Flax glue (:mod:`tract_optax.linen`,
:mod:`tract_optax.nnx`): layer selection, the statistic of one layer call
from the layer's settings, and merging statistics stacked by lifted
transforms (``scan``/``vmap``).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from tract_optax import conv as conv_lib
from tract_optax import paths as paths_lib
from tract_optax import stats as stats_lib
from tract_optax.stats import TractStats

Path = Tuple[Any, ...]
LayersLike = Union[None, str, Sequence[Union[str, Tuple[Any, ...]]]]

SUPPORTED = ('Dense/Linear (kernel (n_in, n_out)), DenseGeneral/LinearGeneral (one '
             'output feature axis, no batch axes) and Conv')


def normalize_layers(layers: LayersLike) -> Optional[List[Tuple[str, ...]]]:
  """``None`` (select the first layer) or the selected module paths as strings.

  Example:
    >>> normalize_layers(['stem', ('backbone', 'layers', 0)])
    [('stem',), ('backbone', 'layers', '0')]
  """
  if layers is None:
    return None
  if isinstance(layers, str):
    return [paths_lib.normalize_path(layers)]
  if isinstance(layers, tuple) and layers and all(
      isinstance(part, (str, int)) for part in layers):
    raise TypeError(
        f'layers={layers!r} is ambiguous: one nested path or several paths? '
        f'Pass a list: [{layers!r}] for the layer at that path, or '
        f'{list(layers)!r} for several top-level layers.')
  layers = list(layers)
  if not layers:
    raise ValueError('layers must name at least one module path, or be None '
                     'to select the first Conv/Dense layer called.')
  return [paths_lib.normalize_path(path) for path in layers]


def format_paths(paths: Sequence[Path]) -> str:
  return ', '.join(repr(paths_lib.format_path(paths_lib.normalize_path(p)))
                   for p in paths) or 'none'


def unsupported_layer(path: Path, type_name: str, reason: str) -> ValueError:
  return ValueError(
      f'The layer {paths_lib.format_path(paths_lib.normalize_path(path))!r} is '
      f'a {type_name}: {reason} TrAct supports {SUPPORTED}; pass layers=[...] '
      'to select a supported layer explicitly.')


def not_called(missing: Sequence[Path], called: Sequence[Path]) -> ValueError:
  return ValueError(
      f'The selected layer(s) {format_paths(missing)} were never called in the '
      f'forward pass. Conv/Dense layers called: {format_paths(called)}.')


def check_selection(selected: Optional[Sequence[Path]], auto_path: Optional[Path],
                    recorded, called: Sequence[Path]) -> None:
  """Raises if the forward pass did not call the layers that were asked for.

  Args:
    selected: the requested layer paths, or None for automatic selection.
    auto_path: the automatically selected layer (None if no layer was called).
    recorded: the paths whose statistics were recorded.
    called: every Conv/Dense path called, for the message.
  """
  if selected is None:
    if auto_path is None:
      raise no_layer_called()
    return
  missing = [path for path in selected if path not in recorded]
  if missing:
    raise not_called(missing, called)


def missing_input(path: Path) -> TypeError:
  return TypeError(
      f'Cannot find the input of layer {format_paths([path])}: call it with the '
      'input as its first argument (or as inputs=...).')


def call_input(path: Path, args, kwargs):
  """The input of a layer call: the first positional argument or ``inputs=``."""
  if args:
    return args[0]
  if 'inputs' in kwargs:
    return kwargs['inputs']
  raise missing_input(path)


def no_layer_called() -> ValueError:
  return ValueError(
      'No Conv or Dense/Linear layer was called in the forward pass, so there '
      'is no first layer to precondition.')


def as_float(x: jax.Array) -> jax.Array:
  """``x`` without gradient, integer inputs (e.g. uint8 images) as float32."""
  x = jax.lax.stop_gradient(jnp.asarray(x))
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(jnp.float32)
  return x


def spatial_ints(value, size: int) -> Tuple[int, ...]:
  """A Flax conv int-or-sequence setting (``None`` meaning 1) as a tuple."""
  if value is None:
    return (1,) * size
  if isinstance(value, int):
    return (value,) * size
  return tuple(int(v) for v in value)


def conv_layer_stats(path: Path, type_name: str, x: jax.Array, conv: Any, *,
                     precision, max_chunk_bytes) -> TractStats:
  """Statistic of one call of a Flax ``Conv`` layer, Linen or NNX.

  Both kinds name their settings alike (``kernel_size``, ``strides``,
  ``padding``, ``input_dilation``, ``kernel_dilation``, ``feature_group_count``,
  ``mask``), so they are read from the layer here, once for both.
  """
  kernel_size, input_dilation, mask = conv.kernel_size, conv.input_dilation, conv.mask
  kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
  size = len(kernel_size)
  if any(d != 1 for d in spatial_ints(input_dilation, size)):
    raise unsupported_layer(
        path, type_name, f'input_dilation={input_dilation} (a transposed '
        'convolution) is not supported: its patches interleave zeros.')
  if mask is not None:
    raise unsupported_layer(
        path, type_name, 'a masked kernel (mask=...) is not supported: the '
        'TrAct update of a masked kernel is a constrained least-squares problem.')
  return conv_lib.conv_stats(
      as_float(x), kernel_size, spatial_ints(conv.strides, size), conv.padding,
      spatial_ints(conv.kernel_dilation, size),
      feature_group_count=conv.feature_group_count,
      precision=precision, max_chunk_bytes=max_chunk_bytes)


def general_layer_stats(path: Path, type_name: str, x: jax.Array, *, axis,
                        num_out_axes: int, batch_axes, precision) -> TractStats:
  """Statistic of one call of a ``DenseGeneral`` / ``LinearGeneral`` layer.

  The contracted axes are moved last, in kernel order (ascending, as Flax
  sorts ``axis``), and flattened: exactly the rows whose products with the
  ``(prod(in), out)`` kernel give the output.
  """
  if num_out_axes != 1:
    raise unsupported_layer(
        path, type_name, f'its kernel has {num_out_axes} output feature axes, '
        'which tract would read as (prod(kernel.shape[:-1]), kernel.shape[-1]).')
  if batch_axes:
    raise unsupported_layer(
        path, type_name, f'batch axes {batch_axes} give one kernel per batch entry.')
  x = as_float(x)
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  axis = tuple(sorted(a % x.ndim for a in axis))  # Flax sorts them, too
  moved = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
  rows = moved.reshape(-1, math.prod(x.shape[a] for a in axis))
  return stats_lib.stats_from_rows(rows, precision=precision)


def merge_lifted(stats: TractStats, precision) -> TractStats:
  """One statistic from one stacked along leading axes by ``scan``/``vmap``.

  A layer called inside a lifted ``scan`` or ``vmap`` sows one statistic per
  iteration; they come out stacked (``count`` then has leading axes). For a
  kernel shared by all iterations the statistic is that of all their rows.

  Example:
    >>> rows = jnp.arange(12.0).reshape(3, 2, 2)  # 3 iterations of 2 rows
    >>> stacked = jax.vmap(tract_optax.dense_stats)(rows)
    >>> merged = merge_lifted(stacked, 'highest')
    >>> bool(jnp.allclose(merged.moment, tract_optax.dense_stats(rows).moment))
    True
  """
  lead = stats.count.ndim
  if lead == 0:
    return stats
  count = stats.count.reshape(-1)
  total = jnp.sum(count)
  if stats.moment is not None:
    moment = stats.moment.reshape((-1,) + stats.moment.shape[lead:])
    weights = count.reshape((-1,) + (1,) * (moment.ndim - 1))
    return TractStats(moment=jnp.sum(moment * weights, axis=0) / total,
                      rows=None, count=total)
  rows = stats.rows.reshape((-1,) + stats.rows.shape[lead:])
  rows = jnp.moveaxis(rows, 0, -3)  # (groups..., stacked, N, n)
  rows = rows.reshape(rows.shape[:-3] + (-1, rows.shape[-1]))
  if rows.shape[-2] < rows.shape[-1]:
    return TractStats(moment=None, rows=rows, count=total)
  return stats_lib.stats_from_rows(rows, precision=precision)


def per_iteration_kernel(path: Path, outer_shape, inner_shape) -> ValueError:
  return ValueError(
      f'The layer {paths_lib.format_path(paths_lib.normalize_path(path))!r} '
      f'runs inside scan/vmap with one kernel per iteration (kernel '
      f'{outer_shape}, each iteration sees {inner_shape}). tract preconditions '
      'a kernel as one (n, m) matrix, so per-iteration kernels are not '
      'supported; share the kernel across the transform (broadcast its '
      'params) or select another layer.')


def combine_calls(path: Path, calls: Sequence[TractStats], outer_shape,
                  inner_shape, precision) -> TractStats:
  """The statistic of all calls of one layer, lifted axes merged."""
  merged = []
  for stats in calls:
    stats = TractStats(*stats)
    if stats.count.ndim and outer_shape != inner_shape:
      raise per_iteration_kernel(path, outer_shape, inner_shape)
    merged.append(merge_lifted(stats, precision))
  return stats_lib.combine_stats(merged)
