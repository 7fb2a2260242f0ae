"""``tract``: the TrAct gradient transformation for Optax.

Placed first in an ``optax.chain``, it replaces the gradient of each named first
layer's ``kernel`` by its TrAct gradient and hands everything on unchanged, so
any optimizer after it sees the TrAct gradient as if it were the gradient.
"""

from __future__ import annotations

import collections
import weakref
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from tract_optax._src import amortize
from tract_optax._src import axes as axes_lib
from tract_optax._src import paths as paths_lib
from tract_optax._src import ridge as ridge_lib
from tract_optax._src.precondition import precondition
from tract_optax._src.stats import TractStats, all_reduce_stats

ScalarOrSchedule = ridge_lib.ScalarOrSchedule
AxisName = axes_lib.AxisName

#: The two ways out when ``tract`` receives no statistic.
ROUTES_TEXT = (
  'Either pass it, tx.update(grads, opt_state, params, tract_stats=stats), '
  'with stats from tract_optax.linen.apply_with_stats or '
  "tract_optax.nnx.value_and_grad_with_stats (Flax's own "
  'TrainState.apply_gradients drops it: use tract_optax.linen.TractTrainState); '
  'or drop tract from the chain and use the gradient route, '
  'tract_optax.linen.apply_tract / tract_optax.nnx.apply_tract in the loss, '
  'which works with any TrainState and optimizer.'
)

_MISSING_STATS = (
  "tract(...).update received no tract_stats, the first layer's input "
  'statistic by module path. ' + ROUTES_TEXT
)

_EMPTY_STATS = (
  'tract(...).update received an empty tract_stats ({}): it names no layer, so '
  'nothing would be preconditioned and the step would silently be a plain one. '
  'Pass the statistic of the first layer ({path: TractStats}; did the capture '
  'record the layer you meant?); or, to reuse a kept statistic on steps that skip '
  "computing it, build tract with its layers: tract(..., layers=[('stem',)], "
  'refresh_every=k); or drop tract from the chain to train without TrAct.'
)

_safe_increment = getattr(optax, 'safe_increment', None) or optax.safe_int32_increment

# Kernel gradients tract has just preconditioned (weak references): a second
# tract in the same chain would receive one of them and precondition it twice.
_RECENT_OUTPUTS: collections.deque = collections.deque(maxlen=64)


class TractState(NamedTuple):
  """State of :func:`tract`.

  Attributes:
    count: number of updates so far (drives a lambda schedule).
    refresh_every: amortised mode's refresh period (1: per-batch statistic).
    refreshes: number of refreshes of the kept statistics so far.
    last_refresh: ``count`` at the last refresh (amortised mode).
    stats_cache: amortised mode's kept statistic per layer ('a/b' keys);
      empty in the default per-batch mode.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count; public field
  refresh_every: jax.Array
  refreshes: jax.Array
  last_refresh: jax.Array
  stats_cache: dict


def _normalize_stats(
  tract_stats, amortized: bool = False
) -> Dict[paths_lib.ModulePath, TractStats]:
  if tract_stats is None:
    if amortized:  # a step that skips the statistic: the kept one is used
      return {}
    raise TypeError(_MISSING_STATS)
  if not isinstance(tract_stats, Mapping):
    raise TypeError(
      'tract_stats must be a mapping {module path: TractStats}; got '
      f'{type(tract_stats).__name__}. ' + _MISSING_STATS
    )
  normalized: Dict[paths_lib.ModulePath, TractStats] = {}
  spelled: Dict[paths_lib.ModulePath, object] = {}
  for path, stats in tract_stats.items():
    module = paths_lib.normalize_path(path)
    if module in normalized:
      raise ValueError(
        f'tract_stats names the layer {paths_lib.format_path(module)!r} twice, '
        f'as {spelled[module]!r} and as {path!r}; give each layer one entry '
        '(combine_stats merges the statistics of several calls).'
      )
    if not isinstance(stats, TractStats):
      raise TypeError(
        f'tract_stats[{path!r}] must be a tract_optax.TractStats (from '
        f'dense_stats, conv_stats or the Flax capture); got {type(stats).__name__}.'
      )
    normalized[module] = stats.validate(f'tract_stats[{path!r}]')
    spelled[module] = path
  return normalized


_INJECT_HINT = (
  ' With optax.inject_hyperparams, pass static_args=('
  "'refresh_every', 'stats_decay') so that they stay Python numbers."
)


def _validate_amortization(
  layers, refresh_every, stats_decay
) -> Tuple[Optional[Tuple[paths_lib.ModulePath, ...]], bool]:
  if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
    raise ValueError(f'refresh_every must be an int >= 1; got {refresh_every!r}.' + _INJECT_HINT)
  if (
    isinstance(stats_decay, bool)
    or not isinstance(stats_decay, (int, float))
    or not 0 <= stats_decay < 1
  ):
    raise ValueError(f'stats_decay must be a number in [0, 1); got {stats_decay!r}.' + _INJECT_HINT)
  amortized = refresh_every > 1 or stats_decay > 0
  if amortized and not layers:
    raise ValueError(
      'The amortised statistic (refresh_every > 1 or stats_decay > 0) keeps a '
      'moment per layer in the optimizer state, so tract needs the layers at '
      "construction: tract(..., layers=[('stem',)])."
    )
  if layers is None:
    return None, amortized
  normalized = paths_lib.normalize_paths(layers)  # a tuple of names is ambiguous: refused
  if not normalized:
    raise ValueError(
      'tract(layers=[]) names no layer; leave layers out to '
      'precondition whatever tract_stats names.'
    )
  if len(set(normalized)) != len(normalized):
    raise ValueError(f'tract(layers={layers!r}) names a layer twice.')
  return tuple(normalized), amortized


def _mask_hint(updates) -> str:
  masked = [
    leaf
    for leaf in jax.tree_util.tree_leaves(
      updates, is_leaf=lambda v: isinstance(v, optax.MaskedNode)
    )
    if isinstance(leaf, optax.MaskedNode)
  ]
  if not masked:
    return ''
  return (
    ' The updates hold masked-out leaves (optax.masked / '
    'optax.multi_transform): this tract sits in a group that does not '
    "contain the layer's kernel. Put tract first in the chain, outside "
    'the masking, or put the kernel in its group.'
  )


def _check_not_preconditioned(leaf, path) -> None:
  for ref in _RECENT_OUTPUTS:
    if ref() is leaf:
      raise ValueError(
        f'The gradient of {paths_lib.format_path(path)!r} has already been '
        'preconditioned (by a tract transformation, or by the gradient route: '
        'apply_tract / tract_kernel): a chain must hold tract once, and the '
        'gradient route needs no tract in the chain at all.'
      )


def remember_preconditioned(leaf) -> None:
  try:
    _RECENT_OUTPUTS.append(weakref.ref(leaf))
  except TypeError:  # not weak-referenceable (e.g. a numpy array): skip
    pass


def _select(stats_by_path, layers, amortized):
  """Statistics of the layers to precondition, per ``layers``' meaning."""
  if layers is None:
    if not stats_by_path:
      raise ValueError(_EMPTY_STATS)
    return stats_by_path
  missing = [p for p in layers if p not in stats_by_path]
  if missing and not amortized:
    raise paths_lib.ModulePathError(
      f'tract(layers=...) preconditions {[paths_lib.format_path(p) for p in layers]}, '
      f'but tract_stats has no statistic for {paths_lib.format_path(missing[0])!r} '
      f'(it names {[paths_lib.format_path(p) for p in stats_by_path] or "nothing"}). '
      "Pass every listed layer's statistic at every step, or use "
      'refresh_every=k to keep an amortised statistic between refreshes.'
    )
  return {p: s for p, s in stats_by_path.items() if p in layers}


def tract(
  lam: ScalarOrSchedule = 0.1,
  *,
  axis_name: AxisName = None,
  local_stats: bool = False,
  relative_lam: bool = False,
  layers: Optional[Sequence[paths_lib.PathLike]] = None,
  refresh_every: Optional[int] = None,
  stats_decay: Optional[float] = None,
  check_condition: Optional[bool] = None,
) -> optax.GradientTransformationExtraArgs:
  """TrAct: first-layer kernel gradients preconditioned by their input statistic.

  For every entry ``path -> stats`` of ``tract_stats``, the gradient ``G`` of the
  ``kernel`` leaf under ``path`` becomes ``(A^T A / N + lam I)^{-1} G``; all
  other leaves, biases included, pass through unchanged. Put it first in an
  ``optax.chain``: the chain forwards ``tract_stats`` to it. Weight decay
  belongs after it (``optax.add_decayed_weights`` or ``optax.adamw``), as in
  the authors' code; weight decay written into the loss is preconditioned
  too.

  Placed after another transformation, ``tract`` would precondition that
  transformation's output with the gradient's statistic. ``tract`` sees only
  the updates it receives and its own state, so it cannot tell; whoever holds
  the whole optimizer state refuses the known cases (Adam, momentum, RMSProp,
  Adafactor and other optimizers with state before ``tract`` in a chain):
  ``tract_optax.linen.TractTrainState.apply_gradients`` and
  :func:`~tract_optax.stats_due`. Not detectable anywhere: stateless
  transformations before ``tract`` (``add_decayed_weights``: weight decay then
  preconditioned; ``scale``/``clip_by_global_norm`` are linear and harmless),
  and ``nnx.Optimizer`` or a hand-written ``tx.update`` with ``tract`` not
  first.

  Args:
    lam: ridge strength lambda > 0 (0.1 is the paper's default; its scale
      assumes standardised inputs), or a schedule ``step -> lambda`` (checked
      at construction; one that reaches 0 is rejected). It must be a normal
      float32 number, 1.18e-38 to 3.4e38 (outside it is 0 or infinite where
      the solve runs). A value known when it is used (a number, a concrete
      array, ``optax.inject_hyperparams`` rebuilding ``tract`` outside
      ``jit``) that is not is refused with ``ValueError``; a traced one
      (inside ``jit``) makes the kernel's TrAct gradient NaN, reported by a
      :class:`~tract_optax.ConditioningWarning` when ``check_condition=True``.
    axis_name: the ``pmap``/``shard_map`` axis (or axes) over which the batch
      is split; statistics are then averaged to the global-batch statistic
      before the solve. Not needed under ``jit`` with a sharded batch, where
      the statistic is already global. Inside a bound named axis, tract
      refuses to run without it (or ``local_stats=True``).
    local_stats: inside ``pmap``/``shard_map``, precondition each device with
      the statistic of its own part of the batch, on purpose (what the PyTorch
      reference does under DDP). Not exact for the whole batch.
    relative_lam: use the ridge ``lam * trace(A^T A / N) / n`` per feature
      group: for a given gradient of the pre-activations, TrAct's change of
      them no longer depends on the input's scale, and the solve stays well
      conditioned for any pixel range. (It does not make raw pixels train
      like standardised ones when BatchNorm follows the layer: standardise.)
    layers: a list of the module paths this tract preconditions, e.g.
      ``[('backbone', 'stem')]`` or ``['backbone/stem']`` (a bare tuple of
      names is refused as ambiguous, as in the Flax glue). Their statistics
      are required at every update (amortised mode: at refreshes) and
      statistics of other layers are ignored. None: whatever ``tract_stats``
      names (then an empty ``tract_stats`` is refused).
    refresh_every: opt-in amortisation (needs ``layers``): refresh the kept
      statistic every k updates and reuse it in between
      (:func:`~tract_optax.stats_due` tells the capture when to compute it).
      None or 1 (default) uses each batch's own statistic, as the paper does.
      The kept moment is ``n x n`` per layer, so ``init`` refuses layers with
      more than 8192 input features (256 MiB in float32); the per-batch
      statistic serves them.
    stats_decay: opt-in: keep a moving average of refreshed statistics with
      this decay (None or 0, the default, replaces the kept statistic at each
      refresh). In amortised mode an update without ``tract_stats`` (or with
      ``{}``) preconditions with the kept statistic.
    check_condition: warn when a solve is too ill-conditioned for its float
      type, when its Cholesky factorisation fails (the TrAct gradient is then
      NaN) or when a traced ridge is invalid: None (default) for eager calls
      only, True inside ``jit``, ``pmap`` and ``shard_map`` too
      (``jax.debug.callback``), False never.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update(updates, state,
    params=None, *, tract_stats, **extra_args)`` needs ``tract_stats``.

  Raises:
    ValueError: if ``lam`` is not a finite normal float32 number > 0 (or a
      schedule that stays so), the amortisation settings are invalid, or both
      ``axis_name`` and ``local_stats`` are given. (When called, ``update``
      raises for a missing, empty or malformed statistic, a path with no
      kernel (``KeyError``), and named axes bound without
      ``axis_name``/``local_stats``.)
    TypeError: if ``layers`` is a bare tuple of names.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> params = {'stem': {'kernel': jnp.ones((4, 2)), 'bias': jnp.zeros(2)}}
    >>> tx = optax.chain(tract_optax.tract(lam=0.1), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> x = jax.random.normal(jax.random.key(0), (32, 4))
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> stats = {('stem',): tract_optax.dense_stats(x)}
    >>> updates, state = tx.update(grads, state, params, tract_stats=stats)
    >>> updates['stem']['bias'].tolist()  # the bias gradient is unchanged
    [-0.10000000149011612, -0.10000000149011612]

  References:
    Petersen, Borgelt, Ermon: "TrAct: Making First-layer Pre-Activations
    Trainable", NeurIPS 2024, arXiv:2410.23970,
    <https://arxiv.org/abs/2410.23970>.
  """
  ridge_lib.validate_lam(lam)
  if axis_name is not None and local_stats:
    axes_lib.resolve_axis_name(axis_name, local_stats)  # raises: pick one
  # None defaults, not 1 and 0.0: optax.inject_hyperparams(tract)(lam=...)
  # turns every numeric argument into an array hyperparameter, but leaves None
  # alone, so these structural settings stay static unless given.
  refresh_every = 1 if refresh_every is None else refresh_every
  stats_decay = 0.0 if stats_decay is None else stats_decay
  layers, amortized = _validate_amortization(layers, refresh_every, stats_decay)
  cached_layers = layers if amortized else ()

  def init_fn(params):
    cache = amortize.init_cache(params, cached_layers) if cached_layers else {}
    return TractState(
      count=jnp.zeros([], jnp.int32),
      refresh_every=jnp.asarray(refresh_every, jnp.int32),
      refreshes=jnp.zeros([], jnp.int32),
      last_refresh=jnp.zeros([], jnp.int32),
      stats_cache=cache,
    )

  def update_fn(updates, state, params=None, *, tract_stats=None, **extra_args):
    del params, extra_args
    if not isinstance(state, TractState):
      raise TypeError(_not_a_state(state))
    stats_by_path = _select(_normalize_stats(tract_stats, amortized), layers, amortized)
    reduce_over = axes_lib.resolve_axis_name(axis_name, local_stats)
    lam_value = lam(state.count) if callable(lam) else lam
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    kernel_index = paths_lib.kernel_leaf_index(updates)
    hint = _mask_hint(updates)
    positions = {
      path: paths_lib.require_kernel(kernel_index, path, 'tract_stats', 'the updates', hint)
      for path in stats_by_path
    }
    if reduce_over is not None:
      stats_by_path = {
        path: all_reduce_stats(stats, reduce_over) for path, stats in stats_by_path.items()
      }
    cache, refreshes, last_refresh = state.stats_cache, state.refreshes, state.last_refresh
    usable = {}  # amortised: whether the kept statistic was ever refreshed
    if cached_layers:
      due = stats_due(state)
      if all(path in stats_by_path for path in cached_layers):
        cache = amortize.refresh_cache(cache, stats_by_path, due, stats_decay)
        refreshes = refreshes + due.astype(refreshes.dtype)
        last_refresh = jnp.where(due, state.count, last_refresh)
      for path in cached_layers:
        stats_by_path[path] = cache[amortize.cache_key(path)]
        usable[path] = amortize.is_filled(stats_by_path[path])
        positions.setdefault(
          path,
          paths_lib.require_kernel(kernel_index, path, 'tract(layers=...)', 'the updates', hint),
        )
    for module, stats in stats_by_path.items():
      position = positions[module]
      _check_not_preconditioned(leaves[position], module)
      solved = precondition(
        leaves[position],
        stats,
        lam_value,
        relative_lam=relative_lam,
        check_condition=check_condition,
        name=paths_lib.format_path(module),
      )
      if module in usable:  # amortised, never refreshed yet: no statistic at all
        solved = jnp.where(usable[module], solved, jnp.nan)
      leaves[position] = solved
      remember_preconditioned(solved)
    new_state = TractState(
      count=_safe_increment(state.count),
      refresh_every=state.refresh_every,
      refreshes=refreshes,
      last_refresh=last_refresh,
      stats_cache=cache,
    )
    return jax.tree_util.tree_unflatten(treedef, leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _not_a_state(state) -> str:
  """The message for a state that is not the ``TractState`` ``init`` made."""
  return (
    f'tract(...).update received a state of type {type(state).__name__}, not the '
    'TractState that tract(...).init returns. A checkpoint restored without a '
    'target tree gives this: its named tuples come back as plain dicts and '
    'lists (e.g. Orbax restore without an item or restore_args). Restore the '
    'optimizer state with a target built from tx.init(params) (Orbax: pass it '
    'as the target/abstract state, or build restore_args from it).'
  )


def _tract_states(opt_state):
  return [
    s
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda s: isinstance(s, TractState))
    if isinstance(s, TractState)
  ]


# States of Optax transformations that rescale the gradient or keep a history
# of it. Before tract in a chain, tract would precondition their output (not
# the gradient) with the gradient's statistic: not TrAct. (Stateless ones, e.g.
# add_decayed_weights, and unknown ones leave no trace that can be told apart.)
_OPTIMIZER_STATES = {
  'ScaleByAdamState': 'optax.adam, adamw, nadam, yogi or scale_by_adam',
  'ScaleByAmsgradState': 'optax.amsgrad',
  'ScaleByAdanState': 'optax.adan',
  'ScaleByAdaDeltaState': 'optax.adadelta',
  'ScaleByBeliefState': 'optax.adabelief',
  'ScaleByLionState': 'optax.lion',
  'ScaleByNovogradState': 'optax.novograd',
  'ScaleByRmsState': 'optax.rmsprop or scale_by_rms',
  'ScaleByRStdDevState': 'optax.rmsprop(centered=True)',
  'ScaleByRssState': 'optax.adagrad',
  'ScaleByRpropState': 'optax.rprop',
  'ScaleBySM3State': 'optax.sm3',
  'ScaleByLBFGSState': 'optax.lbfgs',
  'FactoredState': 'optax.adafactor',
  'TraceState': 'momentum: optax.sgd(momentum=...) or optax.trace',
  'EmaState': 'optax.ema',
}


def _optimizer_state_types() -> tuple:
  found = (getattr(optax, name, None) for name in _OPTIMIZER_STATES)
  return tuple(t for t in found if isinstance(t, type) and t is not optax.EmptyState)


def _instances(tree, types) -> list:
  return [
    s
    for s in jax.tree_util.tree_leaves(tree, is_leaf=lambda s: isinstance(s, types))
    if isinstance(s, types)
  ]


def _optimizer_before_tract(node, types):
  """The state of an optimizer that runs before a tract in a chain, or None.

  ``optax.chain``'s state is a plain tuple of its members' states, in order;
  everything else (NamedTuples of wrappers, dicts of multi_transform groups)
  is searched without an order.
  """
  if isinstance(node, TractState):
    return None
  if type(node) is tuple:  # pylint: disable=unidiomatic-typecheck  # a chain's state
    for index, member in enumerate(node):
      if _instances(member, TractState):
        for earlier in node[:index]:
          found = _instances(earlier, types)
          if found:
            return found[0]
        return _optimizer_before_tract(member, types)
    return None
  children = jax.tree_util.tree_leaves(node, is_leaf=lambda child: child is not node)
  for child in children:
    if child is not node and _instances(child, TractState):
      found = _optimizer_before_tract(child, types)
      if found is not None:
        return found
  return None


def check_opt_state(opt_state, *, tract_stats, owner: str, init=None) -> None:
  """Refuses what a whole optimizer state shows to be wrong.

  ``tract`` itself sees only its own state, so a caller that holds the whole
  state (``TractTrainState.apply_gradients``, :func:`stats_due`) checks that
  statistics go to an optimizer that holds a ``tract``, and that no known
  optimizer (Adam, momentum, RMSProp, ...) runs before ``tract`` in a chain.

  Args:
    opt_state: the optimizer state of the whole ``tx``.
    tract_stats: the statistics handed to ``tx.update`` (None: none).
    owner: the API to name in messages.
    init: optional ``() -> tx.init(params)``, evaluated abstractly only when
      ``opt_state`` shows no TrAct state: if the ``tx`` does hold a ``tract``
      (a state restored without its target tree), nothing is raised here and
      ``tract``'s own update names that cause.

  Raises:
    ValueError: for statistics without a ``tract``, or a ``tract`` after an
      optimizer.

  Example:
    >>> tx = optax.chain(optax.scale_by_adam(), tract_optax.tract(0.1))
    >>> check_opt_state(tx.init({'w': jnp.zeros(2)}), tract_stats=None, owner='f')
    Traceback (most recent call last):
    ...
    ValueError: f: tract is not first in its optax.chain: the state ScaleByAdamState (of optax.adam, adamw, nadam, yogi or scale_by_adam) comes before it, so tract would precondition that optimizer's output, not the gradient, with the gradient's statistic: not TrAct. Put tract first: optax.chain(tract_optax.tract(lam), optimizer).
  """
  if (
    tract_stats is not None
    and not _instances(opt_state, TractState)
    and not (init is not None and _instances(jax.eval_shape(init), TractState))
  ):
    raise ValueError(
      f'{owner} received tract_stats, but its tx holds no tract transformation: '
      'the statistic would be ignored and the step would silently be a plain one. '
      'For the Optax route put tract first in the chain, '
      'tx=optax.chain(tract_optax.tract(lam), optimizer); with the gradient route '
      '(apply_tract in the loss) pass no tract_stats.'
    )
  found = _optimizer_before_tract(opt_state, _optimizer_state_types())
  if found is not None:
    name = type(found).__name__
    raise ValueError(
      f'{owner}: tract is not first in its optax.chain: the state {name} (of '
      f'{_OPTIMIZER_STATES.get(name, "an optimizer")}) comes before it, so tract '
      "would precondition that optimizer's output, not the gradient, with the "
      "gradient's statistic: not TrAct. Put tract first: "
      'optax.chain(tract_optax.tract(lam), optimizer).'
    )


def stats_due(opt_state) -> jax.Array:
  """Whether the next update of a :func:`~tract_optax.tract` refreshes its statistic.

  Finds the TrAct state anywhere inside an optimizer state (e.g. of an
  ``optax.chain``). Use it to skip computing the statistic on other steps. A
  refresh stays due until an update receives every kept layer's statistic.

  Args:
    opt_state: the optimizer state holding exactly one ``TractState``.

  Returns:
    A scalar bool array (always True without amortisation).

  Raises:
    ValueError: if ``opt_state`` holds no TrAct state, or several, or a
      known optimizer runs before ``tract`` in a chain.

  Example:
    >>> import optax
    >>> tx = optax.chain(tract_optax.tract(0.1), optax.sgd(0.1))
    >>> bool(tract_optax.stats_due(tx.init({'w': jnp.zeros(2)})))
    True
  """
  check_opt_state(opt_state, tract_stats=None, owner='stats_due')
  found = _tract_states(opt_state)
  if len(found) != 1:
    raise ValueError(
      f'stats_due needs an optimizer state with exactly one TrAct state; found {len(found)}.'
    )
  state = found[0]
  return (state.refreshes == 0) | (state.count - state.last_refresh >= state.refresh_every)
