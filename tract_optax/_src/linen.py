"""Flax Linen glue: first-layer input statistics captured in the forward pass.

``apply_with_stats`` runs ``module.apply`` under ``nn.intercept_methods``.
When a selected ``nn.Conv`` / ``nn.Dense`` / ``nn.DenseGeneral`` is called, the
interceptor computes the TrAct statistic of that call's input right there
(never keeping the input itself) and ``sow``s it into a private collection,
which Flax's lifted transforms (``nn.remat``, ``nn.scan``, ``nn.vmap``, ...)
carry out like any other variable. The collection is stripped again, so the
caller gets exactly what ``apply`` returns plus ``{module path: TractStats}``
for ``tract_optax.tract``. Without ``layers``, the first layer is found
by what it is, a layer whose input depends on no parameter (see
``tract_optax.first_layer``), or the call refuses and lists the candidates.

``apply_tract`` is the gradient route: it returns exactly what ``apply``
returns, and differentiating through it gives the first layer's kernel its
TrAct gradient, so any optimizer, ``TrainState`` and accumulation scheme
receive TrAct gradients with no ``tract_stats`` and no change to the chain.

``TractTrainState`` is Flax's ``TrainState`` whose ``apply_gradients``
forwards ``tract_stats`` to ``tx.update`` (the Optax route).

Inside ``nn.scan`` / ``nn.vmap`` the collection must be lifted explicitly:
add ``COLLECTION`` to ``variable_axes`` (e.g. ``{COLLECTION: 0}``). A layer whose
kernel is shared across the lifted axis (``variable_broadcast='params'`` or
``variable_axes={'params': None}``) then gets the statistic of the rows of all
iterations together, exactly; a layer with one kernel per iteration
(``variable_axes={'params': 0}``) is rejected, since ``tract`` treats a kernel
as one ``(n, m)`` matrix.
"""

from __future__ import annotations

import contextlib
import functools
from typing import (
  TYPE_CHECKING,
  Any,
  Callable,
  ContextManager,
  Dict,
  List,
  Mapping,
  Optional,
  Sequence,
  Tuple,
  TypeVar,
  Union,
  cast,
)

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import core as flax_core
from flax.core import meta
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state

from tract_optax._src import capture as _capture
from tract_optax._src import conv as conv_lib
from tract_optax._src import docs_link, first_layer, flax_compat, gradient_route, layer_core
from tract_optax._src import paths as paths_lib
from tract_optax._src import stats as stats_lib
from tract_optax._src import transform as transform_lib
from tract_optax._src.axes import AxisName
from tract_optax._src.paths import ModulePath
from tract_optax._src.stats import TractStats

if TYPE_CHECKING:
  from flax.linen.module import InterceptorContext

#: A Linen variables dict (``{'params': ..., 'batch_stats': ...}``), frozen or not.
Variables = Mapping[str, Any]
#: What Flax's ``apply`` returns as the mutated collections, and what
#: ``_with_entry`` builds: the same kind of dict as the one given.
VariablesDict = Union[flax_core.FrozenDict[str, Any], Dict[str, Any]]

COLLECTION = 'tract_stats'
"""Variable collection the statistics are sown into during ``apply``; add it to
``variable_axes`` of any ``nn.scan`` / ``nn.vmap`` around a selected layer."""

_SOW_NAME = 'tract_input_stats'


def _einsum_axes(layer: nn.Einsum) -> Optional[Tuple[Any, int, Tuple[int, ...]]]:
  axes = layer_core.einsum_row_axes(layer.einsum_str or '')
  return None if axes is None else (axes, 1, ())


def _dense_general_axes(layer: nn.DenseGeneral) -> Tuple[Any, int, Tuple[int, ...]]:
  features, batch_dims = layer.features, layer.batch_dims
  num_out_axes = 1 if isinstance(features, int) else len(tuple(features))
  return (
    layer.axis,
    num_out_axes,
    (batch_dims,) if isinstance(batch_dims, int) else tuple(batch_dims),
  )


#: The Linen layers TrAct computes statistics for, and those it recognises but
#: rejects (their kernel is not one ``(n, m)`` map of input rows).
LAYERS = layer_core.LayerTable(
  prefix='nn',
  conv=((nn.Conv, _capture.read_conv_settings),),
  dense=(nn.Dense,),
  general=((nn.DenseGeneral, _dense_general_axes), (nn.Einsum, _einsum_axes)),
  rejected=(
    (nn.ConvLocal, 'its kernel is not shared across positions (one per output position).'),
    (nn.ConvTranspose, layer_core.NOT_ROWS),
  ),
)
SUPPORTED_LAYERS = LAYERS.supported
_KERNEL_LAYERS = LAYERS.kernel_layers
#: Flax wrappers that hand the layer they hold a transformed kernel (through a
#: lifted ``map_variables``); named in the refusal when they are active.
_KERNEL_WRAPPERS = (nn.SpectralNorm, nn.WeightNorm)


def _check_not_mapped(module: nn.Module, path: ModulePath, type_name: str) -> None:
  """Raises if a ``map_variables`` (a reparameterisation wrapper) holds ``module``."""
  if module.scope is None:
    return
  mapped = flax_compat.map_variables_scope(module.scope)
  if mapped is not None:
    raise _capture.transformed_kernel(path, type_name, f'nn.map_variables (scope {mapped!r})')


def layer_input_stats(
  module: nn.Module,
  x: jax.Array,
  *,
  precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
  max_chunk_bytes: Optional[int] = conv_lib.DEFAULT_MAX_CHUNK_BYTES,
) -> TractStats:
  """Statistic of input ``x`` of a Linen layer, with the layer's own settings.

  Args:
    module: an ``nn.Dense``, ``nn.DenseGeneral`` or ``nn.Conv`` (bound or not).
    x: the input the layer is (or would be) called with; gradients are stopped.
    precision: matmul precision of the moment.
    max_chunk_bytes: patch bytes materialised at once (convolutions).

  Returns:
    The ``TractStats`` that fits the layer's kernel.

  Raises:
    ValueError: for layers or settings TrAct does not support (``nn.ConvLocal``,
      ``nn.ConvTranspose``, ``nn.Einsum``, ``input_dilation``, ``mask``,
      DenseGeneral with several output axes or ``batch_dims``), for
      subclasses that may not use the stored kernel linearly (see
      ``tract_optax.mark_linear_kernel``), and for a bound layer inside
      ``nn.map_variables`` (``nn.SpectralNorm``, ``nn.WeightNorm``, weight
      standardisation, masks), which hands it a transformed kernel.

  A layer with ``dtype=float16``/``bfloat16`` multiplies its input rounded
  to that type; the statistic is that of the rounded input (in float32).

  Example:
    >>> import flax.linen as nn
    >>> conv = nn.Conv(8, (3, 3), strides=2, padding='CIRCULAR')
    >>> s = layer_input_stats(conv, jnp.ones((2, 8, 8, 3)))
    >>> s.moment.shape, float(s.count)
    ((27, 27), 32.0)
  """
  path = tuple(module.path) if module.scope is not None else ()
  _check_not_mapped(module, path, LAYERS.type_name(module))
  return layer_core.layer_input_stats(
    LAYERS, module, x, path=path, precision=precision, max_chunk_bytes=max_chunk_bytes
  )


def _lookup(tree: Mapping[str, Any], path: ModulePath) -> Any:
  node = tree
  for name in path:
    if not hasattr(node, 'keys') or name not in node:
      return None
    node = node[name]
  return node


class _Recorder(layer_core.Recorder):
  """The interceptor of one statistics pass (static only)."""

  def __init__(
    self,
    selected: List[ModulePath],
    precision: stats_lib.PrecisionLike,
    max_chunk_bytes: Optional[int],
    params: Optional[Mapping[str, Any]] = None,
    stop_early: bool = False,
    take_first: bool = False,
  ) -> None:
    super().__init__(LAYERS, selected, precision, max_chunk_bytes, stop_early, take_first)
    self.params = {} if params is None else params  # the kernels as given to apply
    self.wrappers: List[str] = []  # active nn.SpectralNorm / nn.WeightNorm calls
    self.active: List[list] = []  # [path, superseded] frames

  def __call__(
    self,
    next_fun: Callable[..., Any],
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    context: InterceptorContext,
  ) -> Any:
    module = context.module
    if context.method_name != '__call__' or module.scope is None:
      return next_fun(*args, **kwargs)
    path = tuple(module.path)
    if isinstance(module, _KERNEL_WRAPPERS):
      self.wrappers.append(f'nn.{type(module).__name__} {paths_lib.format_path(path)!r}')
      try:
        return next_fun(*args, **kwargs)
      finally:
        self.wrappers.pop()
    self.saw_call(module, path)
    if path not in self.selected:
      return next_fun(*args, **kwargs)
    self._check_not_wrapped(module, path)  # before the call: a wrapper's own
    for frame in self.active:  # a subclass calling super().__call__: the
      if frame[0] == path:  # innermost call is the one the kernel sees
        frame[1] = True
    frame = [path, False]
    self.active.append(frame)
    try:
      output = next_fun(*args, **kwargs)
    finally:
      self.active.pop()
    if not frame[1]:
      self._record(module, path, args, kwargs)
    return output

  def _kernel_as_given(self, module: nn.Module, path: ModulePath) -> bool:
    """Whether the layer sees the very kernel array given to ``apply``.

    A ``map_variables`` that only moves metadata (``nn.add_metadata_axis``,
    partitioning helpers) passes the kernel array through untouched. (One
    with ``init=True`` runs the layer twice when other collections are
    mutable, the second time without its kernel: refused here, with the
    reason, instead of Flax's ``ScopeCollectionNotFound``.)
    """
    if not module.has_variable('params', paths_lib.KERNEL_NAME):
      return False
    given = _lookup(self.params, path + (paths_lib.KERNEL_NAME,))
    seen: Any = module.get_variable('params', paths_lib.KERNEL_NAME)
    return given is not None and meta.unbox(given) is meta.unbox(seen)

  def _check_not_wrapped(self, module: nn.Module, path: ModulePath) -> None:
    mapped = flax_compat.map_variables_scope(module.scope)
    if mapped is None or self._kernel_as_given(module, path):
      return
    wrapper = f'nn.map_variables (scope {mapped!r})'
    if self.wrappers:
      wrapper = f'{self.wrappers[-1]} (through {wrapper})'
    raise _capture.transformed_kernel(path, f'nn.{type(module).__name__}', wrapper)

  def _record(
    self, module: nn.Module, path: ModulePath, args: Tuple[Any, ...], kwargs: Dict[str, Any]
  ) -> None:
    inputs = _capture.call_input(path, args, kwargs)
    assert module.scope is not None  # the interceptor records bound layers only
    if not module.scope.is_mutable_collection(COLLECTION):
      raise ValueError(
        f'The layer {paths_lib.format_path(path)!r} runs inside a lifted '
        f'transform (nn.scan, nn.vmap, ...) that does not carry the '
        f'collection {COLLECTION!r}, so its statistic cannot leave the '
        f"transform. Add it to the transform's variable_axes, e.g. "
        f'variable_axes={{{COLLECTION!r}: 0, ...}}.'
      )
    stats = self.stats(module, path, inputs, args, kwargs)
    module.sow(COLLECTION, _SOW_NAME, stats)
    kernel_shape = None
    if module.has_variable('params', paths_lib.KERNEL_NAME):
      kernel_shape = tuple(jnp.shape(meta.unbox(module.get_variable('params', 'kernel'))))
    self.recorded_call(path, kernel_shape)
    self.keep(
      path,
      stats,
      transformed=self.stop_early
      and flax_compat.inside_lifted_transform(module.scope, tuple(module.path)),
    )

  def collect(self, sown: Mapping[str, Any], variables: Variables) -> Dict[ModulePath, TractStats]:
    """``{path: TractStats}`` from the sown collection, lifted axes merged."""
    result = {}
    params = variables.get('params', {})
    for path in self.recorded:
      entry = _lookup(sown, path)
      if entry is None or _SOW_NAME not in entry:
        raise ValueError(
          f'The statistic of layer {paths_lib.format_path(path)!r} did not come '
          'out of the forward pass: a lifted transform around it dropped the '
          f'collection {COLLECTION!r}; lift it like any sown collection.'
        )
      calls = entry[_SOW_NAME]
      kernel = _lookup(params, path + (paths_lib.KERNEL_NAME,))
      outer = None if kernel is None else tuple(jnp.shape(meta.unbox(kernel)))
      result[path] = self.combined(path, calls, outer)
    return result


def _strip_collection(mutated: VariablesDict) -> VariablesDict:
  """``mutated`` without ``COLLECTION`` (dict or FrozenDict alike)."""
  if COLLECTION not in mutated:
    return mutated
  rest, _ = flax_core.pop(mutated, COLLECTION)
  return rest


ModuleOrApply = Union[nn.Module, Callable[..., Any]]


def as_module(module_or_apply_fn: ModuleOrApply, owner: str) -> nn.Module:
  """The Linen module behind a module or its bound ``apply`` (``state.apply_fn``)."""
  if isinstance(module_or_apply_fn, nn.Module):
    return module_or_apply_fn
  target = module_or_apply_fn
  while isinstance(target, functools.partial) and not target.args and not target.keywords:
    target = target.func
  owner_object = getattr(target, '__self__', None)
  method_name = getattr(target, '__name__', '')
  if isinstance(owner_object, nn.Module) and method_name == 'apply':
    return owner_object
  needed = (
    f'{owner} needs the Linen module or its bound apply method (what '
    'TrainState.apply_fn holds when created with apply_fn=model.apply)'
  )
  if isinstance(owner_object, nn.Module):
    raise TypeError(
      f'{needed}; got its method {method_name}. Pass the module itself '
      f'({type(owner_object).__name__}(...)) or its .apply, with the variables as '
      'the next argument.'
    )
  holder = owner_object if owner_object is not None else target
  inner = getattr(holder, 'module', None)
  if isinstance(inner, nn.Module):
    raise TypeError(
      f'{needed}; got {type(holder).__name__}'
      f'{"." + method_name if owner_object is not None else ""}, a wrapper that '
      f'holds the Linen module {type(inner).__name__} as .module (as Hugging Face '
      'Flax models do). Pass model.module and its parameters, e.g. '
      f"{owner}(model.module, {{'params': params}}, inputs)."
    )
  raise TypeError(f'{needed}; got {module_or_apply_fn!r}.')


class _NoVariables:
  """Default of ``variables``: a call that forgot them gets a message, not Python's."""

  def __repr__(self) -> str:
    return '<no variables>'


_NO_VARIABLES: Any = _NoVariables()


def require_variables(variables: Any, owner: str) -> None:
  """Refuses a call without the variables (e.g. ``apply_tract(state.apply_fn, **batch)``)."""
  if variables is _NO_VARIABLES:
    raise TypeError(
      f'{owner} takes the variables as its second argument, as apply does: '
      f"{owner}(module_or_apply_fn, {{'params': params}}, *inputs, **kwargs); keyword "
      'inputs (**batch) go after them.' + docs_link.see('limits', 'Hugging Face Flax models')
    )


class _OutermostCalls:
  """An interceptor acting once per layer call: a subclass's
  ``super().__call__`` inside it is the same call. Subclasses say which
  layers they watch (``watches``) and what they do around a call (``call``)."""

  def __init__(self) -> None:
    self.active: List[ModulePath] = []  # watched calls under way

  def watches(self, layer: nn.Module, path: ModulePath) -> bool:
    raise NotImplementedError

  def call(
    self,
    layer: nn.Module,
    path: ModulePath,
    next_fun: Callable[..., Any],
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
  ) -> Any:
    raise NotImplementedError

  def __call__(
    self,
    next_fun: Callable[..., Any],
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    context: InterceptorContext,
  ) -> Any:
    layer = context.module
    if context.method_name != '__call__' or layer.scope is None:
      return next_fun(*args, **kwargs)
    path = tuple(layer.path)
    if path in self.active or not self.watches(layer, path):
      return next_fun(*args, **kwargs)
    self.active.append(path)
    try:
      return self.call(layer, path, next_fun, args, kwargs)
    finally:
      self.active.pop()


class _Marking(_OutermostCalls):
  """Interceptor marking the input of every Conv/Dense call for ``probe``."""

  def __init__(self, probe: first_layer.DependencyProbe) -> None:
    super().__init__()
    self.probe = probe

  def watches(self, layer: nn.Module, path: ModulePath) -> bool:
    return isinstance(layer, _KERNEL_LAYERS)

  def call(
    self,
    layer: nn.Module,
    path: ModulePath,
    next_fun: Callable[..., Any],
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
  ) -> Any:
    type_name = f'nn.{type(layer).__name__}'
    if args:
      args = (self.probe.mark(args[0], path, type_name),) + tuple(args[1:])
    elif 'inputs' in kwargs:
      kwargs = {**kwargs, 'inputs': self.probe.mark(kwargs['inputs'], path, type_name)}
    else:
      raise _capture.missing_input(path)
    return next_fun(*args, **kwargs)


def _probe_first_layer(
  module: nn.Module, variables: Variables, args: Sequence[Any], apply_kwargs: Mapping[str, Any]
) -> ModulePath:
  """The first layer of ``module`` by ``tract_optax.first_layer``'s rule."""
  probe = first_layer.DependencyProbe()

  def run(probed_params: Any, inputs: first_layer.ModelInputs, _: jax.Array) -> None:
    probed = dict(variables)
    probed['params'] = probed_params
    probed_args, probed_kwargs = inputs
    with nn.intercept_methods(_Marking(probe)):
      module.apply(probed, *probed_args, **probed_kwargs)

  return probe.select(run, _params_of(variables), (args, apply_kwargs), 'Conv/Dense')


_Result = TypeVar('_Result')
#: ``run(selected, marking)``: a pass of the glue, returning its result and the
#: layers it took. With ``marking`` (the first layer not known yet),
#: ``selected`` is empty: the pass takes the first layer called, and its
#: differentiated pass runs under ``marking``.
_GluePass = Callable[[List[ModulePath], Optional['_Marking']], Tuple[_Result, List[ModulePath]]]


def _with_first_layer(
  module: nn.Module,
  variables: Variables,
  args: Sequence[Any],
  apply_kwargs: Mapping[str, Any],
  layers: _capture.LayersLike,
  run: _GluePass[_Result],
) -> _Result:
  """``run`` for the named layers or for the first layer.

  Without ``layers`` the first layer is cached per module, structure and
  input types (Linen modules hash by their fields; other values by
  themselves), or read off the pass itself (see
  ``tract_optax.first_layer.choose_in_pass``), or probed.
  """
  selected = _capture.normalize_layers(layers)
  if selected is not None:
    return run(selected, None)[0]

  def run_pass(
    path: Optional[ModulePath], probe: Optional[first_layer.DependencyProbe]
  ) -> Tuple[_Result, Optional[ModulePath]]:
    if probe is None:
      return run([cast(ModulePath, path)], None)[0], path
    result, taken = run([], _Marking(probe))
    return result, (taken[0] if taken else None)

  def watched() -> Tuple[Any, Any]:
    others = {k: v for k, v in variables.items() if k != 'params'}
    return _params_of(variables), (others, args, apply_kwargs)

  return first_layer.choose_in_pass(
    lambda: (module, first_layer.tree_spec((variables, args, apply_kwargs))),
    lambda: _probe_first_layer(module, variables, args, apply_kwargs),
    watched,
    run_pass,
    'Conv/Dense',
  )


def apply_with_stats(
  module: ModuleOrApply,
  variables: Any = _NO_VARIABLES,
  *args: Any,
  layers: _capture.LayersLike = None,
  precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
  max_chunk_bytes: Optional[int] = conv_lib.DEFAULT_MAX_CHUNK_BYTES,
  **apply_kwargs: Any,
) -> Tuple[Any, Dict[ModulePath, TractStats]]:
  """``module.apply`` that also returns the TrAct statistics of chosen layers.

  The statistic of each selected layer's input is computed inside the forward
  pass (under ``stop_gradient``) when the layer is called; a layer called
  several times gets the statistic of all its calls' rows together.

  Args:
    module: the Linen module to apply, or its bound ``apply`` (e.g. a
      TrainState's ``apply_fn``).
    variables: its variables, as for ``module.apply``.
    *args: positional arguments of the applied method.
    layers: ``None`` for the first layer: the one ``nn.Conv`` / ``nn.Dense`` /
      ``nn.DenseGeneral`` whose input depends on no parameter, if it is also
      the first called (otherwise the call raises and lists the candidates);
      or a list of module paths (tuples like ``('backbone', 'patch_embed')``
      or strings like ``'backbone/patch_embed'``); a single string names one
      layer.
    precision: matmul precision of the statistics.
    max_chunk_bytes: patch bytes materialised at once for convolutions.
    **apply_kwargs: everything else ``module.apply`` takes (``rngs``,
      ``mutable``, ``method``, ...) and keyword arguments of the method.

  Returns:
    ``(apply_output, tract_stats)``: ``apply_output`` is exactly what
    ``module.apply`` returns (``(out, updates)`` with ``mutable=...``);
    ``tract_stats`` maps each selected layer's path (relative to ``module``, as
    in the params tree) to its ``TractStats``.

  Raises:
    ValueError: a selected layer was never called; without ``layers``, no
      first layer can be told apart (none or several Conv/Dense layers take
      data-only input, or the first called takes a parameter-dependent one);
      the layer is of an unsupported kind or a subclass that may not use its
      kernel linearly; a wrapper transforms its kernel before it uses it
      (``nn.SpectralNorm``, ``nn.WeightNorm``, an ``nn.map_variables`` that
      changes the kernel: weight standardisation, masks); or it sits in an
      ``nn.scan`` / ``nn.vmap`` that does not lift ``COLLECTION`` or has one
      kernel per iteration.
    TypeError: ``layers`` is an ambiguous tuple of names, or ``module`` is
      neither a Linen module nor its bound ``apply``.

  Example:
    >>> import flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> x = jnp.ones((8, 3))
    >>> variables = model.init(jax.random.key(0), x)
    >>> out, stats = apply_with_stats(model, variables, x)
    >>> list(stats), stats[('layers_0',)].moment.shape
    ([('layers_0',)], (3, 3))
  """
  module = as_module(module, 'apply_with_stats')
  require_variables(variables, 'apply_with_stats')

  def run(
    selected: List[ModulePath], marking: Optional[_Marking]
  ) -> Tuple[Tuple[Any, Dict[ModulePath, TractStats]], List[ModulePath]]:
    recorder = _Recorder(
      selected,
      precision,
      max_chunk_bytes,
      params=_params_of(variables),
      take_first=marking is not None,
    )
    with _intercepting(marking):
      result = _recorded_pass(module, variables, args, apply_kwargs, recorder)
    return result, recorder.selected

  return _with_first_layer(module, variables, args, apply_kwargs, layers, run)


def _params_of(variables: Variables) -> Any:
  return variables.get('params', {}) if hasattr(variables, 'get') else {}


def _intercepting(interceptor: Optional[Callable[..., Any]]) -> ContextManager[None]:
  """``nn.intercept_methods(interceptor)``, or nothing for None."""
  if interceptor is None:
    return contextlib.nullcontext()
  return nn.intercept_methods(interceptor)


def _recorded_pass(
  module: nn.Module,
  variables: Variables,
  args: Sequence[Any],
  apply_kwargs: Mapping[str, Any],
  recorder: _Recorder,
) -> Tuple[Any, Dict[ModulePath, TractStats]]:
  """``module.apply`` under ``recorder``: ``(apply's output, tract_stats)``; the
  output is None when the recorder ended the pass early."""
  apply_kwargs = dict(apply_kwargs)
  user_mutable = apply_kwargs.pop('mutable', False)
  mutable = flax_compat.union_filters(user_mutable, COLLECTION)
  try:
    with nn.intercept_methods(recorder):
      output, mutated = module.apply(variables, *args, mutable=mutable, **apply_kwargs)
  except layer_core.EnoughCalls:
    return None, recorder.collect_direct()
  recorder.check_selection()
  tract_stats = recorder.collect(mutated.get(COLLECTION, {}), variables)
  if user_mutable is False:
    return output, tract_stats
  return (output, _strip_collection(mutated)), tract_stats


class _CallCounter(_OutermostCalls):
  """Interceptor raising ``MoreCalls`` past ``limits[path]`` calls (counted
  outermost: a subclass's ``super().__call__`` is the same call)."""

  def __init__(self, limits: Dict[ModulePath, int]) -> None:
    super().__init__()
    self.limit = layer_core.CallLimit(limits)

  def watches(self, layer: nn.Module, path: ModulePath) -> bool:
    return path in self.limit.limits

  def call(
    self,
    layer: nn.Module,
    path: ModulePath,
    next_fun: Callable[..., Any],
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
  ) -> Any:
    self.limit.count(path)
    return next_fun(*args, **kwargs)


def _replace_kernel(
  tree: Mapping[str, Any], path: ModulePath, replace: Callable[[jax.Array], jax.Array]
) -> VariablesDict:
  """``tree`` with the kernel at ``path + ('kernel',)`` replaced (copies along the way)."""
  if not path:
    kernel = tree[paths_lib.KERNEL_NAME]
    new: Any
    if isinstance(kernel, meta.AxisMetadata):
      new = kernel.replace_boxed(replace(kernel.unbox()))
    else:
      new = replace(kernel)
    return _with_entry(tree, paths_lib.KERNEL_NAME, new)
  head, rest = path[0], path[1:]
  return _with_entry(tree, head, _replace_kernel(tree[head], rest, replace))


def _with_entry(tree: Mapping[str, Any], key: str, value: object) -> VariablesDict:
  if isinstance(tree, flax_core.FrozenDict):
    return flax_core.FrozenDict({**tree, key: value})
  return {**tree, key: value}


def apply_tract(
  module_or_apply_fn: ModuleOrApply,
  variables: Any = _NO_VARIABLES,
  *args: Any,
  lam: Union[float, jax.Array] = 0.1,
  layers: _capture.LayersLike = None,
  axis_name: AxisName = None,
  relative_lam: bool = False,
  local_stats: bool = False,
  precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
  max_chunk_bytes: Optional[int] = conv_lib.DEFAULT_MAX_CHUNK_BYTES,
  check_condition: Optional[bool] = None,
  per_lane_stats: bool = False,
  **apply_kwargs: Any,
) -> Any:
  """``apply`` whose gradient gives the first layer's kernel its TrAct gradient.

  Returns exactly what ``module.apply(variables, *args, **apply_kwargs)``
  returns. Differentiating through it gives, for each selected layer's
  kernel, ``(A^T A / N + lam I)^{-1} G`` with ``G`` the gradient of everything
  that flows through the layer (all its calls) and ``A`` its inputs in this
  pass; every other gradient, biases included, is unchanged. So ``jax.grad``
  hands any optimizer, Flax's own ``TrainState`` and any accumulation scheme
  TrAct gradients: no ``tract_stats``, no ``tract`` in the chain.

  The statistics come from a first pass (as ``apply_with_stats``, whose
  selection and checks it shares), traced without tangents and ended right
  after the selected layers' first calls, so it costs only what leads to
  their inputs; the main pass, with the kernels wrapped by
  ``tract_optax.tract_kernel``, checks that they are called no more
  (a layer called again later, e.g. a shared stem, makes both passes run in
  full). Without ``layers``, the first layer is chosen once per model
  structure and input types: read off this pass when it runs under
  ``jax.grad`` in every parameter, else probed (see ``docs/first_layer.md``).

  Args:
    module_or_apply_fn: the Linen module, or its bound ``apply``
      (``state.apply_fn``).
    variables: the variables, as for ``apply``; gradients are taken with
      respect to them (or ``variables['params']``) as usual.
    *args: positional arguments of the applied method.
    lam: ridge strength lambda > 0 (a number, or a traced scalar such as a
      schedule's value at the step).
    layers: the layers to precondition, as for ``apply_with_stats``
      (``None``: the first layer, found by its data-only input).
    axis_name: the ``pmap``/``shard_map`` axis (or axes) that split the batch;
      the statistic is all-reduced in the backward pass. Not needed under
      ``jit`` with a sharded batch. Inside a bound named axis it is required
      (or ``local_stats=True``).
    relative_lam: ridge ``lam * trace(A^T A / N) / n`` (scale-invariant).
    local_stats: precondition each device with its own statistic on purpose.
    precision: matmul precision of the statistics.
    max_chunk_bytes: patch bytes materialised at once for convolutions.
    check_condition: warn inside ``jit`` when a solve is ill-conditioned.
    per_lane_stats: under ``jax.vmap`` over independent models, each with its
      own kernel and its own data (an ensemble: ``vmap(grad(loss))`` over
      stacked parameters), precondition each lane with its own statistic; see
      ``tract_optax.tract_kernel``. Without it a per-lane statistic is
      refused.
    **apply_kwargs: everything else ``apply`` takes (``rngs``, ``mutable``,
      ``method``, ...) and keyword arguments of the method.

  Returns:
    What ``apply`` returns.

  Raises:
    ValueError, TypeError: as ``apply_with_stats``, and for a bad ``lam``
      or misused named axes.

  Example:
    >>> import flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> x = jax.random.normal(jax.random.key(0), (16, 3))
    >>> variables = model.init(jax.random.key(1), x)
    >>> loss = lambda p: jnp.mean(apply_tract(model, {'params': p}, x, lam=0.1) ** 2)
    >>> grads = jax.grad(loss)(variables['params'])
    >>> plain = jax.grad(lambda p: jnp.mean(model.apply({'params': p}, x) ** 2))(
    ...     variables['params'])
    >>> expected = tract_optax.precondition(plain['layers_0']['kernel'],
    ...                                     tract_optax.dense_stats(x), 0.1)
    >>> bool(jnp.allclose(grads['layers_0']['kernel'], expected, atol=1e-5))
    True
    >>> bool(jnp.allclose(grads['layers_2']['kernel'], plain['layers_2']['kernel']))
    True
  """
  module = as_module(module_or_apply_fn, 'apply_tract')
  require_variables(variables, 'apply_tract')
  wrap = gradient_route.kernel_wrapper(
    'apply_tract',
    lam=lam,
    axis_name=axis_name,
    local_stats=local_stats,
    relative_lam=relative_lam,
    check_condition=check_condition,
    per_lane_stats=per_lane_stats,
  )
  # The statistics pass is traced without tangents (the statistic is of inputs,
  # gradients stopped) and ends right after the selected layers' first calls;
  # the main pass checks that they are called no more, else both run in full.
  stopped = jax.lax.stop_gradient(variables)

  def run(selected: List[ModulePath], marking: Optional[_Marking]) -> Tuple[Any, List[ModulePath]]:
    for stop_early in (True, False):
      recorder = _Recorder(
        selected,
        precision,
        max_chunk_bytes,
        params=_params_of(stopped),
        stop_early=stop_early,
        take_first=marking is not None,
      )
      _, tract_stats = _recorded_pass(module, stopped, args, apply_kwargs, recorder)
      params = variables['params']
      for path, stats in tract_stats.items():
        name = paths_lib.format_path(path)
        params = _replace_kernel(params, path, functools.partial(wrap, stats=stats, name=name))
      wrapped = _with_entry(variables, 'params', params)
      counter = _CallCounter(recorder.limits()) if recorder.ended_early else None
      try:
        with _intercepting(marking), _intercepting(counter):
          return module.apply(wrapped, *args, **apply_kwargs), recorder.selected
      except layer_core.MoreCalls:
        continue  # a layer called again later: its statistic needs the whole pass
    raise AssertionError('unreachable: the full statistics pass never stops early')

  return _with_first_layer(module, variables, args, apply_kwargs, layers, run)


class TractTrainState(train_state.TrainState):
  """Flax ``TrainState`` whose ``apply_gradients`` hands ``tract_stats`` on.

  Flax's own ``apply_gradients`` calls ``tx.update(grads, opt_state, params)``
  and cannot pass the statistics ``tract_optax.tract`` needs. Everything
  else (step count, ``create``, ``replace``) is Flax's.

  It is for the Optax route; the gradient route (``apply_tract``) works
  with Flax's own ``TrainState``. It adds no field, so it subclasses exactly
  as Flax's does: Flax's ImageNet example's ``class TrainState(TrainState):
  batch_stats: Any; dynamic_scale: DynamicScale`` works on this base
  unchanged, and ``apply_gradients(..., batch_stats=new)`` updates such a
  field.

  Example:
    >>> import flax.linen as nn, optax
    >>> model = nn.Dense(2)
    >>> x = jnp.ones((8, 3))
    >>> params = {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}
    >>> tx = optax.chain(tract_optax.tract(0.1), optax.sgd(0.1))
    >>> state = TractTrainState.create(apply_fn=model.apply, params=params, tx=tx)
    >>> def loss_fn(params):
    ...   out, stats = apply_with_stats(model, {'params': params}, x)
    ...   return jnp.mean(out ** 2), stats
    >>> grads, stats = jax.grad(loss_fn, has_aux=True)(state.params)
    >>> int(state.apply_gradients(grads=grads, tract_stats=stats).step)
    1
  """

  def apply_gradients(
    self,
    *,
    grads: Any,
    tract_stats: Optional[Mapping[Any, TractStats]] = None,
    **kwargs: Any,
  ) -> TractTrainState:
    """Updates ``step``, ``params``, ``opt_state`` (and ``**kwargs`` fields).

    Args:
      grads: gradients with the structure of ``params``.
      tract_stats: ``{module path: TractStats}`` for ``tx.update``; ``None``
        calls ``tx.update`` without it (a plain optimizer).
      **kwargs: other dataclass fields to replace, e.g. ``batch_stats``.

    Returns:
      The new state, ``step`` incremented by one.

    Raises:
      ValueError: if ``tract_stats`` is given but ``tx`` holds no ``tract``
        (the step would silently be a plain one), or a known optimizer
        (Adam, momentum, ...) runs before ``tract`` in the chain.
    """
    overwrite = OVERWRITE_WITH_GRADIENT in grads
    grads_with_opt = grads['params'] if overwrite else grads
    params_with_opt = self.params['params'] if overwrite else self.params
    # statistics for a tx without tract, or tract after Adam: refused
    transform_lib.check_opt_state(
      self.opt_state,
      tract_stats=tract_stats,
      owner='TractTrainState.apply_gradients',
      init=lambda: self.tx.init(params_with_opt),
      tx=self.tx,
    )
    extra = {} if tract_stats is None else {'tract_stats': tract_stats}
    updates, new_opt_state = self.tx.update(
      grads_with_opt, self.opt_state, params_with_opt, **extra
    )
    new_params = optax.apply_updates(params_with_opt, updates)
    if overwrite:
      new_params = {'params': new_params, OVERWRITE_WITH_GRADIENT: grads[OVERWRITE_WITH_GRADIENT]}
    return self.replace(step=self.step + 1, params=new_params, opt_state=new_opt_state, **kwargs)
