"""Haiku glue: the first layer's output computed by the library's layer ops.

``apply_tract`` runs a transformed Haiku function's ``apply`` under
``hk.intercept_methods``. When a selected ``hk.ConvND`` (``hk.Conv1D`` /
``Conv2D`` / ``Conv3D``) or ``hk.Linear`` is called, the interceptor computes
its output itself, with ``tract_optax.conv`` / ``tract_optax.dense``
on the module's own parameters (``hk.get_parameter`` inside the module's
frame) and the geometry Haiku resolved in the module's constructor (stride,
padding in any of its forms, ``rate``, ``data_format``,
``feature_group_count``), plus the bias. The layer op takes the statistic
from that very input and geometry, so nothing is written twice, and
``jax.grad`` through ``apply_tract`` gives the layer's ``'w'`` its TrAct
gradient and every other leaf its ordinary one.

Without ``layers``, the first layer is the library's
(``tract_optax._src.first_layer``): the one Conv/Linear whose input
depends on no parameter, if it is also the first called. Haiku module names
(``'cnn/~/conv2_d'``, the keys of the params dict) name layers explicitly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import haiku as hk
import jax
import jax.numpy as jnp

from tract_optax._src import axes as axes_lib
from tract_optax._src import capture as _capture
from tract_optax._src import docs_link, first_layer, gradient_route, layer_ops
from tract_optax._src import paths as paths_lib
from tract_optax._src.paths import ModulePath

#: How the layers are called in messages.
KIND = 'hk.Conv/hk.Linear'

_SEE = docs_link.see('routes', 'Haiku')

_LAYERS = (hk.ConvND, hk.Linear)


def _path(module: hk.Module) -> ModulePath:
  """The module's name as a path: ``'cnn/~/conv2_d'`` -> ``('cnn', '~', 'conv2_d')``."""
  return paths_lib.normalize_path(module.module_name)


def _type_name(module: hk.Module) -> str:
  return f'hk.{type(module).__name__}'


def _check_layer(module: hk.Module, path: ModulePath) -> None:
  """Refuses anything but a Haiku ConvND / Linear computed as Haiku does."""
  name = paths_lib.format_path(path)
  for base in _LAYERS:
    if isinstance(module, base):
      if type(module).__call__ is not base.__call__:
        raise TypeError(
          f'apply_tract: {type(module).__name__} {name!r} subclasses hk.{base.__name__} '
          "but overrides __call__, so its output need not be the plain layer's. Use "
          'the plain layer, or tract_optax.tract_kernel on the weight your __call__ '
          'multiplies.' + _SEE
        )
      if isinstance(module, hk.ConvND) and module.mask is not None:
        raise ValueError(
          f'apply_tract: {type(module).__name__} {name!r} has a mask, which changes '
          'the kernel it multiplies, so the TrAct gradient of its stored w is not '
          'defined. Drop the mask, or use tract_optax.tract_kernel on w * mask.' + _SEE
        )
      return
  raise TypeError(
    f'apply_tract: layers names {name!r}, a {_type_name(module)}; TrAct takes '
    'hk.Linear and hk.ConvND (hk.Conv1D/2D/3D). For other layers use '
    'tract_optax.tract_kernel on the weight.' + _SEE
  )


def _never_init(shape: Sequence[int], dtype: Any) -> jax.Array:
  del shape, dtype
  raise ValueError(
    'apply_tract runs apply, not init: the selected layer has no parameters in '
    'params. Initialise with the transformed init first.' + _SEE
  )


def _call_input(
  path: ModulePath, args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Tuple[jax.Array, Tuple[Any, ...], Dict[str, Any]]:
  if args:
    return args[0], args[1:], kwargs
  if 'inputs' in kwargs:
    rest = dict(kwargs)
    return rest.pop('inputs'), (), rest
  raise _capture.missing_input(path)


def _tract_output(
  module: Union[hk.ConvND, hk.Linear],
  path: ModulePath,
  args: Tuple[Any, ...],
  kwargs: Dict[str, Any],
  options: Dict[str, Any],
) -> jax.Array:
  """The module's ``__call__``, its kernel product computed by a layer op.

  Runs inside the module's frame (an interceptor does), so
  ``hk.get_parameter`` reads the module's own parameters (and goes through
  any ``hk.custom_getter`` as the module's own call would).
  """
  inputs, rest, kwargs = _call_input(path, args, kwargs)
  precision = kwargs.pop('precision', None)
  if rest or kwargs:
    raise TypeError(
      f'apply_tract: {_type_name(module)} {paths_lib.format_path(path)!r} was called with '
      f'arguments besides its input and precision ({len(rest)} positional, '
      f'{sorted(kwargs)}), which Haiku does not take.' + _SEE
    )
  inputs = jnp.asarray(inputs)
  options = dict(options, precision=precision, name=paths_lib.format_path(path))
  if isinstance(module, hk.Linear):
    if not inputs.shape:
      raise ValueError('Input must not be scalar.')
    w = hk.get_parameter('w', [inputs.shape[-1], module.output_size], inputs.dtype, _never_init)
    out = layer_ops.dense(inputs, w, **options)
    if module.with_bias:
      b = hk.get_parameter('b', [module.output_size], inputs.dtype, _never_init)
      out = out + jnp.broadcast_to(b, out.shape)
    return out
  assert isinstance(module, hk.ConvND)  # _check_layer admits these two kinds only
  unbatched_rank = module.num_spatial_dims + 1
  if inputs.ndim not in (unbatched_rank, unbatched_rank + 1):
    raise ValueError(
      f'Input to ConvND needs to have rank in {[unbatched_rank, unbatched_rank + 1]}, '
      f'but input has shape {inputs.shape}.'
    )
  unbatched = inputs.ndim == unbatched_rank
  if unbatched:
    inputs = inputs[None]
  channels = inputs.shape[module.channel_index]
  groups = module.feature_group_count
  if channels % groups:
    raise ValueError(
      f'Inputs channels {channels} should be a multiple of feature_group_count {groups}'
    )
  w_shape = tuple(module.kernel_shape) + (channels // groups, module.output_channels)
  w = hk.get_parameter('w', w_shape, inputs.dtype, _never_init)
  out = layer_ops.conv(
    inputs,
    w,
    tuple(module.stride),
    module.padding,
    tuple(module.lhs_dilation),
    tuple(module.kernel_dilation),
    module.dimension_numbers,
    groups,
    **options,
  )
  if module.with_bias:
    if module.channel_index == -1:
      bias_shape: tuple = (module.output_channels,)
    else:
      bias_shape = (module.output_channels,) + (1,) * module.num_spatial_dims
    b = hk.get_parameter('b', bias_shape, inputs.dtype, _never_init)
    out = out + jnp.broadcast_to(b, out.shape)
  return out[0] if unbatched else out


class _Marking:
  """Interceptor marking the input of every ``hk.ConvND`` / ``hk.Linear`` call for ``probe``."""

  def __init__(self, probe: first_layer.DependencyProbe) -> None:
    self.probe = probe
    self.active: List[ModulePath] = []  # a subclass calling super().__call__ is one call

  def __call__(
    self,
    next_fun: Callable[..., Any],
    call_args: Tuple[Any, ...],
    call_kwargs: Dict[str, Any],
    context: hk.MethodContext,
  ) -> Any:
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, _LAYERS):
      return next_fun(*call_args, **call_kwargs)
    path = _path(module)
    if path in self.active:
      return next_fun(*call_args, **call_kwargs)
    self.active.append(path)
    try:
      inputs, rest, rest_kwargs = _call_input(path, call_args, call_kwargs)
      marked = self.probe.mark(inputs, path, _type_name(module))
      return next_fun(marked, *rest, **rest_kwargs)
    finally:
      self.active.pop()


def _probe_first_layer(
  apply_fn: Callable[..., Any], params: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> ModulePath:
  """The first layer of ``apply_fn`` by ``tract_optax._src.first_layer``'s rule."""
  probe = first_layer.DependencyProbe()

  def run(probed_params: Any, inputs: Any, _: Optional[jax.Array]) -> None:
    probed_args, probed_kwargs = inputs
    with hk.intercept_methods(_Marking(probe)):
      apply_fn(probed_params, *probed_args, **probed_kwargs)

  return probe.select(run, params, (args, kwargs), KIND)


def _normalize_layers(layers: Union[str, Sequence[str]]) -> List[ModulePath]:
  names = [layers] if isinstance(layers, str) else list(layers)
  if not names or not all(isinstance(name, str) and name for name in names):
    raise TypeError(
      "apply_tract: layers takes Haiku module names, e.g. layers=['cnn/~/conv2_d'] "
      f'(the keys of the params dict); got {layers!r}.' + _SEE
    )
  return [paths_lib.normalize_path(name) for name in names]


class _LayerOps:
  """Interceptor computing the selected layers' calls with the layer ops (one pass).

  Attributes:
    selected: the layers to compute; with ``take_first`` (and none given),
      the first ``hk.ConvND`` / ``hk.Linear`` called becomes the selection.
    seen: every ``hk.ConvND`` / ``hk.Linear`` called, in order.
  """

  def __init__(
    self, selected: List[ModulePath], options: Dict[str, Any], take_first: bool = False
  ) -> None:
    self.selected = selected
    self.options = options
    self.take_first = take_first
    self.seen: List[ModulePath] = []
    self.done: List[ModulePath] = []  # selected layers computed by a layer op
    self.active: List[ModulePath] = []

  def __call__(
    self,
    next_fun: Callable[..., Any],
    call_args: Tuple[Any, ...],
    call_kwargs: Dict[str, Any],
    context: hk.MethodContext,
  ) -> Any:
    module = context.module
    if context.method_name != '__call__':
      return next_fun(*call_args, **call_kwargs)
    path = _path(module)
    if isinstance(module, _LAYERS) and path not in self.seen:
      self.seen.append(path)
      if self.take_first and not self.selected:
        self.selected.append(path)
    if path not in self.selected or path in self.active:
      return next_fun(*call_args, **call_kwargs)
    _check_layer(module, path)
    if path in self.done:
      raise ValueError(
        f'apply_tract: the layer {paths_lib.format_path(path)!r} is called more than '
        "once; each call's TrAct gradient would use its own rows only. Call it once "
        '(concatenate the views into one batch), or use the Optax route.' + _SEE
      )
    self.done.append(path)
    self.active.append(path)
    try:
      layer = cast(Union[hk.ConvND, hk.Linear], module)  # _check_layer refused anything else
      return _tract_output(layer, path, call_args, call_kwargs, self.options)
    finally:
      self.active.pop()

  def check_all_called(self) -> None:
    """Raises if a selected layer was never called."""
    missing = [path for path in self.selected if path not in self.done]
    if missing:
      names = ', '.join(repr(paths_lib.format_path(p)) for p in missing)
      called = ', '.join(repr(paths_lib.format_path(p)) for p in self.seen) or 'none'
      raise ValueError(
        f'apply_tract: layers names {names}, which the forward pass never called. '
        f'The {KIND} modules called: {called}.' + _SEE
      )


def apply_tract(
  apply_fn: Callable[..., Any],
  params: Any,
  *args: Any,
  lam: Union[float, jax.Array] = 0.1,
  layers: Union[str, Sequence[str], None] = None,
  axis_name: axes_lib.AxisName = None,
  local_stats: bool = False,
  relative_lam: bool = False,
  check_condition: Optional[bool] = None,
  per_lane_stats: bool = False,
  **kwargs: Any,
) -> Any:
  """``apply_fn(params, *args, **kwargs)`` whose gradient is TrAct's for the first layer.

  Returns exactly what ``apply_fn`` returns: for ``hk.transform``,
  ``apply_tract(f.apply, params, rng, x)``; for ``hk.transform_with_state``,
  ``apply_tract(f.apply, params, state, rng, x)`` returns ``(out, state)``.
  Differentiating with respect to ``params`` gives the selected layer's
  ``'w'`` the TrAct gradient ``(A^T A / N + lam I)^{-1} G`` for the rows
  ``A`` of its input in this call, and every other leaf (its bias included)
  its ordinary gradient. The layer's output is computed by
  ``tract_optax.conv`` / ``tract_optax.dense`` with the geometry
  Haiku resolved for the module, so the statistic is of exactly the rows
  its kernel multiplies.

  Args:
    apply_fn: the ``apply`` of an ``hk.transform`` /
      ``hk.transform_with_state`` (or any function calling Haiku modules
      with ``params`` first).
    params: the parameters, as for ``apply_fn``.
    *args: everything ``apply_fn`` takes after ``params`` (``rng, x`` or
      ``state, rng, x``).
    lam: ridge strength lambda > 0.
    layers: ``None`` for the first layer: the one ``hk.ConvND`` /
      ``hk.Linear`` whose input depends on no parameter, if it is also the
      first called; or Haiku module names (``'cnn/~/conv2_d'``, as the
      params dict's keys), one string or a list.
    axis_name: the ``vmap`` / ``pmap`` / ``shard_map`` axis (or axes) that
      split the batch: the statistic is all-reduced over them.
    local_stats: each device's own statistic on purpose.
    relative_lam: ridge ``lam * trace(A^T A / N) / n``.
    check_condition: as for ``tract_optax.tract_kernel``.
    per_lane_stats: under ``jax.vmap`` over independent models, each lane's
      own statistic.
    **kwargs: keyword arguments of ``apply_fn``.

  Returns:
    What ``apply_fn`` returns.

  Raises:
    ValueError: no first layer can be told apart (none or several take
      data-only input, or the first called takes a parameter-dependent one);
      a named layer was never called; a selected layer is called twice, or
      has a ``mask``; or as the layer ops.
    TypeError: a selected module is no ``hk.ConvND`` / ``hk.Linear``, or a
      subclass that overrides ``__call__``; ``layers`` is malformed;
      ``apply_fn`` is jitted (jit the loss instead).

  Example:
    >>> import haiku as hk
    >>> def net(x):
    ...   return hk.Linear(2, name='head')(jax.nn.relu(hk.Linear(4, name='stem')(x)))
    >>> f = hk.transform(net)
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> params = f.init(jax.random.key(1), x)
    >>> loss = lambda p: jnp.mean(apply_tract(f.apply, p, None, x) ** 2)
    >>> grads = jax.grad(loss)(params)
    >>> plain = jax.grad(lambda p: jnp.mean(f.apply(p, None, x) ** 2))(params)
    >>> want = tract_optax.precondition(plain['stem']['w'], tract_optax.dense_stats(x), 0.1)
    >>> bool(jnp.allclose(grads['stem']['w'], want, atol=1e-5))
    True
    >>> bool(jnp.allclose(grads['head']['w'], plain['head']['w']))
    True
  """
  gradient_route.check_settings(lam, axis_name, local_stats, 'apply_tract')
  if callable(getattr(apply_fn, 'lower', None)):  # jax.jit's wrapper
    raise TypeError(
      'apply_tract: apply_fn is jitted; a trace it cached would run without the layer '
      'ops (a plain gradient). Pass the plain f.apply and jit the loss around '
      'apply_tract.' + _SEE
    )
  options = dict(
    lam=lam,
    axis_name=axis_name,
    local_stats=local_stats,
    relative_lam=relative_lam,
    check_condition=check_condition,
    per_lane_stats=per_lane_stats,
  )

  def run(
    path: Optional[ModulePath], probe: Optional[first_layer.DependencyProbe]
  ) -> Tuple[Any, Optional[ModulePath]]:
    if path is None and probe is None:  # the layers named
      ops = _LayerOps(_normalize_layers(cast(Union[str, Sequence[str]], layers)), options)
    else:  # with a probe: the first layer called, taken provisionally
      ops = _LayerOps([] if path is None else [path], options, take_first=probe is not None)
    marking = contextlib.nullcontext() if probe is None else hk.intercept_methods(_Marking(probe))
    with marking, hk.intercept_methods(ops):  # marking first: it sees every input
      output = apply_fn(params, *args, **kwargs)
    ops.check_all_called()
    return output, (ops.selected[0] if ops.selected else None)

  if layers is not None:
    return run(None, None)[0]
  return first_layer.choose_in_pass(
    lambda: (apply_fn, first_layer.tree_spec((params, args, kwargs))),
    lambda: _probe_first_layer(apply_fn, params, args, kwargs),
    lambda: (params, (args, kwargs)),
    run,
    KIND,
  )
