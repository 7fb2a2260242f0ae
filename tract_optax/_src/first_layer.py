"""Which layer is a first layer: one whose input depends on no parameter.

Automatic selection (``layers=None`` in the Linen and NNX glue) must find the
image stem or refuse. It traces the forward pass once more, abstractly
(``jax.eval_shape``: no computation), under ``jax.jvp`` with respect to the
parameters, and marks the input of every Conv/Dense call with an identity
whose JVP rule reports whether a tangent reaches it: a symbolic zero means
the input is computed from data alone. This works through nested ``jit``,
``scan`` (``nn.scan``, ``nnx.scan``, ``lax.scan``), ``remat``, ``vmap`` and
``shard_map``, whose JVP rules run the marker's rule on their bodies. A call
whose rule never runs says nothing: a trace whose result is thrown away (the
extra trace ``nn.scan`` makes to check its loop invariants) or a call hidden
from ``jvp`` (inside a ``jax.custom_vjp`` function). A layer is therefore
judged by the calls the rule did see, and is unknown only when it saw none.

The verdict: the layer is selected when exactly one Conv/Dense takes
data-only input and it is the first one called. Otherwise the call refuses;
the message lists the data-only candidates with their input types, counts
the others (naming a few), and suggests the candidate that reads the model's
largest input argument of at least 3 dimensions (an image batch, or a batch
of token or patch sequences), found by a second abstract trace with ``jvp``
in that argument alone; a time-step MLP or a label embedding, though
data-only, reads another argument and is never suggested.

A pass the glue runs anyway can stand in for the probe's trace
(``choose_in_pass``): only the first layer called can be chosen, so the pass
takes it provisionally and marks every layer input with a token whose tangent
comes from the parameters alone (``DependencyProbe.watch``). Under a
``jax.grad`` in every parameter and nothing else, each marker's rule sees
what it would see in the probe; otherwise the probe runs.

The probe runs abstractly even when the model is called eagerly, so a model
that turns an array into a Python value (``if float(jnp.max(x)) > 1: ...``)
fails there; the error says so and names ``layers=[...]``, which skips the
probe.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import (
  Any,
  Callable,
  Dict,
  Hashable,
  Iterable,
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
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from tract_optax._src import capture as _capture
from tract_optax._src import docs_link, jax_compat
from tract_optax._src import paths as paths_lib
from tract_optax._src.paths import ModulePath

DATA, PARAMS, UNKNOWN = 'data only', 'parameters', 'unknown'

#: A model call's inputs as the probe gets them: ``(args, kwargs)``.
ModelInputs = Tuple[Sequence[Any], Mapping[str, Any]]
#: ``run(params, inputs, token)``: a forward pass that calls ``mark`` on every
#: layer input (``params`` is the parameter pytree, ``inputs`` ``(args, kwargs)``).
ProbeRun = Callable[[Any, Any, jax.Array], object]
#: ``forward(values, token)``: what ``_trace_jvp`` differentiates.
_Forward = Callable[[List[jax.Array], jax.Array], None]

#: Data-only candidates listed one by one in a refusal; the rest are counted.
MAX_LISTED_CANDIDATES = 8
#: Other layers named (after their count) in a refusal.
MAX_NAMED_OTHERS = 3

#: Errors of a model that needs concrete values where the probe has tracers.
_CONCRETIZATION_ERRORS = tuple(
  getattr(jax.errors, name)
  for name in (
    'ConcretizationTypeError',
    'TracerBoolConversionError',
    'TracerIntegerConversionError',
    'TracerArrayConversionError',
  )
  if hasattr(jax.errors, name)
)

#: Choices kept by ``choose_in_pass`` (keys are hashable structure only).
CACHE_SIZE = 256


@dataclasses.dataclass
class LayerCall:
  """One Conv/Dense call seen by the probe.

  Attributes:
    path: the layer's module path.
    type_name: its class, for messages (``nn.Conv``, ``nnx.Linear``).
    input_type: the input's dtype and shape, e.g. ``float32[4,32,32,3]``
      (per iteration inside ``scan``/``vmap``).
    reached: whether a tangent of the differentiated values reaches the
      input; ``None`` while the marker's JVP rule has not run for this call.
  """

  path: ModulePath
  type_name: str
  input_type: str = ''
  reached: Optional[bool] = None

  @property
  def input_depends_on(self) -> str:
    """``PARAMS``, ``DATA`` or ``UNKNOWN`` (for the main trace)."""
    if self.reached is None:
      return UNKNOWN
    return PARAMS if self.reached else DATA


def _type_text(x: ArrayLike) -> str:
  shape = ','.join(str(d) for d in jnp.shape(x))
  return f'{jnp.result_type(x).name}[{shape}]'


def _zero_tangent(x: ArrayLike) -> jax.Array:
  """A zero tangent of exactly ``x``'s type, ``shard_map``'s varying axes included.

  Under ``shard_map`` with its default checking (``check_vma=True``), a
  custom JVP rule must return a tangent that varies over the same mesh axes
  as the primal; a plain ``jnp.zeros`` varies over none and is refused.
  ``jnp.zeros_like`` keeps them in recent jax; otherwise they are added
  (``jax_compat.varying_over``).
  """
  tangent = jnp.zeros_like(x)
  missing = tuple(sorted(jax_compat.varying_axes(x) - jax_compat.varying_axes(tangent)))
  return jax_compat.varying_over(tangent, missing) if missing else tangent


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _marker(x: ArrayLike, token: jax.Array, probe: DependencyProbe, index: int) -> ArrayLike:
  del token, probe, index
  return x


def _marker_jvp(
  probe: DependencyProbe,
  index: int,
  primals: Tuple[ArrayLike, jax.Array],
  tangents: Tuple[Union[jax.Array, SymbolicZero], Union[jax.Array, SymbolicZero]],
) -> Tuple[ArrayLike, jax.Array]:
  """Reports to ``probe`` (a static argument: no registry) whether a tangent came."""
  x, _ = primals
  x_tangent, token_tangent = tangents
  data_only = isinstance(x_tangent, SymbolicZero)
  # No tangent on the token: the parameters are not what is differentiated
  # (a gradient in the inputs alone), so the call says nothing.
  if index < len(probe.calls) and not isinstance(token_tangent, SymbolicZero):
    probe.calls[index].reached = not data_only
  if data_only:
    x_tangent = _zero_tangent(x)
  return x, cast(jax.Array, x_tangent)  # a symbolic zero was replaced above


_marker.defjvp(_marker_jvp, symbolic_zeros=True)


def _first_element_times_zero(x: jax.Array) -> jax.Array:
  return jnp.real(jnp.ravel(x)[0]).astype(jnp.float32) * 0


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _params_token(
  params: List[jax.Array], others: List[jax.Array], probe: DependencyProbe
) -> jax.Array:
  """A zero scalar whose tangent is nonzero when the parameters are differentiated."""
  del others, probe
  return _first_element_times_zero(params[0])


def _params_token_jvp(
  probe: DependencyProbe,
  primals: Tuple[List[jax.Array], List[jax.Array]],
  tangents: Tuple[List[Union[jax.Array, SymbolicZero]], List[Union[jax.Array, SymbolicZero]]],
) -> Tuple[jax.Array, jax.Array]:
  """Notes in ``probe`` whether exactly the parameters carry tangents.

  The layer markers of a pass are then read as the probe's own would be: a
  tangent reaches an input if and only if it depends on the parameters.
  """
  params, _ = primals
  param_tangents, other_tangents = tangents
  probe.differentiated = not any(isinstance(t, SymbolicZero) for t in param_tangents) and all(
    isinstance(t, SymbolicZero) for t in other_tangents
  )
  token = _first_element_times_zero(params[0])
  if not probe.differentiated:  # the markers then record nothing
    return token, _zero_tangent(token)
  # the first leaf's tangent, which has its primal's type (varying axes too)
  return token, _first_element_times_zero(cast(jax.Array, param_tangents[0]))


_params_token.defjvp(_params_token_jvp, symbolic_zeros=True)


def _inexact_arrays(tree: Any) -> List[jax.Array]:
  """The non-empty inexact JAX arrays (tracers included) among ``tree``'s leaves."""
  return [
    leaf
    for leaf in jax.tree_util.tree_leaves(tree)
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.inexact) and leaf.size
  ]


def _container(value: object) -> bool:
  return type(value) in (tuple, list, dict)


def _largest_input(inputs: ModelInputs) -> Optional[Tuple[int, str]]:
  """Index (among ``inputs``' leaves) and description of the largest inexact
  array of at least 3 dimensions, or None.

  ``inputs`` is ``(args, kwargs)``; only plain tuples, lists and dicts are
  looked into (a module or ``nnx.Rngs`` argument is left whole).
  """
  leaves = jax.tree_util.tree_flatten_with_path(inputs, is_leaf=lambda v: not _container(v))[0]
  best = None
  for index, (key_path, leaf) in enumerate(leaves):
    if not hasattr(leaf, 'shape') or not hasattr(leaf, 'dtype') or jnp.ndim(leaf) < 3:
      continue
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      continue
    size = math.prod(jnp.shape(leaf))
    if best is None or size > best[0]:
      head = 'args' if key_path and getattr(key_path[0], 'idx', None) == 0 else 'kwargs'
      name = head + jax.tree_util.keystr(tuple(key_path[1:]))
      best = (size, index, f'{name}, {_type_text(leaf)}')
  return None if best is None else best[1:]


class DependencyProbe:
  """Records, for each Conv/Dense call, whether its input depends on params.

  The glue calls ``mark`` on each layer input and uses what it returns
  in place of the input, inside ``run``, which ``select`` (or
  ``trace``) traces abstractly.
  """

  def __init__(self) -> None:
    self.calls: List[LayerCall] = []
    self.token: Optional[jax.Array] = None
    #: In a watched pass: whether exactly the parameters were differentiated
    #: (None: nothing was).
    self.differentiated: Optional[bool] = None

  def watch(self, params: Any, others: Any) -> bool:
    """Prepares the marking of a real pass (``mark`` then uses a token of ``params``).

    When that pass is differentiated in every inexact leaf of ``params`` and
    in nothing of ``others`` (the model's inputs and other variables), each
    marker learns what the probe's own trace would tell, at no extra trace:
    see ``pass_choice``. That is known at once under ``jax.grad``, ``vjp``
    or ``jvp`` (their rules run as the token is made).

    Returns:
      Whether the pass is differentiated in exactly ``params``; when False,
      marking teaches nothing and the probe must decide.
    """
    self.calls, self.differentiated = [], None
    leaves = _inexact_arrays(params)
    self.token = _params_token(leaves, _inexact_arrays(others), self) if leaves else None
    if not self.differentiated:
      self.token = None
      return False
    return True

  def pass_choice(self, kind: str = 'Conv/Dense') -> Optional[ModulePath]:
    """The first layer as read off a watched pass, or None when it cannot tell.

    None when the pass was not differentiated in exactly the parameters, or
    when ``choose`` would refuse (the caller then probes, which words the
    refusal with its suggestion).
    """
    self.token = None
    if not self.differentiated:
      return None
    try:
      return choose(self.calls, kind)
    except ValueError:
      return None

  def mark(self, x: ArrayLike, path: ModulePath, type_name: str) -> ArrayLike:
    """Notes a layer call and returns its input ``x``, marked when a token is set."""
    if self.token is None:
      return x
    index = len(self.calls)
    self.calls.append(LayerCall(path, type_name, _type_text(x)))
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      # Integer inputs carry no tangent: they are data (or indices) by nature.
      self.calls[index].reached = False
      return x
    return _marker(x, self.token, self, index)

  def _trace_jvp(self, forward: _Forward, primals: List[jax.Array]) -> List[LayerCall]:
    """Runs ``forward(primals, token)`` abstractly under ``jvp`` in ``primals``
    (a list of inexact arrays) and the token; returns the calls it marked."""

    def with_token(values: List[jax.Array], token: jax.Array) -> jax.Array:
      self.token = token
      forward(values, token)
      return jnp.zeros([], jnp.float32)

    def jvp_of_forward(values: List[jax.Array], token: jax.Array) -> Tuple[jax.Array, jax.Array]:
      tangents = [jnp.zeros_like(v) for v in values]
      return jax.jvp(with_token, (values, token), (tangents, jnp.ones_like(token)))

    self.calls = []
    try:
      jax.eval_shape(jvp_of_forward, primals, jnp.zeros([], jnp.float32))
    finally:
      self.token = None
    return self.calls

  def trace(self, run: ProbeRun, params: Any, inputs: Any = None) -> List[LayerCall]:
    """Traces ``run(params, inputs, token)`` abstractly under ``jvp`` in ``params``.

    Only inexact leaves of ``params`` are differentiated (others are closed
    over); the token, which every marker takes, always has a tangent, so a
    marker whose rule never ran is reported as unknown, never as data-only.

    Args:
      run: the forward pass, calling ``mark`` on every layer input.
      params: the parameters.
      inputs: the model's inputs, ``(args, kwargs)``, handed to ``run``.

    Returns:
      The calls marked, in call order (also kept as ``self.calls``).

    Raises:
      TypeError: the model turns a traced array into a Python value (a
        data-dependent Python branch), which the abstract probe cannot run.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    inexact = [jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) for leaf in leaves]
    differentiated = [leaf for leaf, flag in zip(leaves, inexact, strict=True) if flag]

    def forward(values: Iterable[jax.Array], token: jax.Array) -> None:
      values = iter(values)
      rebuilt = jax.tree_util.tree_unflatten(
        treedef,
        [next(values) if flag else leaf for leaf, flag in zip(leaves, inexact, strict=True)],
      )
      run(rebuilt, inputs, token)

    try:
      return self._trace_jvp(forward, differentiated)
    except _CONCRETIZATION_ERRORS as error:
      raise _abstract_probe_error(self.calls) from error

  def input_readers(
    self, run: ProbeRun, params: Any, inputs: ModelInputs
  ) -> Optional[Tuple[str, List[ModulePath]]]:
    """The model's largest input and the layers whose input depends on it.

    Traces ``run`` again, abstractly, with ``jvp`` in the largest inexact
    array of at least 3 dimensions among ``inputs`` (``(args, kwargs)``).

    Returns:
      ``(description, paths)``: the argument (e.g. ``'args[0],
      float32[4,32,32,3]'``) and the paths of the layers it reaches, in call
      order; None when there is no such argument or the trace fails.
    """
    found = _largest_input(inputs)
    if found is None:
      return None
    index, description = found
    leaves, treedef = jax.tree_util.tree_flatten(inputs, is_leaf=lambda v: not _container(v))

    def forward(values: List[jax.Array], token: jax.Array) -> None:
      replaced = list(leaves)
      replaced[index] = values[0]
      run(params, jax.tree_util.tree_unflatten(treedef, replaced), token)

    try:
      calls = self._trace_jvp(forward, [leaves[index]])
    except Exception:  # only a suggestion: never hide the refusal behind it
      return None
    readers: List[ModulePath] = []
    for call in calls:
      if call.reached and call.path not in readers:
        readers.append(call.path)
    return description, readers

  def select(
    self, run: ProbeRun, params: Any, inputs: ModelInputs, kind: str = 'Conv/Dense'
  ) -> ModulePath:
    """The first layer, by ``choose``'s rule, of ``run(params, inputs, token)``.

    Args:
      run: the forward pass, calling ``mark`` on every layer input.
      params: the parameters.
      inputs: ``(args, kwargs)`` of the model call, handed to ``run``.
      kind: how the layers are called in messages (Linen vs NNX names).

    Returns:
      The chosen layer's path.

    Raises:
      ValueError: as ``choose``.
      TypeError: as ``trace``.
    """
    calls = self.trace(run, params, inputs)
    return choose(calls, kind, lambda: self.input_readers(run, params, inputs))


def _abstract_probe_error(calls: Sequence[LayerCall]) -> TypeError:
  seen = list(dict.fromkeys(call.path for call in calls))
  before = f' Layers called before it failed: {_capture.format_paths(seen)}.' if seen else ''
  return TypeError(
    'Automatic first-layer selection (layers=None) traces the model abstractly, and '
    'the model turns an array into a Python value (float(), bool(), an `if` on an '
    "array). Name the layer with layers=[...] (e.g. layers=['stem']) to skip the probe."
    + before
    + docs_link.see('first_layer', 'When the probe cannot run')
  )


_SEE_DEFINITION = docs_link.see('first_layer', 'Found by definition')


def _text(path: ModulePath) -> str:
  return _capture.format_paths([path])


def _verdicts(calls: Sequence[LayerCall]) -> Dict[ModulePath, str]:
  """Each layer's verdict, in first-call order: parameters if any call's input
  depends on them, data only if every call seen by the rule is data-only,
  unknown if the rule saw none of its calls."""
  seen: Dict[ModulePath, List[str]] = {}
  for call in calls:
    seen.setdefault(call.path, []).append(call.input_depends_on)
  status = {}
  for path, verdicts in seen.items():
    if PARAMS in verdicts:
      status[path] = PARAMS
    elif DATA in verdicts:
      status[path] = DATA
    else:
      status[path] = UNKNOWN
  return status


def choose(
  calls: Sequence[LayerCall],
  kind: str = 'Conv/Dense',
  input_readers: Optional[Callable[[], Optional[Tuple[str, List[ModulePath]]]]] = None,
) -> ModulePath:
  """The first layer among the probed calls, or an error that lists candidates.

  Args:
    calls: the probe's Conv/Dense calls, in call order.
    kind: how the layers are called in messages (Linen vs NNX names).
    input_readers: called only to word a refusal: the model's largest input
      argument and the layers reading it (see
      ``DependencyProbe.input_readers``), or None.

  Returns:
    The path of the one layer whose every call takes data-only input, when it
    is also the first layer called.

  Raises:
    ValueError: no layer called; no layer (or several) with data-only input;
      the first layer called takes a parameter-dependent input; or the probe
      could not tell (ask for ``layers=[...]``).

  Example:
    >>> stem = LayerCall(('stem',), 'nn.Conv', 'float32[2,8,8,3]', reached=False)
    >>> head = LayerCall(('head',), 'nn.Dense', 'float32[2,8]', reached=True)
    >>> choose([stem, head])
    ('stem',)
  """
  status = _verdicts(calls)
  if not status:
    raise ValueError(
      f'No {kind} layer was called in the forward pass, so there is no first layer '
      'to precondition.' + _SEE_DEFINITION
    )
  candidates = [p for p, s in status.items() if s == DATA]
  unknown = [p for p, s in status.items() if s == UNKNOWN]
  first = next(iter(status))
  if len(candidates) == 1 and not unknown and candidates[0] == first:
    return first
  types: Dict[ModulePath, str] = {}
  for call in calls:
    types.setdefault(call.path, f'{call.type_name}, input {call.input_type}')
  raise _Verdicts(status, types, kind, input_readers).refusal()


InputReaders = Callable[[], Optional[Tuple[str, List[ModulePath]]]]


@dataclasses.dataclass(frozen=True)
class _Verdicts:
  """The probe's verdicts on the layers called, worded for a refusal."""

  status: Dict[ModulePath, str]  # path -> DATA / PARAMS / UNKNOWN, in first-call order
  types: Dict[ModulePath, str]  # path -> 'nn.Conv, input float32[...]'
  kind: str
  input_readers: Optional[InputReaders]

  def refusal(self) -> ValueError:
    """Why no layer (or several) can be the first layer, listing the candidates."""
    status, kind = self.status, self.kind
    candidates = [p for p, s in status.items() if s == DATA]
    unknown = [p for p, s in status.items() if s == UNKNOWN]
    if unknown:
      return ValueError(
        f'Cannot tell whether the input of {self.described(unknown)} depends on '
        'parameters: the probe never saw it differentiated (e.g. it runs inside '
        'a jax.custom_vjp function).'
        + (f' Layers with data-only input: {self.described(candidates)}.' if candidates else '')
        + self.others(unknown + candidates)
        + self.suggestion(unknown + candidates)
        + _SEE_DEFINITION
      )
    if not candidates:
      listed = list(status)[:MAX_LISTED_CANDIDATES]
      return ValueError(
        f'Every {kind} layer called takes an input that depends on parameters, '
        'so none is a first layer (a learned scale before the stem?): '
        f'{self.described(listed)}.'
        + self.others(listed)
        + ' A stem of your own (self.param with lax.conv) is not seen: compute it with '
        'tract_optax.conv / dense. To precondition a layer anyway, name it with '
        'layers=[...].' + _SEE_DEFINITION
      )
    if len(candidates) > 1:
      return ValueError(
        f'Several {kind} layers take input computed from data alone: '
        f'{self.described(candidates)} (e.g. an image stem and a label or time '
        'embedding); TrAct cannot tell which is the image stem.'
        + self.others(candidates)
        + self.suggestion(candidates)
        + _SEE_DEFINITION
      )
    name = paths_lib.format_path(paths_lib.normalize_path(candidates[0]))
    return ValueError(
      f'The first {kind} layer called, {_text(next(iter(status)))}, takes an input that '
      f'depends on parameters, so it is no first layer; the only layer with '
      f'data-only input is {self.described(candidates)}.'
      + self.others(candidates)
      + f' If {name!r} is the image stem, pass layers=[{name!r}].'
      + _SEE_DEFINITION
    )

  def described(self, paths: Sequence[ModulePath]) -> str:
    """``'stem' (nn.Conv, input float32[...]), ...``, at most a few of them."""
    listed = [f'{_text(p)} ({self.types[p]})' for p in paths[:MAX_LISTED_CANDIDATES]]
    if len(paths) > MAX_LISTED_CANDIDATES:
      listed.append(f'and {len(paths) - MAX_LISTED_CANDIDATES} more')
    return ', '.join(listed)

  def others(self, excluded: Sequence[ModulePath]) -> str:
    """A sentence on the layers called that ``excluded`` leaves out."""
    rest = [p for p in self.status if p not in excluded]
    if not rest:
      return ''
    named = ', '.join(_text(p) for p in rest[:MAX_NAMED_OTHERS])
    more = ', ...' if len(rest) > MAX_NAMED_OTHERS else ''
    depends = {
      PARAMS: 'parameter-dependent input',
      UNKNOWN: 'input of unknown dependence',
      DATA: 'data-only input',
    }
    kinds = sorted({self.status[p] for p in rest}, key=[PARAMS, UNKNOWN, DATA].index)
    what = ' or '.join(depends[k] for k in kinds)
    if len(rest) == 1:
      return f' The other {self.kind} layer called, {named}, takes {what}.'
    return f' The other {len(rest)} {self.kind} layers called take {what} ({named}{more}).'

  def suggestion(self, pool: Sequence[ModulePath]) -> str:
    """Which layer of ``pool`` to name, by the model's largest input, if one reads it."""
    found = self.input_readers() if self.input_readers is not None else None
    if found is None:
      return (
        ' Name the image stem explicitly with layers=[<its module path>] (the '
        'model has no array argument of 3 or more dimensions to suggest one by).'
      )
    description, readers = found
    reading = [p for p in readers if p in pool]
    if not reading:
      return (
        f" None of them reads the model's largest input ({description}); name "
        'the image stem explicitly with layers=[<its module path>].'
      )
    name = paths_lib.format_path(paths_lib.normalize_path(reading[0]))
    return (
      f" The first of them that reads the model's largest input ({description}) "
      f'is {name!r}: if it is the image stem, pass layers=[{name!r}].'
    )


class Uncacheable(TypeError):
  """A value in a cache key that cannot be hashed (the choice is then not cached)."""


def leaf_spec(leaf: Any) -> Hashable:
  """What the probe's verdict may depend on in one leaf: an array's shape and
  type, any other value itself.

  Raises:
    Uncacheable: for a value that is no array and cannot be hashed.

  Example:
    >>> leaf_spec(jnp.ones((2, 3)))
    ((2, 3), dtype('float32'), False)
    >>> leaf_spec('train')
    'train'
  """
  if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
    return (tuple(leaf.shape), jnp.dtype(leaf.dtype), bool(getattr(leaf, 'weak_type', False)))
  try:
    hash(leaf)
  except TypeError:
    raise Uncacheable(type(leaf).__name__) from None
  return leaf


def tree_spec(tree: Any, is_leaf: Optional[Callable[[Any], bool]] = None) -> Hashable:
  """A hashable key of ``tree``'s structure and its leaves' ``leaf_spec``."""
  leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_leaf)
  return treedef, tuple(leaf_spec(leaf) for leaf in leaves)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _choice_cell(key: Hashable) -> List[ModulePath]:
  """The (mutable) cell holding the choice for ``key``; empty until chosen."""
  del key
  return []


def _cell(key: Callable[[], Hashable]) -> Optional[List[ModulePath]]:
  """The cache cell of ``key()``, or None for a key that cannot be hashed.

  The verdict depends only on the model's code and settings and the
  structure, shapes and dtypes of its parameters and inputs, never on their
  values, so it is kept in a bounded cache keyed by exactly those (``key()``,
  e.g. a Linen module, which hashes by its fields, and ``tree_spec`` of its
  variables and arguments): a later trace with the same key does not choose
  again. A refusal is never cached; a key that cannot be hashed (a module
  holding a list, ``key()`` raising ``Uncacheable``) chooses every time.
  """
  try:
    return _choice_cell(key())
  except (Uncacheable, TypeError):  # an unhashable field: probe every time
    return None


_Result = TypeVar('_Result')
#: ``run(path, probe)``: one pass of the glue. With a ``path``, the pass for
#: that layer (``probe`` is None). With None, the pass takes the first
#: Conv/Dense layer it calls, provisionally, and marks every layer input of
#: its differentiated pass with ``probe.mark``. Returns ``(result, the
#: layer it took or None)``.
PassRun = Callable[
  [Optional[ModulePath], Optional['DependencyProbe']], Tuple[_Result, Optional[ModulePath]]
]


def choose_in_pass(
  key: Callable[[], Hashable],
  probe_now: Callable[[], ModulePath],
  watched: Callable[[], Optional[Tuple[Any, Any]]],
  run: PassRun[_Result],
  kind: str = 'Conv/Dense',
) -> _Result:
  """Runs a pass for the first layer, read off that very pass when not cached.

  The first layer can only be the first one called. So when the choice is not
  cached and the pass is differentiated in exactly the parameters (a training
  step's ``jax.grad``), ``run`` takes that layer provisionally and marks every
  layer input: the markers tell what the probe would, and the probe's extra
  trace is saved. Otherwise (no gradient, a gradient in some parameters only
  or in the inputs too) the probe decides first, as before. It also decides
  when the pass's verdict is a refusal, so refusals are worded alike, and
  an error of the provisional pass is raised after the probe's own refusal,
  if it has one. A probe that picks another layer than the pass took (a
  model whose call order changes) is refused: the pass is not run twice.

  Args:
    key: builds the cache key (see ``_cell``).
    probe_now: runs the probe (raises its refusal).
    watched: builds ``(params, others)`` for ``DependencyProbe.watch``: the
      parameters and everything else the pass reads (inputs, other
      variables); None when the pass cannot be marked (the probe decides).
      Called only when the choice is not cached.
    run: the glue's pass (see ``PassRun``).
    kind: how the layers are called in messages.

  Returns:
    The result of ``run`` for the chosen layer.
  """
  cell = _cell(key)
  if cell:
    return run(cell[0], None)[0]
  probe = DependencyProbe()
  to_watch = watched()
  if to_watch is None or not probe.watch(*to_watch):
    chosen = probe_now()
    if cell is not None:
      cell.append(chosen)
    return run(chosen, None)[0]
  failed: Optional[Exception] = None
  try:
    result, taken = run(None, probe)
  except Exception as error:  # raised again below, after the probe
    failed = error
  if failed is not None:
    probe_now()  # a refusal of the probe comes first (outside the handler: not chained)
    raise failed
  read = probe.pass_choice(kind)
  final = read if read is not None and read == taken else probe_now()
  if final != taken:  # the pass already ran (and may have updated state): no second run
    raise ValueError(
      f'The first layer this pass called, {_text(taken) if taken else "none"}, is not the '
      f'one the probe finds, {_text(final)}: does the model call its layers in another '
      f'order from call to call? Name the layer with layers=[...].' + _SEE_DEFINITION
    )
  if cell is not None:
    cell.append(final)
  return result


def clear_cache() -> None:
  """Forgets every cached choice (for benchmarks measuring a first trace)."""
  _choice_cell.cache_clear()
