"""``tract``: the TrAct gradient transformation for Optax.

Placed first in an ``optax.chain``, it replaces the gradient of each named first
layer's ``kernel`` by its TrAct gradient and hands everything on unchanged, so
any optimizer after it sees the TrAct gradient as if it were the gradient.
"""

from __future__ import annotations

import collections
import weakref
from typing import Dict, Mapping, NamedTuple, Optional, Sequence

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

_safe_increment = getattr(optax, 'safe_increment', None) or optax.safe_int32_increment

# Kernel gradients tract has just preconditioned (weak references): a second
# tract in the same chain would receive one of them and precondition it twice.
_RECENT_OUTPUTS = collections.deque(maxlen=64)


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

  count: jax.Array
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
  normalized, spelled = {}, {}
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


def _validate_amortization(layers, refresh_every, stats_decay):
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
  if isinstance(layers, str):
    layers = [layers]
  normalized = [paths_lib.normalize_path(p) for p in layers]
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
    return stats_by_path
  missing = [p for p in layers if p not in stats_by_path]
  if missing and not amortized:
    raise KeyError(
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

  Args:
    lam: ridge strength lambda > 0 (0.1 is the paper's default; its scale
      assumes standardised inputs), or a schedule ``step -> lambda`` (checked
      at construction; one that reaches 0 is rejected).
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
    layers: the module paths this tract preconditions. Their statistics are
      required at every update (amortised mode: at refreshes) and statistics
      of other layers are ignored. None: whatever ``tract_stats`` names.
    refresh_every: opt-in amortisation (needs ``layers``): refresh the kept
      statistic every k updates and reuse it in between
      (:func:`~tract_optax.stats_due` tells the capture when to compute it).
      None or 1 (default) uses each batch's own statistic, as the paper does.
    stats_decay: opt-in: keep a moving average of refreshed statistics with
      this decay (None or 0, the default, replaces the kept statistic at each
      refresh). In amortised mode an update without ``tract_stats`` (or with
      ``{}``) preconditions with the kept statistic.
    check_condition: warn when a solve is too ill-conditioned for its float
      type: None (default) for eager calls only, True inside ``jit`` too
      (``jax.debug.callback``), False never.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update(updates, state,
    params=None, *, tract_stats, **extra_args)`` needs ``tract_stats``.

  Raises:
    ValueError: if ``lam`` is not a finite number > 0 (or a schedule that
      stays > 0), the amortisation settings are invalid, or both
      ``axis_name`` and ``local_stats`` are given. (When called, ``update``
      raises for a missing or malformed statistic, and for named axes bound
      without ``axis_name``/``local_stats``.)

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


def _tract_states(opt_state):
  return [
    s
    for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda s: isinstance(s, TractState))
    if isinstance(s, TractState)
  ]


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
    ValueError: if ``opt_state`` holds no TrAct state, or several.

  Example:
    >>> import optax
    >>> tx = optax.chain(tract_optax.tract(0.1), optax.sgd(0.1))
    >>> bool(tract_optax.stats_due(tx.init({'w': jnp.zeros(2)})))
    True
  """
  found = _tract_states(opt_state)
  if len(found) != 1:
    raise ValueError(
      f'stats_due needs an optimizer state with exactly one TrAct state; found {len(found)}.'
    )
  state = found[0]
  return (state.refreshes == 0) | (state.count - state.last_refresh >= state.refresh_every)
