"""Framework-neutral pieces of the Flax glue (``tract_optax.linen``,
``tract_optax.nnx``): layer selection, the statistic of one layer call
from the layer's settings, and merging statistics stacked by lifted
transforms (``scan``/``vmap``).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Container, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from tract_optax._src import conv as conv_lib
from tract_optax._src import docs_link
from tract_optax._src import paths as paths_lib
from tract_optax._src import stats as stats_lib
from tract_optax._src.paths import ModulePath
from tract_optax._src.stats import TractStats

LayersLike = Union[None, str, Sequence[Union[str, Tuple[Any, ...]]]]

SUPPORTED = 'Dense/Linear, DenseGeneral/LinearGeneral (one output axis, no batch axes) and Conv'


def _name(path: ModulePath) -> str:
  return paths_lib.format_path(paths_lib.normalize_path(path))


#: Class attribute set by ``mark_linear_kernel``.
LINEAR_MARK = '__tract_linear_kernel__'

# Methods a subclass may define without changing how the kernel is used:
# what dataclasses (Linen) generate, and NNX constructors.
_HARMLESS_OVERRIDES = frozenset({'__init__', '__eq__', '__hash__', '__repr__'})

# Settings that inject the layer's product: anything but Flax's default may
# quantize or reparameterise the kernel.
_INJECTED = (
  'dot_general',
  'dot_general_cls',
  'conv_general_dilated',
  'conv_general_dilated_cls',
  'promote_dtype',
)


def mark_linear_kernel(cls: type) -> type:
  """Declares a Conv/Dense subclass to use its stored kernel linearly.

  TrAct's closed form assumes the layer's output is linear in the stored
  ``kernel``, so the Flax glue rejects subclasses that override
  ``__call__``, ``param`` or other methods (weight standardisation, as in
  BiT's ``StdConv``, breaks the assumption). A subclass you know to be
  linear in the kernel (e.g. one that only logs, or rescales or reshapes its
  input before calling ``super().__call__``) is accepted once marked; the
  statistic is then that of the input the Flax layer itself receives. The
  mark covers the class it is put on: a subclass of a marked class that
  overrides more is checked again.

  Args:
    cls: a subclass of a Flax Conv/Dense (Linen or NNX).

  Returns:
    ``cls``, marked; usable as a class decorator.

  Example:
    >>> import flax.linen as nn
    >>> @tract_optax.mark_linear_kernel
    ... class LoggedConv(nn.Conv):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return super().__call__(x)
    >>> LoggedConv.__tract_linear_kernel__
    True
  """
  if not isinstance(cls, type):
    raise TypeError(f'mark_linear_kernel takes a class; got {cls!r}.')
  setattr(cls, LINEAR_MARK, True)  # vouches for this class only: a subclass
  return cls  # that overrides more must be marked again


def _default_setting(base: type, name: str) -> object:
  fields = getattr(base, '__dataclass_fields__', None)
  if fields is not None and name in fields:
    return fields[name].default
  try:
    constructor: Any = vars(base).get('__init__', object.__init__)  # the class's own
    parameter = inspect.signature(constructor).parameters.get(name)
  except (TypeError, ValueError):
    return inspect.Parameter.empty
  return inspect.Parameter.empty if parameter is None else parameter.default


def nonlinear_kernel_reason(layer: Any, bases: Tuple[type, ...]) -> Optional[str]:
  """Why ``layer`` may not use its stored kernel linearly, or None.

  A layer of exactly a Flax class, with Flax's own product, is linear in its
  kernel. A subclass that overrides a method of the Flax class (other than
  constructors and what dataclasses generate), or a layer with an injected
  product (``dot_general``, ``conv_general_dilated``, ``promote_dtype``: e.g.
  quantization), may not be, unless marked with ``mark_linear_kernel``.
  """
  cls = type(layer)
  base = next((klass for klass in cls.__mro__ if klass in bases), None)
  if base is None:
    return None
  for klass in cls.__mro__:
    if vars(klass).get(LINEAR_MARK):
      return None  # the mark vouches for its class and those above it, not below
    if klass is base:
      break
    if vars(klass).get('_tract_hook'):
      continue  # the NNX capture's own hook classes
    for name, value in vars(klass).items():
      if name in _HARMLESS_OVERRIDES or not hasattr(base, name):
        continue
      if callable(value) or isinstance(value, (property, staticmethod, classmethod)):
        return (
          f'its class {klass.__name__} overrides {name}() of '
          f'{base.__name__}, so its output may not be linear in the '
          'stored kernel (e.g. weight standardisation)'
        )
  for name in _INJECTED:
    if not hasattr(layer, name):
      continue
    default = _default_setting(base, name)
    if default is inspect.Parameter.empty:
      continue
    if getattr(layer, name) is not default:
      return (
        f'it computes its product with a custom {name}={getattr(layer, name)!r} '
        '(e.g. quantization), so its output may not be linear in the '
        'stored kernel'
      )
  return None


def check_linear_kernel(
  path: ModulePath, type_name: str, layer: Any, bases: Tuple[type, ...]
) -> None:
  """Raises if ``layer`` may not use its stored kernel linearly."""
  reason = nonlinear_kernel_reason(layer, bases)
  if reason is None:
    return
  raise ValueError(
    f'The layer {_name(path)!r} is a {type_name}: {reason}. If it does use '
    'the kernel linearly, decorate the class with @tract_optax.mark_linear_kernel; '
    'otherwise select another layer with layers=[...].'
    + docs_link.see('first_layer', 'The linearity guard')
  )


def transformed_kernel(path: ModulePath, type_name: str, wrapper: str) -> ValueError:
  """The error for a layer whose kernel a wrapper transforms before the layer uses it.

  Flax's reparameterisation wrappers (``SpectralNorm``, ``WeightNorm``,
  Linen's ``map_variables``: weight standardisation, masks) hand the layer a
  function of the stored kernel, so the layer's output is not linear in the
  kernel that is trained, and TrAct's closed form would give a wrong step.

  Args:
    path: the layer's module path.
    type_name: the layer's class, e.g. ``'nn.Dense'``.
    wrapper: what wraps it, e.g. ``"nn.SpectralNorm 'stem'"``.

  Returns:
    The ``ValueError`` to raise.
  """
  return ValueError(
    f'The layer {_name(path)!r} is a {type_name} wrapped by {wrapper}, which '
    'transforms the stored kernel, so the output is not linear in the stored kernel. '
    'Apply TrAct to a plain layer, or select another with layers=[...].'
    + docs_link.see('first_layer', 'Reparameterised kernels')
  )


def multiplied_input(x: Any, layer: Any) -> Any:
  """The input as ``layer`` multiplies it: cast to the layer's ``dtype`` if set.

  Flax layers promote their input, kernel and bias to ``dtype`` before the
  product, so a layer with ``dtype=float16``/``bfloat16`` rounds a float32
  input, and its kernel gradient comes from the rounded input: the statistic
  must be of that input too (computed in float32 all the same). With
  ``dtype=None`` the common type of input and parameters never rounds the
  input, so it is used as it is.

  Args:
    x: the layer's input.
    layer: a Flax Conv/Dense (Linen or NNX).

  Returns:
    ``x`` as the layer's product sees it.

  Example:
    >>> import flax.linen as nn
    >>> x = jnp.asarray([1.0 + 2.0 ** -12])
    >>> float(multiplied_input(x, nn.Dense(2, dtype=jnp.bfloat16))[0])
    1.0
  """
  dtype = getattr(layer, 'dtype', None)
  if dtype is None:
    return x
  x = jnp.asarray(x)
  real = jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
  if not real or not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    return x  # complex inputs are refused by the statistic with their own message
  return x.astype(dtype)


def conv_settings(conv: Any) -> Dict[str, Any]:
  """The geometry of a Flax Conv (Linen or NNX) as ``conv_stats`` takes it.

  For the manual route: ``tract_optax.conv_stats(x, **conv_settings(layer))``
  gives the statistic that fits the layer's kernel, with the layer's own
  kernel size, strides, padding (``nn.Conv`` defaults to 'SAME'), dilation and
  feature groups.

  Args:
    conv: a ``flax.linen.Conv`` (bound or not) or ``flax.nnx.Conv``.

  Returns:
    ``{'kernel_size', 'strides', 'padding', 'dilation', 'feature_group_count'}``.

  Raises:
    ValueError: for settings TrAct does not support (``input_dilation``, a
      ``mask``) or a layer that is not a convolution.

  Example:
    >>> import flax.linen as nn
    >>> conv_settings(nn.Conv(8, (7, 7), strides=2))
    {'kernel_size': (7, 7), 'strides': (2, 2), 'padding': 'SAME', 'dilation': (1, 1), 'feature_group_count': 1}
  """
  if not all(hasattr(conv, name) for name in ('kernel_size', 'strides', 'padding')):
    raise ValueError(f'conv_settings needs a Flax Conv (Linen or NNX); got {type(conv).__name__}.')
  return read_conv_settings(conv, (), type(conv).__name__)


def read_conv_settings(conv: Any, path: ModulePath, type_name: str) -> Dict[str, Any]:
  """``conv_settings`` with the layer's path and type for messages."""
  kernel_size = conv.kernel_size
  kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
  size = len(kernel_size)
  if any(d != 1 for d in spatial_ints(getattr(conv, 'input_dilation', None), size)):
    raise unsupported_layer(
      path,
      type_name,
      f'input_dilation={conv.input_dilation} (a transposed '
      'convolution) is not supported: its patches interleave zeros.',
    )
  if getattr(conv, 'mask', None) is not None:
    raise unsupported_layer(
      path,
      type_name,
      'a masked kernel (mask=...) is not supported: the '
      'TrAct update of a masked kernel is a constrained least-squares problem.',
    )
  return {
    'kernel_size': kernel_size,
    'strides': spatial_ints(conv.strides, size),
    'padding': conv.padding,
    'dilation': spatial_ints(getattr(conv, 'kernel_dilation', None), size),
    'feature_group_count': int(getattr(conv, 'feature_group_count', 1)),
  }


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
  paths_lib.reject_ambiguous_paths(layers)  # the rule tract(layers=...) follows too
  layers = list(layers)
  if not layers:
    raise ValueError(
      'layers must name at least one module path, or be None '
      'to select the first Conv/Dense layer called.'
    )
  return [paths_lib.normalize_path(path) for path in layers]


def format_paths(paths: Sequence[ModulePath]) -> str:
  return (
    ', '.join(repr(paths_lib.format_path(paths_lib.normalize_path(p))) for p in paths) or 'none'
  )


def unsupported_layer(path: ModulePath, type_name: str, reason: str) -> ValueError:
  return ValueError(
    f'The layer {_name(path)!r} is a {type_name}: {reason} TrAct supports '
    f'{SUPPORTED}; select one with layers=[...].'
    + docs_link.see('first_layer', 'Layers TrAct supports')
  )


def not_called(missing: Sequence[ModulePath], called: Sequence[ModulePath]) -> ValueError:
  return ValueError(
    f'The selected layer(s) {format_paths(missing)} were never called in the '
    f'forward pass. Conv/Dense layers called: {format_paths(called)}.'
  )


def check_selection(
  selected: Sequence[ModulePath], recorded: Container[ModulePath], called: Sequence[ModulePath]
) -> None:
  """Raises if the forward pass did not call the layers that were asked for.

  Args:
    selected: the requested (or automatically chosen) layer paths.
    recorded: the paths whose statistics were recorded.
    called: every Conv/Dense path called, for the message.
  """
  missing = [path for path in selected if path not in recorded]
  if missing:
    raise not_called(missing, called)


def missing_input(path: ModulePath) -> TypeError:
  return TypeError(
    f'Cannot find the input of layer {format_paths([path])}: call it with the '
    'input as its first argument (or as inputs=...).'
  )


def call_input(path: ModulePath, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
  """The input of a layer call: the first positional argument or ``inputs=``."""
  if args:
    return args[0]
  if 'inputs' in kwargs:
    return kwargs['inputs']
  raise missing_input(path)


def as_float(x: jax.Array) -> jax.Array:
  """``x`` without gradient, integer inputs (e.g. uint8 images) as float32."""
  return jax.lax.stop_gradient(stats_lib.as_real_input(x, 'the Flax capture'))


def spatial_ints(value: Union[int, Sequence[int], None], size: int) -> Tuple[int, ...]:
  """A Flax conv int-or-sequence setting (``None`` meaning 1) as a tuple."""
  if value is None:
    return (1,) * size
  if isinstance(value, int):
    return (value,) * size
  return tuple(int(v) for v in value)


def conv_stats_from_settings(
  x: jax.Array,
  settings: Dict[str, Any],
  *,
  precision: stats_lib.PrecisionLike,
  max_chunk_bytes: Optional[int],
) -> TractStats:
  """Statistic of one convolution call from its ``conv_settings`` geometry."""
  return conv_lib.conv_stats(
    as_float(x), **settings, precision=precision, max_chunk_bytes=max_chunk_bytes
  )


def general_layer_stats(
  path: ModulePath,
  type_name: str,
  x: jax.Array,
  *,
  axis: Union[int, Sequence[int]],
  num_out_axes: int,
  batch_axes: Sequence[int],
  precision: stats_lib.PrecisionLike,
) -> TractStats:
  """Statistic of one call of a ``DenseGeneral`` / ``LinearGeneral`` layer.

  The contracted axes are moved last, in kernel order (ascending, as Flax
  sorts ``axis``), and flattened: exactly the rows whose products with the
  ``(prod(in), out)`` kernel give the output.
  """
  if num_out_axes != 1:
    raise unsupported_layer(
      path,
      type_name,
      f'its kernel has {num_out_axes} output feature axes, '
      'which tract would read as (prod(kernel.shape[:-1]), kernel.shape[-1]).',
    )
  if batch_axes:
    raise unsupported_layer(
      path, type_name, f'batch axes {batch_axes} give one kernel per batch entry.'
    )
  x = as_float(x)
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  axis = tuple(sorted(a % x.ndim for a in axis))  # Flax sorts them, too
  moved = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
  rows = moved.reshape(-1, math.prod(x.shape[a] for a in axis))
  return stats_lib.stats_from_rows(rows, precision=precision)


def merge_lifted(stats: TractStats, precision: stats_lib.PrecisionLike) -> TractStats:
  """One statistic from one stacked along leading axes by ``scan``/``vmap``.

  A layer called inside a lifted ``scan`` or ``vmap`` sows one statistic per
  iteration; they come out stacked (``count`` then has leading axes). For a
  kernel shared by all iterations the statistic is that of all their rows:
  the same as ``combine_stats`` of the iterations, computed
  with one array operation whatever the number of iterations (a scan over
  thousands of steps adds nothing to trace or compile time).

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
  # Each iteration's statistic must be well formed; checked on shapes alone.
  shapes: List[Any] = [
    None if leaf is None else jax.ShapeDtypeStruct(jnp.shape(leaf)[lead:], leaf.dtype)
    for leaf in stats
  ]
  TractStats(*shapes).validate('the statistic of a layer inside scan/vmap')
  counts = stats.count.reshape(-1)
  total = jnp.sum(counts)
  if stats.rows is not None:
    # (iterations, [groups,] N, n) -> ([groups,] iterations * N, n): all rows.
    rows = stats.rows.reshape((-1,) + stats.rows.shape[lead:])
    if rows.ndim == 4:
      rows = jnp.moveaxis(rows, 0, 1)
    rows = rows.reshape(rows.shape[:-3] + (-1, rows.shape[-1]))
    if stats_lib.woodbury_form(rows.shape[-2], rows.shape[-1]):
      return TractStats(moment=None, rows=rows, count=total)
    return stats_lib.stats_from_rows(rows, precision=precision)
  # Moments weighted by their row counts; an iteration of no rows adds nothing.
  moment = stats.moment
  assert moment is not None  # validated: exactly one of rows and moment
  moments = moment.reshape((-1,) + moment.shape[lead:])
  weights = counts.astype(moments.dtype).reshape((-1,) + (1,) * (moments.ndim - 1))
  weighted = jnp.sum(moments * weights, axis=0)
  return TractStats(moment=stats_lib.safe_divide(weighted, total), rows=None, count=total)


def per_iteration_kernel(
  path: ModulePath, outer_shape: Optional[Tuple[int, ...]], inner_shape: Optional[Tuple[int, ...]]
) -> ValueError:
  return ValueError(
    f'The layer {_name(path)!r} runs inside scan/vmap with one kernel per '
    f'iteration (kernel {outer_shape}, each iteration sees {inner_shape}). Share '
    'the kernel across the transform (broadcast its params) or select another layer.'
    + docs_link.see('first_layer', 'Layers TrAct supports')
  )


def combine_calls(
  path: ModulePath,
  calls: Sequence[TractStats],
  outer_shape: Optional[Tuple[int, ...]],
  inner_shape: Optional[Tuple[int, ...]],
  precision: stats_lib.PrecisionLike,
) -> TractStats:
  """The statistic of all calls of one layer, lifted axes merged."""
  merged = []
  for stats in calls:
    stats = TractStats(*stats)
    if stats.count.ndim and outer_shape != inner_shape:
      raise per_iteration_kernel(path, outer_shape, inner_shape)
    merged.append(merge_lifted(stats, precision))
  return stats_lib.combine_stats(merged, precision=precision)
