"""``tract``: the TrAct gradient transformation for Optax.

Placed first in an ``optax.chain``, it replaces the gradient of each named first
layer's ``kernel`` by its TrAct gradient and hands everything on unchanged, so
any optimizer after it sees the TrAct gradient as if it were the gradient.

The module keeps no state of its own: what ``tract`` does is a function of its
arguments, its closure (configuration) and its ``TractState`` (what changes from
step to step, ``tract_optax._src.tract_state``). Guards that need the whole
optimizer state (an optimizer before ``tract``, two of ``tract``) read its
structure in ``tract_optax._src.chain_guard``, re-exported here.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from tract_optax._src import amortize, docs_link, lanes, tract_state
from tract_optax._src import axes as axes_lib
from tract_optax._src import paths as paths_lib
from tract_optax._src import ridge as ridge_lib
from tract_optax._src.chain_guard import (
  AllowedBeforeTractState,
  allow_before_tract,
  check_opt_state,
  tract_states,
)
from tract_optax._src.precondition import precondition
from tract_optax._src.stats import TractStats, all_reduce_stats
from tract_optax._src.tract_state import TractState

# tract, and what linen.py and the tests import from here (defined in chain_guard, tract_state)
__all__ = (
  'AllowedBeforeTractState',
  'TractState',
  'allow_before_tract',
  'check_opt_state',
  'stats_due',
  'tract',
)

ScalarOrSchedule = ridge_lib.ScalarOrSchedule
AxisName = axes_lib.AxisName
ModulePath = paths_lib.ModulePath

_SEE_STATS = docs_link.see('limits', 'Statistics that do not arrive')
_SEE_CHAIN = docs_link.see('limits', 'Where `tract` sits in the chain')
_SEE_CHECKPOINTS = docs_link.see('limits', 'Checkpoints')

_MISSING_STATS = (
  'tract(...).update received no tract_stats. Pass them, tx.update(grads, opt_state, params, '
  "tract_stats=stats) (Flax's TrainState drops them: use tract_optax.linen.TractTrainState; "
  'a wrapper without extra arguments drops them too), or drop tract and use the gradient '
  'route, apply_tract in the loss.' + _SEE_STATS
)
_EMPTY_STATS = (
  'tract(...).update received an empty tract_stats ({}): the step would silently be a '
  "plain one. Pass the first layer's statistic, or build tract with layers=[...] and "
  'refresh_every=k to reuse a kept one.' + _SEE_STATS
)
_INJECT_HINT = (
  ' With optax.inject_hyperparams, pass static_args=('
  "'refresh_every', 'stats_decay') so that they stay Python numbers."
)
_AMORTIZED_NEEDS_LAYERS = (
  'The amortised statistic (refresh_every > 1 or stats_decay > 0) keeps a '
  'moment per layer in the optimizer state, so tract needs the layers at '
  "construction: tract(..., layers=[('stem',)])."
)
_NO_LAYERS = (
  'tract(layers=[]) names no layer; leave layers out to precondition whatever tract_stats names.'
)
_MASKED_HINT = (
  ' The updates hold masked-out leaves (optax.masked / optax.multi_transform): this '
  "tract's group lacks the kernel. Put tract first, outside the masking."
)


class _Settings(NamedTuple):
  """``tract``'s validated configuration, kept in its closure."""

  lam_checked: bool  # False: a traced lam, checked when it is used
  layers: Optional[Tuple[ModulePath, ...]]  # None: whatever tract_stats names
  kept_layers: Tuple[ModulePath, ...]  # amortised mode: the state keeps their statistic
  refresh_every: int
  stats_decay: float


def _validate(
  lam: ScalarOrSchedule,
  axis_name: AxisName,
  local_stats: bool,
  layers: Optional[Sequence[paths_lib.PathLike]],
  refresh_every: Optional[int],
  stats_decay: Optional[float],
) -> _Settings:
  """Checks ``tract``'s arguments at construction; raises naming the bad one."""
  lam_checked = ridge_lib.validate_lam(lam)  # False: a traced value, checked at run time
  if axis_name is not None and local_stats:
    axes_lib.resolve_axis_name(axis_name, local_stats)  # raises: pick one
  # None defaults, not 1 and 0.0: optax.inject_hyperparams(tract)(lam=...)
  # turns every numeric argument into an array hyperparameter, but leaves None
  # alone, so these structural settings stay static unless given.
  refresh_every = 1 if refresh_every is None else refresh_every
  stats_decay = 0.0 if stats_decay is None else stats_decay
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
    raise ValueError(_AMORTIZED_NEEDS_LAYERS)
  normalized = None if layers is None else _normalize_layers(layers)
  kept_layers = (normalized or ()) if amortized else ()
  return _Settings(lam_checked, normalized, kept_layers, refresh_every, stats_decay)


def _normalize_layers(layers: Sequence[paths_lib.PathLike]) -> Tuple[ModulePath, ...]:
  normalized = paths_lib.normalize_paths(layers)  # a tuple of names is ambiguous: refused
  if not normalized:
    raise ValueError(_NO_LAYERS)
  if len(set(normalized)) != len(normalized):
    raise ValueError(f'tract(layers={layers!r}) names a layer twice.')
  return tuple(normalized)


def _normalize_stats(
  tract_stats: Optional[Mapping[Any, TractStats]], amortized: bool
) -> Dict[ModulePath, TractStats]:
  """``tract_stats`` keyed by normalised module path, each statistic validated."""
  if tract_stats is None:
    if amortized:  # a step that skips the statistic: the kept one is used
      return {}
    raise TypeError(_MISSING_STATS)
  if not isinstance(tract_stats, Mapping):
    raise TypeError(
      'tract_stats must be a mapping {module path: TractStats}, e.g. from '
      f'tract_optax.linen.apply_with_stats; got {type(tract_stats).__name__}.' + _SEE_STATS
    )
  normalized: Dict[ModulePath, TractStats] = {}
  spelled: Dict[ModulePath, object] = {}
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


def _select(
  stats_by_path: Dict[ModulePath, TractStats],
  layers: Optional[Tuple[ModulePath, ...]],
  amortized: bool,
) -> Dict[ModulePath, TractStats]:
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


def _kernel_positions(
  updates: optax.Updates, stats_paths: Sequence[ModulePath], kept_layers: Sequence[ModulePath]
) -> Dict[ModulePath, int]:
  """The flat leaf index of each named layer's kernel in ``updates``.

  Raises:
    ValueError: for updates flattened to one array (``optax.flatten``).
    ModulePathError: (a ``KeyError``) for a layer with no kernel in ``updates``.
  """
  named = tuple(stats_paths) + tuple(kept_layers)
  if named:
    _refuse_flattened(updates, named[0], 'update')
  kernel_index = paths_lib.kernel_leaf_index(updates)
  masked = jax.tree_util.tree_leaves(updates, is_leaf=lambda v: isinstance(v, optax.MaskedNode))
  hint = _MASKED_HINT if any(isinstance(leaf, optax.MaskedNode) for leaf in masked) else ''
  positions = {
    path: paths_lib.require_kernel(kernel_index, path, 'tract_stats', 'the updates', hint)
    for path in stats_paths
  }
  for path in kept_layers:
    if path not in positions:
      positions[path] = paths_lib.require_kernel(
        kernel_index, path, 'tract(layers=...)', 'the updates', hint
      )
  return positions


def _refuse_flattened(tree: optax.Params, path: ModulePath, where: str) -> None:
  """Refuses a tree that is one array (``optax.flatten`` ravels params and updates)."""
  if not isinstance(tree, jax.Array) and not hasattr(tree, 'shape'):
    return
  raise ValueError(
    f'tract(...).{where} received one array of shape {jnp.shape(tree)}, not the parameter '
    f'tree, so it cannot find the kernel of {paths_lib.format_path(path)!r}; optax.flatten '
    'ravels the tree. Put tract outside it: optax.chain(tract_optax.tract(lam), '
    'optax.flatten(optimizer)).' + _SEE_CHAIN
  )


def _fields_text(names: Iterable[object]) -> str:
  return ', '.join(sorted(str(name) for name in names)) or 'none'


def _not_a_state(state: object, cache_keys: Tuple[str, ...]) -> str:
  """The message for a state that is not the ``TractState`` ``init`` made."""
  differs = ''
  if isinstance(state, Mapping):
    fields, cache = set(state), state.get('stats_cache')
    if fields != set(TractState._fields):
      differs = (
        f" Its fields are another layout's (extra: {_fields_text(fields - set(TractState._fields))};"
        f' missing: {_fields_text(set(TractState._fields) - fields)}).'
      )
    elif isinstance(cache, Mapping) and set(cache) != set(cache_keys):
      differs = f' It keeps statistics for {_fields_text(cache)}, this tract for {_fields_text(cache_keys)}.'
  return (
    f'tract(...).update received a state of type {type(state).__name__}, not the TractState '
    'that tract(...).init returns (restored without a target tree?).'
    + differs
    + ' Restore it with a target built from tx.init(params).'
    + _SEE_CHECKPOINTS
  )


def _check_layout(state: object, cache_keys: Tuple[str, ...]) -> None:
  """Refuses a state whose layout is not what this ``tract`` builds."""
  if not isinstance(state, TractState):
    raise TypeError(_not_a_state(state, cache_keys))
  kept = tuple(state.stats_cache) if isinstance(state.stats_cache, Mapping) else None
  if kept is None or set(kept) != set(cache_keys):
    raise ValueError(
      f'tract(...).update received a TractState that keeps statistics for '
      f'{_fields_text(kept or ())}, but this tract keeps them for {_fields_text(cache_keys)} '
      '(amortised vs per-batch, or other layers). Restore it with a target built from '
      'this tx.init(params).' + _SEE_CHECKPOINTS
    )


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
  per_lane_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """TrAct: first-layer kernel gradients preconditioned by their input statistic.

  For every entry ``path -> stats`` of ``tract_stats``, the gradient ``G`` of the
  ``kernel`` leaf under ``path`` becomes ``(A^T A / N + lam I)^{-1} G``; all
  other leaves, biases included, pass through unchanged. Put it first in an
  ``optax.chain``: the chain forwards ``tract_stats`` to it. Weight decay
  belongs after it (``optax.add_decayed_weights`` or ``optax.adamw``), as in
  the authors' code; weight decay written into the loss is preconditioned
  too.

  Placed after another transformation, or twice, ``tract`` would precondition
  something other than the gradient. ``tract`` sees only the updates it
  receives and its own state, so it cannot tell; whoever holds the whole
  optimizer state (``TractTrainState.apply_gradients``,
  ``stats_due``) refuses, by the state's structure, two
  ``tract`` states and a chain member ahead of ``tract`` that keeps
  per-coordinate state (Adam, momentum, RMSProp, noise, ...; wrap a member
  you vouch for in ``allow_before_tract``). Not detected:
  stateless or scalar-state members before ``tract`` (``add_decayed_weights``
  preconditions the weight decay; clipping and schedules are harmless),
  ``nnx.Optimizer`` or a hand-written ``tx.update`` (nothing checks the whole
  state there), and the gradient route followed by ``tract`` in the chain
  (both precondition). See ``docs/limits.md``, "Where ``tract`` sits in the
  chain".

  Args:
    lam: ridge strength lambda > 0 (0.1 is the paper's default; its scale
      assumes standardised inputs), or a schedule ``step -> lambda`` (checked
      at construction; one that reaches 0 is rejected). It must be a normal
      float32 number, 1.18e-38 to 3.4e38 (outside it is 0 or infinite where
      the solve runs). A value known when it is used (a number, a concrete
      array, ``optax.inject_hyperparams`` rebuilding ``tract`` outside
      ``jit``) that is not is refused with ``ValueError``; a traced one
      (inside ``jit``, e.g. an injected schedule) is checked at run time by a
      host callback that makes the jitted call raise (``check_condition=False``
      leaves it out: the TrAct gradient is then NaN).
    axis_name: the ``pmap``/``shard_map`` axis (or axes) over which the batch
      is split; statistics are then averaged to the global-batch statistic
      before the solve. Not needed under ``jit`` with a sharded batch, where
      the statistic is already global. Inside a bound named axis, tract
      refuses to run without it (or ``local_stats=True``).
    local_stats: inside ``pmap``/``shard_map``, precondition each device with
      the statistic of its own part of the batch, on purpose (what the PyTorch
      reference does under DDP). Not exact for the whole batch. Also for an
      ensemble under a named ``jax.vmap`` (one model per lane).
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
      (``stats_due`` tells the capture when to compute it).
      The period lives here, not in the state: a restored state follows
      today's value from its last refresh on.
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
      (``jax.debug.callback``), False never (not even the run-time check of
      a traced ``lam``).
    per_lane_stats: under ``jax.vmap`` of ``update`` (an ensemble of models,
      one per lane, each with its own data), precondition each lane with its
      own statistic. Without it a statistic that differs from lane to lane (a
      per-example split of one model's batch) is refused, as on the gradient
      route; with it, gradients shared by the lanes are refused too.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update(updates, state,
    params=None, *, tract_stats, **extra_args)`` needs ``tract_stats``.

  Raises:
    ValueError: if ``lam`` is not a finite normal float32 number > 0 (or a
      schedule that stays so), the amortisation settings are invalid, or both
      ``axis_name`` and ``local_stats`` are given. (When called, ``update``
      raises for a missing, empty or malformed statistic, a path with no
      kernel (``KeyError``), updates flattened to one array
      (``optax.flatten``), a state of another layout, and named axes bound
      without ``axis_name``/``local_stats``.)
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
  lam_checked, layers, kept_layers, refresh_every, stats_decay = _validate(
    lam, axis_name, local_stats, layers, refresh_every, stats_decay
  )
  amortized = bool(kept_layers)
  check_traced_lam = check_condition is not False and not lam_checked
  cache_keys = tuple(amortize.cache_key(path) for path in kept_layers)

  def init_fn(params: optax.Params) -> TractState:
    if amortized:
      _refuse_flattened(params, kept_layers[0], 'init')
    return tract_state.initial(amortize.init_cache(params, kept_layers) if amortized else {})

  def update_fn(
    updates: optax.Updates,
    state: TractState,
    params: Optional[optax.Params] = None,
    *,
    tract_stats: Optional[Mapping[Any, TractStats]] = None,
    **extra_args: Any,
  ) -> Tuple[optax.Updates, TractState]:
    del params, extra_args
    _check_layout(state, cache_keys)
    stats_by_path = _select(_normalize_stats(tract_stats, amortized), layers, amortized)
    reduce_over = axes_lib.resolve_axis_name(axis_name, local_stats)
    lam_value = lam(state.count) if callable(lam) else lam
    if check_traced_lam:  # a traced lam (inject_hyperparams under jit)
      ridge_lib.refuse_traced_invalid(lam_value)
    positions = _kernel_positions(updates, tuple(stats_by_path), kept_layers)
    if reduce_over is not None:
      stats_by_path = {path: all_reduce_stats(s, reduce_over) for path, s in stats_by_path.items()}
    filled: Dict[ModulePath, jax.Array] = {}  # amortised: whether each kept statistic exists
    if amortized:
      stats_by_path, filled, state = tract_state.use_kept_stats(
        state, stats_by_path, kept_layers, refresh_every, stats_decay
      )
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    for module, stats in stats_by_path.items():
      name = paths_lib.format_path(module)
      gradient = jax.lax.stop_gradient(leaves[positions[module]])
      stats = lanes.lane_guard(name, per_lane_stats, 'tract')(gradient, stats)
      solved = precondition(
        leaves[positions[module]],
        stats,
        lam_value,
        relative_lam=relative_lam,
        check_condition=check_condition,
        name=name,
      )
      if module in filled:  # amortised: NaN until the kept statistic is first refreshed
        solved = jnp.where(filled[module], solved, jnp.nan)
      leaves[positions[module]] = solved
    new_state = tract_state.advance(state, refresh_every, amortized)
    return jax.tree_util.tree_unflatten(treedef, leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stats_due(opt_state: optax.OptState) -> jax.Array:
  """Whether the next update of a ``tract`` refreshes its statistic.

  Finds the TrAct state anywhere inside an optimizer state (e.g. of an
  ``optax.chain``). Use it to skip computing the statistic on other steps. A
  refresh stays due until an update receives every kept layer's statistic.
  The answer was computed by the last update from its ``refresh_every``; the
  update itself decides with its own (today's) period, so right after a
  checkpoint is restored into another ``refresh_every`` the first answer may
  be the old period's (the update then reuses the kept statistic once).

  Args:
    opt_state: the optimizer state holding exactly one ``TractState``.

  Returns:
    A scalar bool array (always True without amortisation).

  Raises:
    ValueError: if ``opt_state`` holds no TrAct state, or several, or a
      member with per-coordinate state runs before ``tract`` in a chain.

  Example:
    >>> import optax
    >>> tx = optax.chain(tract_optax.tract(0.1), optax.sgd(0.1))
    >>> bool(tract_optax.stats_due(tx.init({'w': jnp.zeros(2)})))
    True
  """
  check_opt_state(opt_state, tract_stats=None, owner='stats_due')
  found = tract_states(opt_state)
  if len(found) != 1:
    raise ValueError(
      f'stats_due needs an optimizer state with exactly one TrAct state; found {len(found)}.'
    )
  return jnp.asarray(found[0].due)
