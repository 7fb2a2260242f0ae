"""Guards that read a whole optimizer state: where ``tract`` sits in its chain.

``tract`` sees only the updates it receives and its own state, so it cannot
tell whether it runs first, or twice. Whoever holds the whole optimizer state
(``TractTrainState.apply_gradients``, ``stats_due``) calls
``check_opt_state``, which walks the state tree: no list of optimizer
names, no module-level state. ``allow_before_tract`` marks a member the
user vouches for.
"""

from __future__ import annotations

import collections
import inspect
from typing import Any, Callable, List, Mapping, NamedTuple, Optional, Tuple

import jax
import optax

from tract_optax._src import docs_link
from tract_optax._src.stats import TractStats
from tract_optax._src.tract_state import TractState

_SEE_CHAIN = docs_link.see('limits', 'Where `tract` sits in the chain')

_NO_TRACT = (
  '{owner} received tract_stats, but its tx holds no tract, so the step would silently '
  'be a plain one. Put tract first in the chain (Optax route), or pass no tract_stats '
  '(gradient route).' + _SEE_CHAIN
)
_NO_EXTRA_ARGS = (
  '{owner}: the tx around tract (state {state}) takes no extra '
  'arguments, so tract_stats cannot reach tract (optax.lookahead is one such). Use the '
  'gradient route (apply_tract in the loss) with it.' + _SEE_CHAIN
)
_SEVERAL = (
  '{owner}: the optimizer holds {count} tract transformations, so the kernel '
  'gradient would be preconditioned more than once. Keep one (tract(layers=[...]) '
  'serves several layers).' + _SEE_CHAIN
)
_NOT_FIRST = (
  '{owner}: tract is not first in its chain: member {index} ({member}) keeps '
  "per-coordinate state ahead of it, so tract would precondition that member's output, "
  'not the gradient. Put tract first, or wrap a member you vouch for in '
  'allow_before_tract.' + _SEE_CHAIN
)


class AllowedBeforeTractState(NamedTuple):
  """State of ``allow_before_tract``: the wrapped transformation's state."""

  inner_state: optax.OptState


def allow_before_tract(
  inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Marks a stateful transformation the user vouches is harmless before ``tract``.

  The whole-state check (``TractTrainState.apply_gradients``,
  ``stats_due``) refuses a chain member with per-coordinate
  state (arrays of rank >= 1, random keys) ahead of ``tract``. Wrap such a member
  in this function when it does not change the first layer's kernel gradient
  beyond a factor (e.g. an Adam masked to other leaves); nothing else changes.

  Args:
    inner: the transformation to run unchanged.

  Returns:
    The same transformation, its state wrapped in an ``AllowedBeforeTractState``.

  Example:
    >>> other = optax.masked(optax.scale_by_adam(), {'w': False, 'v': True})
    >>> tx = optax.chain(allow_before_tract(other), tract_optax.tract(0.1))
    >>> bool(tract_optax.stats_due(tx.init({'w': jnp.zeros(2), 'v': jnp.zeros(2)})))
    True
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: optax.Params) -> AllowedBeforeTractState:
    return AllowedBeforeTractState(inner.init(params))

  def update_fn(
    updates: optax.Updates,
    state: AllowedBeforeTractState,
    params: Optional[optax.Params] = None,
    **extra_args: Any,
  ) -> Tuple[optax.Updates, AllowedBeforeTractState]:
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    return updates, AllowedBeforeTractState(inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_tract(node: object) -> bool:
  return isinstance(node, TractState)


def _vouched(node: object) -> bool:
  return isinstance(node, AllowedBeforeTractState)


def tract_states(opt_state: optax.OptState) -> List[TractState]:
  """Every ``TractState`` inside an optimizer state, in flattening order."""
  return [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_tract) if _is_tract(s)]


def _children(node: object) -> List[Any]:
  """The direct children of a pytree node, in its flattening order."""
  children, _ = jax.tree_util.tree_flatten(node, is_leaf=lambda child: child is not node)
  return children


def _is_sequence_of_members(node: object) -> bool:
  """Whether ``node`` is the state of a chain: members in order of application.

  ``optax.chain`` keeps a plain tuple, ``optax.named_chain`` an ``OrderedDict``
  (its order survives ``jit``). Named tuples (wrappers' states) and plain dicts
  (``partition`` / ``multi_transform`` groups, side by side) are not chains.
  """
  return type(node) is tuple or isinstance(node, collections.OrderedDict)  # pylint: disable=unidiomatic-typecheck


def _per_coordinate(leaf: object) -> bool:
  """Whether a state leaf carries per-coordinate state: an array of rank >= 1, or a key.

  Counts, step sizes and flags are scalars; a momentum, second moment,
  accumulated gradient or copy of the parameters has the parameters' (or a
  factored) shape; a random key means noise is added.
  """
  shape = getattr(leaf, 'shape', None)
  if shape is None:
    return False
  dtype = getattr(leaf, 'dtype', None)
  is_key = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
  return len(shape) >= 1 or is_key


def _carries_state(member: optax.OptState) -> bool:
  """Whether a chain member keeps per-coordinate state (not under allow_before_tract)."""
  return any(
    _per_coordinate(leaf)
    for leaf in jax.tree_util.tree_leaves(member, is_leaf=_vouched)
    if not _vouched(leaf)
  )


def _member_before_tract(node: object) -> Optional[Tuple[int, optax.OptState]]:
  """The first chain member ahead of a ``tract`` that carries state, or None.

  Walks the state tree: in a chain's state (see ``_is_sequence_of_members``)
  the members before the one that holds a ``TractState`` are checked; any
  other node (``inject_hyperparams``, ``MultiSteps``, ``masked``, ``partition``,
  ``lookahead``, ``apply_if_finite`` ...) is a wrapper or a set of groups, and
  only the children holding a ``TractState`` are followed. A wrapper's own
  arrays (``MultiSteps``' accumulated gradient) act around the whole chain.
  """
  if _is_tract(node) or _vouched(node):
    return None
  children = _children(node)
  holding = [i for i, child in enumerate(children) if tract_states(child)]
  if _is_sequence_of_members(node) and holding:
    for index in range(holding[0]):
      if _carries_state(children[index]):
        return index, children[index]
  for index in holding:
    found = _member_before_tract(children[index])
    if found is not None:
      return found
  return None


def _describe(member: optax.OptState) -> str:
  """The name of the state type in ``member`` that carries state, for a message."""
  named = [
    node
    for node in jax.tree_util.tree_leaves(member, is_leaf=lambda node: hasattr(node, '_fields'))
    if hasattr(node, '_fields') and _carries_state(node)
  ]
  return type(named[0] if named else member).__name__


def _takes_extra_args(tx: Any) -> bool:
  """Whether ``tx.update`` accepts keyword arguments beyond Optax's three (its signature).

  ``optax.lookahead``'s update is ``(updates, state, params)``; a chain's,
  ``MultiSteps``' and ``inject_hyperparams``' take ``**extra_args``. Where the
  signature cannot be read, it is assumed to take them (nothing is refused).
  """
  try:
    parameters = inspect.signature(tx.update).parameters.values()
  except (TypeError, ValueError, AttributeError):
    return True
  return any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == 'tract_stats' for p in parameters)


def check_opt_state(
  opt_state: optax.OptState,
  *,
  tract_stats: Optional[Mapping[Any, TractStats]],
  owner: str,
  init: Optional[Callable[[], optax.OptState]] = None,
  tx: Optional[optax.GradientTransformation] = None,
) -> None:
  """Refuses what a whole optimizer state shows to be wrong.

  ``tract`` itself sees only its own state, so a caller that holds the whole
  state (``TractTrainState.apply_gradients``, ``stats_due``)
  checks it by its structure: statistics go to an optimizer that holds a
  ``tract``; it holds one ``tract``, not several; and no chain member ahead of
  ``tract`` carries per-coordinate state (arrays of rank >= 1 or a random key:
  Adam, momentum, RMSProp, noise ...). Scalar state (counts, schedules) and
  stateless members (clipping) are accepted; so are wrappers around the chain
  (``MultiSteps``, ``inject_hyperparams``). ``allow_before_tract`` marks
  a member the user vouches for.

  Args:
    opt_state: the optimizer state of the whole ``tx``.
    tract_stats: the statistics handed to ``tx.update`` (None: none).
    owner: the API to name in messages.
    init: optional ``() -> tx.init(params)``, evaluated abstractly only when
      ``opt_state`` shows no TrAct state: if the ``tx`` does hold a ``tract``
      (a state restored without its target tree), nothing is raised here and
      ``tract``'s own update names that cause.
    tx: optional, the whole transformation: with ``tract_stats``, one whose
      ``update`` takes no extra arguments (``optax.lookahead``) is refused.

  Raises:
    ValueError: for statistics without a ``tract``, several of ``tract``, or
      a member with per-coordinate state ahead of ``tract``.
    TypeError: for statistics given to a ``tx`` that takes no extra arguments.

  Example:
    >>> tx = optax.chain(optax.scale_by_adam(), tract_optax.tract(0.1))
    >>> check_opt_state(tx.init({'w': jnp.zeros(2)}), tract_stats=None, owner='f')
    Traceback (most recent call last):
    ...
    ValueError: f: tract is not first in its chain: member 0 (ScaleByAdamState) keeps per-coordinate state ahead of it, so tract would precondition that member's output, not the gradient. Put tract first, or wrap a member you vouch for in allow_before_tract. See docs/limits.md#where-tract-sits-in-the-chain.
  """
  found = tract_states(opt_state)
  if tract_stats is not None and not found:
    if init is None or not tract_states(jax.eval_shape(init)):
      raise ValueError(_NO_TRACT.format(owner=owner))
  if tract_stats is not None and found and tx is not None and not _takes_extra_args(tx):
    raise TypeError(_NO_EXTRA_ARGS.format(owner=owner, state=type(opt_state).__name__))
  if len(found) > 1:
    raise ValueError(_SEVERAL.format(owner=owner, count=len(found)))
  before = _member_before_tract(opt_state)
  if before is not None:
    index, member = before
    raise ValueError(_NOT_FIRST.format(owner=owner, index=index, member=_describe(member)))
