"""Flax NNX glue: first-layer input statistics captured in the forward pass.

NNX has no method interceptor. For the duration of one forward pass, each
``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv`` of the model (and each
named layer) is given a thin subclass whose ``__call__`` computes the TrAct
statistic of its input (never keeping the input) and ``sow``s it as a
``TractInputStats`` variable; the original classes are restored before
the pass returns. The subclass is part of the module's type, so it survives the
copies NNX transforms make (``nnx.remat`` and friends), and the sown variable
leaves those transforms as module state does.

The statistics are collected with ``nnx.capture`` where Flax has it (0.12.6
and later), otherwise (or when an outer ``nnx.capture`` is active) they are
set as attributes and taken off again with ``nnx.pop``. Either way the
model's state and graph are the same before and after.

Module paths in the result are those of the kernels in ``nnx.state(model)``
and in gradients, e.g. ``('stem',)`` or ``('backbone', 'layers', 0)``.

Without ``layers``, the first layer is the one Conv/Linear whose input
depends on no parameter, if it is also the first called (see
``tract_optax.first_layer``); otherwise the call refuses and lists the
candidates. ``apply_tract`` is the gradient route: differentiate through
it and the first layer's kernel receives its TrAct gradient.

Inside ``nnx.vmap`` / ``nnx.scan`` the sown statistics need their own axis:
pass the module with ``in_axes=nnx.StateAxes({TractInputStats: 0, ...: None})``.
A layer whose kernel is shared across the transform then gets the exact
statistic of all its rows; one with a kernel per iteration is rejected, since
``tract`` treats a kernel as one ``(n, m)`` matrix.
"""

from __future__ import annotations

import functools
import threading
from typing import (
  Any,
  Callable,
  Dict,
  Hashable,
  List,
  Mapping,
  Optional,
  Sequence,
  Tuple,
  TypeVar,
  Union,
  cast,
)

import jax
import jax.numpy as jnp
from flax import nnx

from tract_optax._src import capture as _capture
from tract_optax._src import conv as conv_lib
from tract_optax._src import first_layer, flax_compat, gradient_route, layer_core
from tract_optax._src import paths as paths_lib
from tract_optax._src import stats as stats_lib
from tract_optax._src.axes import AxisName
from tract_optax._src.paths import ModulePath
from tract_optax._src.stats import TractStats

#: ``(args, kwargs)`` of a layer call, as a hooked ``__call__`` hands them on.
CallArgs = Tuple[Tuple[Any, ...], Dict[str, Any]]
#: The layers a statistic is recorded for (subclasses included).
_KernelLayer = Union[nnx.Linear, nnx.LinearGeneral, nnx.Conv]

_SOW_NAME = 'tract_input_stats'

#: Whether to collect with ``nnx.capture``; ``False`` uses attributes and
#: ``nnx.pop`` (the route for Flax before 0.12.6). Tests switch it off.
USE_CAPTURE = flax_compat.nnx_has_capture()


def _einsum_axes(layer: nnx.Einsum) -> Optional[Tuple[Any, int, Tuple[int, ...]]]:
  axes = layer_core.einsum_row_axes(layer.einsum_str or '')
  return None if axes is None else (axes, 1, ())


def _linear_general_axes(layer: nnx.LinearGeneral) -> Tuple[Any, int, Tuple[int, ...]]:
  return layer.axis, len(tuple(layer.out_features)), tuple(layer.batch_axis)


#: The NNX layers TrAct computes statistics for, and those it recognises but
#: rejects (their kernel is not one ``(n, m)`` map of input rows).
LAYERS = layer_core.LayerTable(
  prefix='nnx',
  conv=((nnx.Conv, _capture.read_conv_settings),),
  dense=(nnx.Linear,),
  general=((nnx.LinearGeneral, _linear_general_axes), (nnx.Einsum, _einsum_axes)),
  rejected=((nnx.ConvTranspose, layer_core.NOT_ROWS),),
  kind='Linear or Conv',
)
SUPPORTED_LAYERS = LAYERS.supported
_KERNEL_LAYERS = LAYERS.kernel_layers
#: Flax wrappers that rewrite the kernel of the layer they hold (their
#: ``layer_instance``) before each call (those this Flax has).
_KERNEL_WRAPPERS = tuple(
  getattr(nnx, name) for name in ('WeightNorm', 'SpectralNorm') if hasattr(nnx, name)
)


_TRANSFORM_HINT = (
  'An NNX transform (nnx.vmap, nnx.scan, ...) around a layer must give the '
  'TractInputStats variables it sows their own axis, e.g. in_axes=(nnx.StateAxes('
  '{tract_optax.nnx.TractInputStats: 0, ...: None}), ...) for the module.'
)


class TractInputStats(nnx.Intermediate):
  """Variable type of statistics sown during a captured forward pass.

  Only exists while ``capture_stats`` runs; never left on a model.
  """


def _wrapper_of(by_path: Dict[ModulePath, Any], path: ModulePath) -> Optional[str]:
  """The innermost Flax reparameterisation wrapper holding the module at ``path``."""
  for end in range(len(path) - 1, -1, -1):
    holder = by_path.get(tuple(path[:end]))
    if isinstance(holder, _KERNEL_WRAPPERS):
      where = paths_lib.format_path(paths_lib.normalize_path(path[:end])) or '(the model)'
      return f'nnx.{type(holder).__name__} {where!r}'
  return None


def layer_input_stats(
  layer: nnx.Module,
  x: jax.Array,
  *,
  path: ModulePath = (),
  precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
  max_chunk_bytes: Optional[int] = conv_lib.DEFAULT_MAX_CHUNK_BYTES,
) -> TractStats:
  """Statistic of input ``x`` of an NNX layer, with the layer's own settings.

  Args:
    layer: an ``nnx.Linear``, ``nnx.LinearGeneral`` or ``nnx.Conv``.
    x: the input the layer is (or would be) called with; gradients are stopped.
    path: the layer's path, for error messages.
    precision: matmul precision of the moment.
    max_chunk_bytes: patch bytes materialised at once (convolutions).

  Returns:
    The ``TractStats`` that fits the layer's kernel.

  Raises:
    ValueError: for layers or settings TrAct does not support
      (``nnx.ConvTranspose``, ``nnx.Einsum``, ``input_dilation``, ``mask``,
      LinearGeneral with several output axes or batch axes), and for
      subclasses that may not use the stored kernel linearly (see
      ``tract_optax.mark_linear_kernel``).

  A layer with ``dtype=float16``/``bfloat16`` multiplies its input rounded
  to that type; the statistic is that of the rounded input (in float32).

  Example:
    >>> from flax import nnx
    >>> make = lambda: nnx.Conv(3, 8, (3, 3), strides=2, rngs=nnx.Rngs(0))
    >>> conv = nnx.eval_shape(make)  # only the settings matter
    >>> s = layer_input_stats(conv, jnp.ones((2, 8, 8, 3)))
    >>> s.moment.shape, float(s.count)
    ((27, 27), 32.0)
  """
  return layer_core.layer_input_stats(
    LAYERS, layer, x, path=path, precision=precision, max_chunk_bytes=max_chunk_bytes
  )


_active = threading.local()


def _active_recorder() -> Optional[_Recorder]:
  stack = getattr(_active, 'stack', None)
  return stack[-1] if stack else None


def _reporting_call(call: Callable[..., Any], path: ModulePath) -> Callable[..., Any]:
  """``call`` (an unbound ``__call__``) that first reports to the active recorder."""

  def __call__(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
    recorder = _active_recorder()
    if recorder is not None:
      args, kwargs = recorder.observe(self, path, args, kwargs)
    return call(self, *args, **kwargs)

  return __call__


@functools.cache
def _reporting_base(base: type, path: ModulePath) -> type:
  """A subclass of the Flax layer ``base`` whose ``__call__`` reports its input."""
  namespace = {
    '__call__': _reporting_call(base.__call__, path),
    '_tract_hook': True,
    '__module__': base.__module__,
    '__qualname__': base.__qualname__,
  }
  return type(base.__name__, (base,), namespace)


@functools.cache
def _hooked_class(cls: type, path: ModulePath) -> type:
  """``cls`` with the Flax layer's own ``__call__`` reporting to the recorder.

  The report sits between ``cls`` and the Flax base class in the method
  resolution order: a subclass that changes its input before
  ``super().__call__`` (marked linear) reports what the kernel really sees.
  A module that is no Flax layer reports its own call.
  """
  base = next((klass for klass in cls.__mro__ if klass in _KERNEL_LAYERS), None)
  namespace = {
    '__module__': cls.__module__,
    '__qualname__': cls.__qualname__,
    '_tract_original_class': cls,
    '_tract_hook': True,
  }
  if base is None:
    namespace['__call__'] = _reporting_call(cls.__call__, path)
    return type(cls.__name__, (cls,), namespace)
  reporting = _reporting_base(base, path)
  bases = (reporting,) if cls is base else (cls, reporting)
  return type(cls.__name__, bases, namespace)


def _store(module: nnx.Module, stats: TractStats) -> None:
  """Sows ``stats`` (into ``nnx.capture``) or appends to the attribute."""
  if flax_compat.sow_into_capture(module, TractInputStats, _SOW_NAME, stats):
    return
  current = getattr(module, _SOW_NAME, None)
  if current is None:
    setattr(module, _SOW_NAME, TractInputStats((stats,)))
  else:
    flax_compat.set_variable_value(current, tuple(flax_compat.variable_value(current)) + (stats,))


def _kernel_layers(by_path: Dict[ModulePath, nnx.Module]) -> Dict[ModulePath, nnx.Module]:
  """The modules with a kernel among ``by_path`` (path -> module)."""
  return {path: module for path, module in by_path.items() if isinstance(module, _KERNEL_LAYERS)}


def _reach(model: nnx.Module, name: ModulePath) -> object:
  """The object at ``name`` by attribute (and index) access from ``model``, or None."""
  node: Any = model
  for part in name:
    try:
      text = str(part)
      node = node[int(text)] if text.isdigit() and not hasattr(node, text) else getattr(node, text)
    except (AttributeError, IndexError, KeyError, TypeError):
      return None
  return node


def _resolve(
  model: nnx.Module, by_path: Dict[ModulePath, nnx.Module], selected: Sequence[ModulePath]
) -> List[Tuple[ModulePath, nnx.Module]]:
  """The (path, module) of each selected name (paths as ``nnx.state`` has them).

  A module reachable under several names (``self.alias = self.stem``) has one
  path in the model's state, the first the graph walk meets; any of its names
  selects it, and its statistic is keyed by that one path.
  """
  by_name = {paths_lib.normalize_path(p): (p, m) for p, m in by_path.items()}
  resolved: List[Tuple[ModulePath, nnx.Module]] = []
  for name in selected:
    if name not in by_name:
      reached = _reach(model, name)
      shared = [(p, m) for p, m in by_path.items() if m is reached]
      if shared:
        resolved.append(shared[0])
        continue
      raise ValueError(
        f'The model has no submodule at path {paths_lib.format_path(name)!r}. '
        f'Its Conv/Linear layers: {_capture.format_paths(list(_kernel_layers(by_path)))}.'
      )
    resolved.append(by_name[name])
  return resolved


class _Hooks:
  """Swaps the classes of some modules for hooked ones, and back."""

  def __init__(self, modules: Dict[ModulePath, nnx.Module]) -> None:
    self.modules = modules

  def hook(self) -> None:
    for path, module in self.modules.items():
      if hasattr(type(module), '_tract_original_class'):
        raise RuntimeError(
          'tract_optax.nnx.capture_stats is already active on the layer '
          f'{paths_lib.format_path(paths_lib.normalize_path(path))!r}; '
          'captures of the same model cannot be nested.'
        )
    for path, module in self.modules.items():
      flax_compat.swap_class(module, _hooked_class(type(module), path))

  def unhook(self) -> None:
    for module in self.modules.values():
      original = getattr(type(module), '_tract_original_class', None)
      if original is not None:
        flax_compat.swap_class(module, original)


class _ProbeRecorder(_Hooks):
  """Marks the input of every Conv/Linear call for the dependency probe."""

  def __init__(self, model: nnx.Module, probe: first_layer.DependencyProbe) -> None:
    super().__init__(_kernel_layers(dict(flax_compat.iter_modules(model))))
    self.probe = probe

  def observe(
    self, module: nnx.Module, path: ModulePath, args: Tuple[Any, ...], kwargs: Dict[str, Any]
  ) -> CallArgs:
    return _marked(self.probe, module, path, args, kwargs)


def _marked(
  probe: first_layer.DependencyProbe,
  module: nnx.Module,
  path: ModulePath,
  args: Tuple[Any, ...],
  kwargs: Dict[str, Any],
) -> CallArgs:
  """The call's arguments with its input marked for ``probe``."""
  type_name = LAYERS.type_name(module)
  if args:
    return (probe.mark(args[0], path, type_name),) + tuple(args[1:]), kwargs
  if 'inputs' in kwargs:
    return args, {**kwargs, 'inputs': probe.mark(kwargs['inputs'], path, type_name)}
  raise _capture.missing_input(path)


def _call_model(model: nnx.Module, *args: Any, **kwargs: Any) -> Any:
  """``model(*args, **kwargs)``: one function object, so cache keys match."""
  return model(*args, **kwargs)


def _graph_spec(node: Any) -> Any:
  """Hashable structure of an NNX graph node: its GraphDef and state types."""
  graphdef, state = nnx.split(node)
  return graphdef, first_layer.tree_spec(state)


def _inputs_spec(inputs: Any) -> Any:
  """Hashable structure of ``(args, kwargs)``; a graph node (``nnx.Rngs``) by its own."""
  is_node = flax_compat.is_graph_node
  leaves, treedef = jax.tree_util.tree_flatten(inputs, is_leaf=is_node)
  specs = [_graph_spec(v) if is_node(v) else first_layer.leaf_spec(v) for v in leaves]
  return treedef, tuple(specs)


def _choice_key(
  fn: Callable[..., Any],
  graphdef: nnx.GraphDef[nnx.Module],
  state: nnx.State,
  args: Sequence[Any],
  kwargs: Mapping[str, Any],
) -> Hashable:
  return (fn, graphdef, first_layer.tree_spec(state), _inputs_spec((args, kwargs)))


_Result = TypeVar('_Result')


def _with_first_layer(
  fn: Callable[..., Any],
  split: Tuple[nnx.GraphDef[nnx.Module], nnx.State],
  model: nnx.Module,
  args: Sequence[Any],
  kwargs: Mapping[str, Any],
  run: first_layer.PassRun[_Result],
) -> _Result:
  """``run`` for the first layer of ``model`` called by ``fn``: cached per
  structure and input types, read off the pass itself under ``nnx.grad`` in
  every ``nnx.Param``, or probed (see
  ``tract_optax.first_layer.choose_in_pass``). ``split`` is the model's
  ``nnx.split``. A model hooked by an outer capture is probed: its layers
  cannot be marked a second time."""
  graphdef, state = split

  def watched() -> Optional[Tuple[Any, Any]]:
    modules = flax_compat.iter_modules(model)
    if any(hasattr(type(module), '_tract_original_class') for _, module in modules):
      return None
    params, rest = nnx.split_state(state, nnx.Param, ...)
    return params, (rest, args, kwargs)

  return first_layer.choose_in_pass(
    lambda: _choice_key(fn, graphdef, state, args, kwargs),
    lambda: _probe_first_layer(fn, graphdef, state, args, kwargs),
    watched,
    run,
    'Conv/Linear',
  )


def _probe_first_layer(
  fn: Callable[..., Any],
  graphdef: nnx.GraphDef[nnx.Module],
  state: nnx.State,
  args: Sequence[Any],
  kwargs: Mapping[str, Any],
) -> ModulePath:
  """The first layer of the model by ``tract_optax.first_layer``'s rule.

  Runs ``fn`` on a copy of the model (``graphdef`` and ``state``, as
  ``nnx.split`` gives them), abstractly: the model is untouched.
  """
  params, rest = nnx.split_state(state, nnx.Param, ...)
  rest_leaves, rest_def = jax.tree_util.tree_flatten(rest)
  probe = first_layer.DependencyProbe()

  def run(probed_params: nnx.State, inputs: first_layer.ModelInputs, _: jax.Array) -> None:
    # Variables of its own, created at this trace level, so the copy may be
    # mutated (BatchNorm statistics, RNG counts) inside the probe.
    own_rest = jax.tree_util.tree_unflatten(rest_def, rest_leaves)
    copy = nnx.merge(graphdef, probed_params, own_rest)
    own_args, own_kwargs = _copy_graph_nodes(inputs)  # e.g. an nnx.Rngs
    recorder = _ProbeRecorder(copy, probe)
    recorder.hook()
    _stack().append(recorder)
    try:
      fn(copy, *own_args, **own_kwargs)
    finally:
      _stack().pop()
      recorder.unhook()

  return probe.select(run, params, (args, kwargs), 'Conv/Linear')


def _stack() -> list:
  if not hasattr(_active, 'stack'):
    _active.stack = []
  return _active.stack


class _Recorder(layer_core.Recorder):
  """Which layers to watch, and what happened in one forward pass."""

  def __init__(
    self,
    model: nnx.Module,
    selected: Sequence[ModulePath],
    precision: stats_lib.PrecisionLike,
    max_chunk_bytes: Optional[int],
    stop_early: bool = False,
    take_first: bool = False,
    probe: Optional[first_layer.DependencyProbe] = None,
  ) -> None:
    by_path = dict(flax_compat.iter_modules(model))
    resolved = _resolve(model, by_path, selected)
    selected_paths = [path for path, _ in resolved]
    super().__init__(LAYERS, selected_paths, precision, max_chunk_bytes, stop_early, take_first)
    self.by_path = by_path
    self.probe = probe  # marks every layer input, when the pass is one the choice is read off
    for path, module in resolved:  # refused before the pass: the model is untouched
      wrapper = _wrapper_of(by_path, path)
      if wrapper is not None:
        raise _capture.transformed_kernel(path, LAYERS.type_name(module), wrapper)
    modules = _kernel_layers(by_path)
    modules.update(resolved)
    self.hooks = _Hooks(modules)
    # the stored kernels before the pass: one set anew before a layer's call
    # was computed by a module holding it (a reparameterisation)
    # (with take_first, of every layer: the one taken is known only in the pass)
    self.stored = {
      path: flax_compat.raw_variable_value(getattr(module, 'kernel', None))
      for path, module in (modules.items() if take_first else resolved)
    }

  def hook(self) -> None:
    self.hooks.hook()

  def unhook(self) -> None:
    self.hooks.unhook()

  def observe(
    self, module: nnx.Module, path: ModulePath, args: Tuple[Any, ...], kwargs: Dict[str, Any]
  ) -> CallArgs:
    if self.probe is not None:
      args, kwargs = _marked(self.probe, module, path, args, kwargs)
    taking = self.take_first and not self.selected
    self.saw_call(module, path)
    if taking and self.selected:  # the provisional first layer: checked as a selected one
      wrapper = _wrapper_of(self.by_path, path)
      if wrapper is not None:
        raise _capture.transformed_kernel(path, LAYERS.type_name(module), wrapper)
    if path in self.selected:
      self._record(module, path, args, kwargs)
    return args, kwargs

  def _check_kernel_unchanged(self, module: nnx.Module, path: ModulePath) -> None:
    if module is not self.hooks.modules.get(path) or self.stored.get(path) is None:
      return  # inside an NNX transform the layer is a copy with values of its own
    if flax_compat.raw_variable_value(getattr(module, 'kernel', None)) is not self.stored[path]:
      raise _capture.transformed_kernel(
        path,
        f'nnx.{type(module).__name__}',
        'a module that wrote a new kernel into it during the forward pass',
      )

  def _record(
    self, module: nnx.Module, path: ModulePath, args: Tuple[Any, ...], kwargs: Dict[str, Any]
  ) -> None:
    inputs = _capture.call_input(path, args, kwargs)
    stats = self.stats(module, path, inputs, args, kwargs)  # refuses unmarked subclasses first
    self._check_kernel_unchanged(module, path)
    _store(module, stats)
    kernel = getattr(module, 'kernel', None)
    self.recorded_call(
      path, None if kernel is None else tuple(flax_compat.variable_value(kernel).shape)
    )
    # inside an NNX transform the layer is a copy: its statistic must leave it
    self.keep(path, stats, transformed=module is not self.hooks.modules.get(path))

  def annotate(self, error: Exception) -> None:
    """Adds a hint to an error raised after statistics were sown."""
    if self.recorded and hasattr(error, 'add_note'):
      error.add_note(
        f'tract_optax.nnx sowed statistics in layer(s) '
        f'{_capture.format_paths(self.recorded)} before this error. ' + _TRANSFORM_HINT
      )

  def collect(self, sown: nnx.State) -> Dict[ModulePath, TractStats]:
    result: Dict[ModulePath, TractStats] = {}
    for path in self.recorded:
      node: Any = sown  # nested State down to the sown Variable
      for name in path + (_SOW_NAME,):
        if name not in node:
          raise ValueError(
            f'The statistic of layer {_capture.format_paths([path])} did not '
            'come out of the forward pass. ' + _TRANSFORM_HINT
          )
        node = node[name]
      calls = flax_compat.variable_value(node)
      kernel = getattr(self.hooks.modules[path], 'kernel', None)
      outer = None if kernel is None else tuple(flax_compat.variable_value(kernel).shape)
      result[path] = self.combined(path, calls, outer)
    return result


def capture_stats(
  fn: Callable[..., Any],
  *,
  layers: _capture.LayersLike = None,
  precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
  max_chunk_bytes: Optional[int] = conv_lib.DEFAULT_MAX_CHUNK_BYTES,
) -> Callable[..., Tuple[Any, Dict[ModulePath, TractStats]]]:
  """Wraps ``fn(model, *args, **kwargs)`` to also return TrAct statistics.

  Args:
    fn: a function whose first argument is the NNX model; it may call the
      model any number of times.
    layers: ``None`` for the first layer: the one ``nnx.Conv`` /
      ``nnx.Linear`` / ``nnx.LinearGeneral`` whose input depends on no
      parameter, if it is also the first called (otherwise the call raises
      and lists the candidates); or a list of attribute paths (tuples like
      ``('backbone', 'layers', 0)`` or strings like ``'backbone/layers/0'``);
      a single string names one layer.
    precision: matmul precision of the statistics.
    max_chunk_bytes: patch bytes materialised at once for convolutions.

  Returns:
    ``wrapped(model, *args, **kwargs) -> (fn(model, *args, **kwargs),
    tract_stats)`` with ``tract_stats`` mapping each selected layer's path (as
    in ``nnx.state(model)``) to the statistic of all its calls' inputs.

  Raises:
    ValueError: (when called) a selected path is not in the model or its layer
      was never called; without ``layers``, no first layer can be told apart
      (none or several Conv/Linear layers take data-only input, or the first
      called takes a parameter-dependent one); the layer is of an unsupported
      kind or a subclass that may not use its kernel linearly; a wrapper
      rewrites its kernel before it uses it (``nnx.WeightNorm``,
      ``nnx.SpectralNorm`` holding it, or any module that writes a new kernel
      into it during the pass, checked outside NNX transforms); it has one
      kernel per ``scan``/``vmap`` iteration; or its statistic did not leave
      an NNX transform (see the module docstring).
    TypeError: ``layers`` is an ambiguous tuple of names, or (when called) a
      selected layer was called without a positional or ``inputs=`` input.
    RuntimeError: (when called) a capture of the same model is already active.

  Example:
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu)
    >>> forward = capture_stats(lambda m, x: m(x))
    >>> out, stats = forward(model, jnp.ones((8, 3)))
    >>> list(stats), stats[('layers', 0)].moment.shape
    ([('layers', 0)], (3, 3))
  """
  selected = _capture.normalize_layers(layers)

  @functools.wraps(fn)
  def wrapped(
    model: nnx.Module, *args: Any, **kwargs: Any
  ) -> Tuple[Any, Dict[ModulePath, TractStats]]:
    if selected is not None:
      recorder = _Recorder(model, selected, precision, max_chunk_bytes)
      return _captured_call(fn, model, args, kwargs, recorder)

    def run(
      path: Optional[ModulePath], probe: Optional[first_layer.DependencyProbe]
    ) -> Tuple[Tuple[Any, Dict[ModulePath, TractStats]], Optional[ModulePath]]:
      chosen = [] if path is None else [paths_lib.normalize_path(path)]
      recorder = _Recorder(
        model, chosen, precision, max_chunk_bytes, take_first=path is None, probe=probe
      )
      result = _captured_call(fn, model, args, kwargs, recorder)
      return result, (recorder.selected[0] if recorder.selected else None)

    return _with_first_layer(fn, nnx.split(model), model, args, kwargs, run)

  return wrapped


def _captured_call(
  fn: Callable[..., Any],
  model: nnx.Module,
  args: Sequence[Any],
  kwargs: Mapping[str, Any],
  recorder: _Recorder,
) -> Tuple[Any, Dict[ModulePath, TractStats]]:
  """``fn(model, *args, **kwargs)`` with ``recorder`` hooked: ``(result,
  tract_stats)``; the result is None when the recorder ended the pass early."""
  use_capture = USE_CAPTURE and not flax_compat.capture_active(model)
  recorder.hook()
  _stack().append(recorder)
  try:
    if use_capture:
      try:
        result, sown = nnx.capture(fn, TractInputStats)(model, *args, **kwargs)
      except layer_core.EnoughCalls:
        flax_compat.drop_captures(model)
        return None, recorder.collect_direct()
      except Exception as error:
        flax_compat.drop_captures(model)
        recorder.annotate(error)
        raise
    else:
      registered = flax_compat.registered_nodes(model)
      try:
        result = fn(model, *args, **kwargs)
      except layer_core.EnoughCalls:
        return None, recorder.collect_direct()
      except Exception as error:
        recorder.annotate(error)
        raise
      finally:
        sown = nnx.pop(model, TractInputStats)
        flax_compat.unregister_popped(registered, _SOW_NAME)
  finally:
    _stack().pop()
    recorder.unhook()
  recorder.check_selection()
  return result, recorder.collect(sown)


def apply_with_stats(
  model: nnx.Module,
  *args: Any,
  layers: _capture.LayersLike = None,
  precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
  max_chunk_bytes: Optional[int] = conv_lib.DEFAULT_MAX_CHUNK_BYTES,
  **kwargs: Any,
) -> Tuple[Any, Dict[ModulePath, TractStats]]:
  """``model(*args, **kwargs)`` and the TrAct statistics of chosen layers.

  Args:
    model: the NNX model.
    *args: positional arguments of ``model.__call__``.
    layers: ``None`` for the first Conv/Linear layer called, or a list of
      attribute paths (see ``capture_stats``).
    precision: matmul precision of the statistics.
    max_chunk_bytes: patch bytes materialised at once for convolutions.
    **kwargs: keyword arguments of ``model.__call__``.

  Returns:
    ``(output, tract_stats)``, ``tract_stats`` as for ``tx.update``.

  Raises:
    ValueError: see ``capture_stats``.

  Example:
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> out, stats = apply_with_stats(model, jnp.ones((8, 3)))
    >>> list(stats)
    [()]
  """
  forward = capture_stats(
    _call_model, layers=layers, precision=precision, max_chunk_bytes=max_chunk_bytes
  )
  return forward(model, *args, **kwargs)


def value_and_grad_with_stats(
  loss_fn: Callable[..., Any],
  model: nnx.Module,
  *args: Any,
  layers: _capture.LayersLike = None,
  has_aux: bool = False,
  wrt: Any = nnx.Param,
  precision: stats_lib.PrecisionLike = stats_lib.DEFAULT_PRECISION,
  max_chunk_bytes: Optional[int] = conv_lib.DEFAULT_MAX_CHUNK_BYTES,
  **kwargs: Any,
) -> Tuple[Any, Any, Dict[ModulePath, TractStats]]:
  """``nnx.value_and_grad`` of ``loss_fn(model, *args, **kwargs)``, with statistics.

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs)`` returning a scalar loss, or
      ``(loss, aux)`` with ``has_aux=True``.
    model: the NNX model; gradients are taken with respect to its ``wrt``
      variables.
    *args: further positional arguments of ``loss_fn`` (not differentiated).
    layers: ``None`` for the first Conv/Linear layer called, or a list of
      attribute paths (see ``capture_stats``).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    wrt: NNX filter of the differentiated variables (default ``nnx.Param``).
    precision: matmul precision of the statistics.
    max_chunk_bytes: patch bytes materialised at once for convolutions.
    **kwargs: keyword arguments of ``loss_fn``.

  Returns:
    ``(value, grads, tract_stats)``: ``value`` is ``loss`` or ``(loss, aux)``
    as from ``nnx.value_and_grad``; ``grads`` the gradient State; pass
    ``tract_stats`` to ``nnx.Optimizer.update(model, grads, tract_stats=...)``.

  Raises:
    ValueError: see ``capture_stats``.

  Example:
    >>> import optax
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> tx = optax.chain(tract_optax.tract(0.1), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    >>> loss, grads, stats = value_and_grad_with_stats(loss_fn, model, jnp.ones((8, 3)))
    >>> _ = optimizer.update(model, grads, tract_stats=stats)
  """
  forward = capture_stats(
    loss_fn, layers=layers, precision=precision, max_chunk_bytes=max_chunk_bytes
  )

  def loss_with_stats(
    model: nnx.Module, *args: Any
  ) -> Tuple[
    Any, Tuple[Any, Dict[ModulePath, TractStats]]
  ]:  # keywords are closed over: NNX transforms
    value, tract_stats = forward(model, *args, **kwargs)  # map positions only
    loss, aux = value if has_aux else (value, None)
    return loss, (aux, tract_stats)

  grad_fn = nnx.value_and_grad(loss_with_stats, argnums=nnx.DiffState(0, wrt), has_aux=True)
  (loss, (aux, tract_stats)), grads = grad_fn(model, *args)
  return ((loss, aux) if has_aux else loss), grads, tract_stats


def _copy(node: Any) -> Any:
  """A copy of an NNX graph node (a Module, an ``nnx.Rngs``) with Variables
  of its own, created at the current trace level.

  ``nnx.merge`` reuses the Variable objects of the state it is given, so the
  state is rebuilt first: a pass on the copy never touches the original.
  """
  graphdef, state = nnx.split(node)
  return nnx.merge(graphdef, jax.tree_util.tree_map(lambda v: v, state))


def _stopped(value: Any) -> Any:
  """``value`` with its gradient stopped if it is a float array."""
  if jnp.issubdtype(jnp.result_type(value), jnp.inexact):
    return jax.lax.stop_gradient(value)
  return value


def _copy_graph_nodes(tree: Any) -> Any:
  """``tree`` with every NNX graph node in it copied (see ``_copy``).

  Arguments such as an ``nnx.Rngs`` passed to the model are mutated by the
  forward pass; a pass that must leave no trace uses copies of them.
  """
  is_node = flax_compat.is_graph_node
  return jax.tree_util.tree_map(lambda v: _copy(v) if is_node(v) else v, tree, is_leaf=is_node)


def apply_tract(
  model: nnx.Module,
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
  **kwargs: Any,
) -> Any:
  """``model(*args, **kwargs)`` whose gradient gives the first layer TrAct's.

  Returns exactly what ``model(*args, **kwargs)`` returns, and changes the
  model's state (and that of an ``nnx.Rngs`` passed in) exactly as that call
  does. Differentiating through it (with
  ``nnx.grad``, ``nnx.value_and_grad`` or ``jax.grad`` of a split model) gives
  each selected layer's kernel ``(A^T A / N + lam I)^{-1} G``, with ``G`` the
  gradient of everything that flows through the layer and ``A`` its inputs in
  this call; every other gradient is unchanged. So an unchanged
  ``nnx.Optimizer`` (with any optax chain, no ``tract``) trains with TrAct.

  The statistics come from a first pass on copies of the model and of any
  ``nnx.Rngs`` argument (RNG counters and batch statistics advance once, as
  for a plain call); under ``jit`` only what leads to the selected layers'
  inputs is computed of it.

  Args:
    model: the NNX model.
    *args: positional arguments of ``model.__call__``.
    lam: ridge strength lambda > 0 (a number or a traced scalar).
    layers: the layers to precondition (see ``capture_stats``).
    axis_name: the ``pmap``/``shard_map`` axis (or axes) that split the batch.
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
    **kwargs: keyword arguments of ``model.__call__``.

  Returns:
    ``model(*args, **kwargs)``.

  Raises:
    ValueError, TypeError: as ``capture_stats``, and for a bad ``lam`` or
      misused named axes.

  Example:
    >>> import optax
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    >>> x = jnp.ones((8, 3))
    >>> loss_fn = lambda m: jnp.mean(apply_tract(m, x, lam=0.1) ** 2)
    >>> grads = nnx.grad(loss_fn)(model)
    >>> _ = optimizer.update(model, grads)
  """
  wrap = gradient_route.kernel_wrapper(
    'apply_tract',
    lam=lam,
    axis_name=axis_name,
    local_stats=local_stats,
    relative_lam=relative_lam,
    check_condition=check_condition,
    per_lane_stats=per_lane_stats,
  )
  # One split serves the copy the statistics pass runs on: copies of the model
  # and of graph nodes among the arguments (an nnx.Rngs), so that the call below
  # draws the same random numbers and leaves the same state as a plain call. The
  # copy's values have their gradients stopped: the statistic is of inputs, and
  # its pass is traced without tangents. It ends right after the selected
  # layers' first calls; the main pass checks that they are called no more,
  # else the model and the arguments are set back and both passes run in full.
  graphdef, state = nnx.split(model)
  by_path = dict(flax_compat.iter_modules(model))

  def run(
    path: Optional[ModulePath], probe: Optional[first_layer.DependencyProbe]
  ) -> Tuple[Any, Optional[ModulePath]]:
    if path is None and probe is None:  # the layers named
      selected = _capture.normalize_layers(layers) or []
    else:
      selected = [] if path is None else [paths_lib.normalize_path(path)]
    watched = [module for _, module in _resolve(model, by_path, selected)]
    if path is None and probe is not None:
      watched = list(_kernel_layers(by_path).values())
    # a model hooked by an outer capture cannot be counted: no early end then
    stop_early = not any(hasattr(type(module), '_tract_original_class') for module in watched)
    for attempt in (stop_early, False):
      copy = nnx.merge(graphdef, jax.tree_util.tree_map(_stopped, state))
      copied_args, copied_kwargs = _copy_graph_nodes((args, kwargs))
      recorder = _Recorder(
        copy, selected, precision, max_chunk_bytes, stop_early=attempt, take_first=probe is not None
      )
      _, tract_stats = _captured_call(_call_model, copy, copied_args, copied_kwargs, recorder)
      taken = recorder.selected[0] if recorder.selected else None
      if not recorder.ended_early:
        return _wrapped_call(model, by_path, tract_stats, wrap, args, kwargs, None, probe), taken
      saved = (jax.tree_util.tree_map(lambda v: v, state), _copy_graph_nodes((args, kwargs)))
      try:
        output = _wrapped_call(
          model, by_path, tract_stats, wrap, args, kwargs, recorder.limits(), probe
        )
        return output, taken
      except layer_core.MoreCalls:
        nnx.update(model, saved[0])  # set back what the aborted pass changed
        _restore_graph_nodes((args, kwargs), saved[1])
    raise AssertionError('unreachable: the full statistics pass never ends early')

  if layers is not None:
    return run(None, None)[0]
  return _with_first_layer(_call_model, (graphdef, state), model, args, kwargs, run)


class _MainPassHooks(_Hooks):
  """The main pass's hooks: ``MoreCalls`` when a layer is called more often
  than its limit; with a probe, every layer input marked for it."""

  def __init__(
    self,
    modules: Dict[ModulePath, nnx.Module],
    limits: Dict[ModulePath, int],
    probe: Optional[first_layer.DependencyProbe],
  ) -> None:
    super().__init__(modules)
    self.limit = layer_core.CallLimit(limits)
    self.probe = probe

  def observe(
    self, module: nnx.Module, path: ModulePath, args: Tuple[Any, ...], kwargs: Dict[str, Any]
  ) -> CallArgs:
    self.limit.count(path)
    if self.probe is None:
      return args, kwargs
    return _marked(self.probe, module, path, args, kwargs)


def _restore_graph_nodes(tree: Any, saved: Any) -> None:
  """Sets each NNX graph node in ``tree`` back to its copy in ``saved``."""
  is_node = flax_compat.is_graph_node
  nodes = jax.tree_util.tree_leaves(tree, is_leaf=is_node)
  copies = jax.tree_util.tree_leaves(saved, is_leaf=is_node)
  for node, copy in zip(nodes, copies, strict=True):
    if is_node(node):
      nnx.update(node, nnx.state(copy))


def _wrapped_call(
  model: nnx.Module,
  by_path: Dict[ModulePath, nnx.Module],
  tract_stats: Dict[ModulePath, TractStats],
  wrap: Callable[..., jax.Array],
  args: Sequence[Any],
  kwargs: Mapping[str, Any],
  limits: Optional[Dict[ModulePath, int]],
  probe: Optional[first_layer.DependencyProbe] = None,
) -> Any:
  """``model(*args, **kwargs)`` with the selected kernels TrAct-wrapped; with
  ``limits``, a layer called more often raises ``MoreCalls``; with ``probe``,
  every layer input is marked for it."""
  counter = None
  if limits is not None or probe is not None:
    modules = _kernel_layers(by_path) if probe is not None else {}
    modules.update({path: by_path[path] for path in limits or {}})
    counter = _MainPassHooks(modules, limits or {}, probe)
    counter.hook()
    _stack().append(counter)
  originals = []
  try:
    for path, stats in tract_stats.items():
      kernel = cast(_KernelLayer, by_path[path]).kernel  # a recorded layer has one
      value = flax_compat.variable_value(kernel)
      originals.append((kernel, value))
      name = paths_lib.format_path(paths_lib.normalize_path(path))
      flax_compat.set_variable_value(kernel, wrap(value, stats, name=name))
    return model(*args, **kwargs)
  finally:
    for kernel, value in reversed(originals):
      flax_compat.set_variable_value(kernel, value)
    if counter is not None:
      _stack().pop()
      counter.unhook()
