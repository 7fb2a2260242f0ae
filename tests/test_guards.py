"""Guards that read structure (issue 20 section 1, issue 21 section 2).

- a chain member with per-coordinate state ahead of ``tract`` is refused by the
  whole-state check (``check_opt_state``: ``TractTrainState``, ``stats_due``),
  found through every Optax wrapper, and harmless members stay accepted;
- two ``tract`` states in one optimizer are refused; what cannot be seen (the
  gradient route followed by ``tract``) is documented, and pinned here;
- configuration lives in ``tract``'s closure: a restored state follows today's
  ``refresh_every``; a state of another layout is refused with what differs;
- ``optax.flatten``, ``optax.lookahead`` and an injected lambda schedule that
  reaches 0 are named.

Most cases only build the optimizer state abstractly (``jax.eval_shape``): the
check reads the state's structure, not its values.
"""

import collections
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import contrib

import tract_optax
from tests import reference
from tract_optax._src import amortize, chain_guard, ridge, tract_state, transform

LAM = 0.1
PARAMS = {'stem': {'kernel': jnp.ones((4, 3)), 'bias': jnp.zeros(3)}}
CHAIN_MESSAGE = (
  r'f: tract is not first in its chain: member \d+ \(.*\) keeps per-coordinate '
  r'state ahead of it.*allow_before_tract. '
  r'See docs/limits.md#where-tract-sits-in-the-chain'
)


def _rows(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _tract():
  return tract_optax.tract(LAM)


def _hand_written_momentum():
  def init_fn(params):
    return {'velocity': jax.tree.map(jnp.zeros_like, params)}

  def update_fn(updates, state, params=None):
    del params
    velocity = jax.tree.map(lambda v, g: 0.9 * v + g, state['velocity'], updates)
    return velocity, {'velocity': velocity}

  return optax.GradientTransformation(init_fn, update_fn)


def _quiet(make):
  def build():
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # noisy_sgd's "specify a key" warning
      return make()

  return build


# The optimizers that issue 20 found accepted before tract (all silently wrong,
# 4.2 to 14.1 relative error after 3 steps), and the ones refused by name before.
OPTIMIZERS = {
  'adam': lambda: optax.adam(0.1),
  'sgd_momentum': lambda: optax.sgd(0.1, momentum=0.9),
  'adafactor': lambda: optax.adafactor(0.1),
  'lion': lambda: optax.lion(0.1),
  'rmsprop': lambda: optax.rmsprop(0.1),
  'rmsprop_bias_correction': lambda: optax.rmsprop(0.1, bias_correction=True),
  'scale_by_rms_bias_correction': lambda: optax.scale_by_rms(bias_correction=True),
  'ema': lambda: optax.ema(0.9),
  'apply_every': lambda: optax.apply_every(2),
  'scale_by_stddev_bias_correction': lambda: optax.scale_by_stddev(bias_correction=True),
  'optimistic_gradient_descent': lambda: optax.optimistic_gradient_descent(0.1),
  'noisy_sgd': _quiet(lambda: optax.noisy_sgd(0.1)),
  'lookahead_sgd_momentum': lambda: optax.lookahead(optax.sgd(0.1, momentum=0.9), 2, 0.5),
  'prodigy': lambda: contrib.prodigy(),
  'schedule_free_sgd': lambda: contrib.schedule_free_sgd(0.1),
  'schedule_free_adamw': lambda: contrib.schedule_free_adamw(0.1),
  'sophia': lambda: contrib.sophia(0.1),
  'ademamix': lambda: contrib.ademamix(0.1),
  'simplified_ademamix': lambda: contrib.simplified_ademamix(0.1),
  'cocob': lambda: contrib.cocob(),
  'dadapt_adamw': lambda: contrib.dadapt_adamw(),
  'dog': lambda: contrib.dog(),
  'dowg': lambda: contrib.dowg(),
  'madgrad': lambda: contrib.madgrad(0.1),
  'mechanize': lambda: contrib.mechanize(optax.sgd(0.1)),
  'momo': lambda: contrib.momo(),
  'momo_adam': lambda: contrib.momo_adam(),
  'hand_written_momentum': _hand_written_momentum,
}


def _exists(make):
  try:
    make()
  except AttributeError:  # not in this Optax release (the lower bound lacks some of contrib)
    return False
  return True


OPTIMIZERS = {name: make for name, make in OPTIMIZERS.items() if _exists(make)}


def _abstract_state(tx, params=None):
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return jax.eval_shape(tx.init, PARAMS if params is None else params)


def _check(state, **kwargs):
  transform.check_opt_state(state, tract_stats=kwargs.pop('tract_stats', None), owner='f', **kwargs)


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_an_optimizer_before_tract_is_refused_and_after_it_accepted(name):
  make = OPTIMIZERS[name]
  before = _abstract_state(optax.chain(make(), _tract()))
  with pytest.raises(ValueError, match=CHAIN_MESSAGE.replace(r'member \d+', 'member 0')):
    _check(before)
  with pytest.raises(ValueError, match=r'stats_due: tract is not first in its chain'):
    tract_optax.stats_due(before)
  _check(_abstract_state(optax.chain(_tract(), make())))  # tract first: accepted


_WRAPPED = {
  'named_chain': lambda: optax.named_chain(('adam', optax.adam(0.1)), ('tract', _tract())),
  'nested_chain': lambda: optax.chain(optax.clip(1.0), optax.chain(optax.adam(0.1), _tract())),
  'inject_hyperparams': lambda: optax.inject_hyperparams(
    lambda lam: optax.chain(optax.adam(0.1), tract_optax.tract(lam))
  )(lam=LAM),
  'inject_hyperparams_inner': lambda: optax.chain(
    optax.inject_hyperparams(optax.adam)(learning_rate=0.1),
    optax.inject_hyperparams(tract_optax.tract)(lam=LAM),
  ),
  'multi_steps': lambda: optax.MultiSteps(optax.chain(optax.adam(0.1), _tract()), 2),
  'masked': lambda: optax.masked(
    optax.chain(optax.adam(0.1), _tract()), {'stem': {'kernel': True, 'bias': False}}
  ),
  'partition': lambda: optax.partition(
    {'a': optax.chain(optax.adam(0.1), _tract()), 'b': optax.sgd(0.1)},
    {'stem': {'kernel': 'a', 'bias': 'b'}},
  ),
  'lookahead_around': lambda: optax.lookahead(optax.chain(optax.adam(0.1), _tract()), 2, 0.5),
  'apply_if_finite': lambda: optax.apply_if_finite(optax.chain(optax.adam(0.1), _tract()), 3),
}


@pytest.mark.parametrize('name', sorted(_WRAPPED))
def test_an_optimizer_before_tract_is_found_through_wrappers(name):
  with pytest.raises(ValueError, match=CHAIN_MESSAGE):
    _check(_abstract_state(_WRAPPED[name]()))


_ACCEPTED = {
  'tract_alone': _tract,
  'clip_by_global_norm_first': lambda: optax.chain(
    optax.clip_by_global_norm(1.0), _tract(), optax.adam(0.1)
  ),
  'zero_nans_scale_by_schedule_first': lambda: optax.chain(
    optax.zero_nans(),
    optax.scale_by_schedule(optax.linear_schedule(1.0, 0.5, 10)),
    _tract(),
    optax.adam(0.1),
  ),
  'reduce_on_plateau_first': lambda: optax.chain(
    contrib.reduce_on_plateau(), _tract(), optax.adam(0.1)
  ),
  'multi_steps_around': lambda: optax.MultiSteps(optax.chain(_tract(), optax.adam(0.1)), 2),
  'inject_hyperparams_tract': lambda: optax.chain(
    optax.inject_hyperparams(tract_optax.tract)(lam=LAM), optax.adam(0.1)
  ),
  'named_chain_tract_first': lambda: optax.named_chain(
    ('tract', _tract()), ('adam', optax.adam(0.1))
  ),
  'adam_in_another_group': lambda: optax.multi_transform(
    {'t': optax.chain(_tract(), optax.sgd(0.1)), 'a': optax.adam(0.1)},
    {'stem': {'kernel': 't', 'bias': 'a'}},
  ),
  'vouched_for': lambda: optax.chain(
    tract_optax_allow(optax.masked(optax.adam(0.1), {'stem': {'kernel': False, 'bias': True}})),
    _tract(),
    optax.sgd(0.1),
  ),
}


def tract_optax_allow(inner):
  return getattr(tract_optax, 'allow_before_tract', transform.allow_before_tract)(inner)


@pytest.mark.parametrize('name', sorted(_ACCEPTED))
def test_harmless_members_and_wrappers_are_accepted(name):
  _check(_abstract_state(_ACCEPTED[name]()))


def test_named_chain_order_survives_jit():
  """named_chain keeps an OrderedDict, whose order jit preserves (a plain dict's
  keys would come back sorted: 'adam' before 'tract')."""
  tx = optax.named_chain(('tract', _tract()), ('adam', optax.adam(0.1)))
  state = jax.jit(tx.init)(PARAMS)
  assert isinstance(state, collections.OrderedDict) and list(state) == ['tract', 'adam']
  _check(state)


def test_scalar_state_before_tract_commutes_with_it():
  """Why scalar state is accepted: a schedule's factor commutes with TrAct's
  linear solve, so scale_by_schedule before tract gives tract's step."""
  grads = {'stem': {'kernel': jnp.asarray(_rows((4, 3), 1)), 'bias': jnp.ones(3)}}
  stats = {'stem': tract_optax.dense_stats(_rows((16, 4), 2))}
  schedule = optax.linear_schedule(1.0, 0.25, 3)
  first = optax.chain(optax.scale_by_schedule(schedule), _tract())
  last = optax.chain(_tract(), optax.scale_by_schedule(schedule))
  states = first.init(PARAMS), last.init(PARAMS)
  for _ in range(3):
    (a, s0), (b, s1) = (
      tx.update(grads, s, tract_stats=stats) for tx, s in zip((first, last), states, strict=True)
    )
    states = s0, s1
    np.testing.assert_allclose(a['stem']['kernel'], b['stem']['kernel'], rtol=1e-6)


def test_vouched_member_runs_unchanged():
  grads = {'stem': {'kernel': jnp.asarray(_rows((4, 3), 1)), 'bias': jnp.ones(3)}}
  x = _rows((16, 4), 2)
  stats = {'stem': tract_optax.dense_stats(x)}
  adam_on_bias = optax.masked(optax.scale_by_adam(), {'stem': {'kernel': False, 'bias': True}})
  tx = optax.chain(tract_optax_allow(adam_on_bias), _tract())
  updates, state = tx.update(grads, tx.init(PARAMS), tract_stats=stats)
  _check(state)
  expected = reference.tract_solve(x, np.asarray(grads['stem']['kernel']), LAM)
  assert reference.rel_err(updates['stem']['kernel'], expected) < 1e-5
  plain, _ = adam_on_bias.update(grads, adam_on_bias.init(PARAMS))
  np.testing.assert_array_equal(updates['stem']['bias'], plain['stem']['bias'])


# ----------------------------------------------------------------------------
# two tract states; what is not detected


@pytest.mark.parametrize(
  'make',
  [
    lambda: optax.chain(_tract(), _tract(), optax.sgd(0.1)),
    lambda: optax.chain(
      _tract(), optax.chain(optax.inject_hyperparams(tract_optax.tract)(lam=LAM))
    ),
    lambda: optax.multi_transform(
      {'a': _tract(), 'b': _tract()}, {'stem': {'kernel': 'a', 'bias': 'b'}}
    ),
  ],
  ids=['chain', 'nested', 'two_groups'],
)
def test_two_tract_states_are_refused(make):
  state = _abstract_state(make())
  with pytest.raises(
    ValueError,
    match=r'f: the optimizer holds 2 tract transformations.*Keep '
    r'one.*See docs/limits.md#where-tract-sits-in-the-chain',
  ):
    _check(state)
  with pytest.raises(ValueError, match=r'stats_due: the optimizer holds 2 tract'):
    tract_optax.stats_due(state)


def test_the_gradient_route_then_tract_is_not_detected_and_preconditions_twice():
  """Documented, not detected: the kernel gradient from the gradient route is an
  array like any other, so tract in the chain preconditions it again."""
  x = _rows((16, 4), 2)
  stats = tract_optax.dense_stats(x)
  target = jnp.asarray(_rows((16, 3), 3))

  def loss(kernel):
    return jnp.mean((x @ tract_optax.tract_kernel(kernel, stats, lam=LAM) - target) ** 2)

  kernel = jnp.asarray(_rows((4, 3), 4))
  grads = {'stem': {'kernel': jax.grad(loss)(kernel)}}
  tx = _tract()
  updates, _ = jax.jit(lambda g: tx.update(g, tx.init(g), tract_stats={'stem': stats}))(grads)
  plain = jax.grad(lambda k: jnp.mean((x @ k - target) ** 2))(kernel)
  once = reference.tract_solve(x, np.asarray(plain), LAM)
  twice = reference.tract_solve(x, once, LAM)
  assert reference.rel_err(updates['stem']['kernel'], twice) < 1e-4
  assert reference.rel_err(updates['stem']['kernel'], once) > 0.1


def test_the_library_keeps_no_module_level_mutable_state():
  for module in (transform, chain_guard, tract_state, amortize, ridge):
    mutable = [
      name
      for name, value in vars(module).items()
      if not name.startswith('__') and isinstance(value, (list, dict, set, collections.deque))
    ]
    assert not mutable, (module.__name__, mutable)


# ----------------------------------------------------------------------------
# configuration in the closure; states of another layout


def _stem_stats(seed):
  return {'stem': tract_optax.dense_stats(_rows((16, 4), seed))}


def test_a_restored_state_follows_todays_refresh_period():
  """A refresh_every=4 state restored into refresh_every=2 refreshes every 2
  steps from its last refresh (the state holds no period)."""
  saved_with = tract_optax.tract(LAM, layers=['stem'], refresh_every=4)
  _, state = saved_with.update(PARAMS, saved_with.init(PARAMS), tract_stats=_stem_stats(0))
  assert 'refresh_every' not in tract_optax.TractState._fields
  today = tract_optax.tract(LAM, layers=['stem'], refresh_every=2)
  update = jax.jit(lambda s, stats: today.update(PARAMS, s, tract_stats=stats))
  due = []
  for step in range(1, 7):
    due.append(bool(tract_optax.stats_due(state)))
    _, state = update(state, _stem_stats(step))
  assert due == [count % 2 == 0 for count in range(1, 7)]  # F, T, F, T, F, T
  assert int(state.refreshes) == 4  # counts 0 (saved), 2, 4, 6


def test_a_restored_state_due_under_the_new_period_refreshes_one_step_late():
  """Documented: the first stats_due after a restore is the saved update's answer."""
  saved_with = tract_optax.tract(LAM, layers=['stem'], refresh_every=4)
  state = saved_with.init(PARAMS)
  for step in range(2):
    _, state = saved_with.update(PARAMS, state, tract_stats=_stem_stats(step))
  today = tract_optax.tract(LAM, layers=['stem'], refresh_every=2)
  assert not bool(tract_optax.stats_due(state))  # the saved answer (period 4)
  _, state = today.update(PARAMS, state)  # due under period 2, no statistic: kept one used
  assert int(state.refreshes) == 1 and bool(tract_optax.stats_due(state))
  _, state = today.update(PARAMS, state, tract_stats=_stem_stats(3))
  assert int(state.refreshes) == 2 and int(state.last_refresh) == 3


def test_a_state_of_another_layout_says_what_differs():
  per_batch, amortised = _tract(), tract_optax.tract(LAM, layers=['stem'], refresh_every=2)
  stats = _stem_stats(0)
  with pytest.raises(
    ValueError,
    match=r'keeps statistics for stem, but this tract keeps them '
    r'for none \(amortised vs per-batch.*See docs/limits.md#checkpoints',
  ):
    per_batch.update(PARAMS, amortised.init(PARAMS), tract_stats=stats)
  with pytest.raises(
    ValueError,
    match=r'keeps statistics for none, but this tract keeps them '
    r'for stem',
  ):
    amortised.update(PARAMS, per_batch.init(PARAMS), tract_stats=stats)
  old = {'count': 3, 'refresh_every': 4, 'refreshes': 1, 'last_refresh': 0, 'stats_cache': {}}
  with pytest.raises(
    TypeError,
    match=r'state of type dict, not the TractState.*Its fields are '
    r"another layout's \(extra: refresh_every; missing: due\)",
  ):
    per_batch.update(PARAMS, old, tract_stats=stats)


def test_an_orbax_checkpoint_of_the_old_layout_is_carried_over(tmp_path):
  """The recipe of docs/limits.md#checkpoints, with a real Orbax round trip."""
  ocp = pytest.importorskip('orbax.checkpoint')

  old_fields = ('count', 'refresh_every', 'refreshes', 'last_refresh', 'stats_cache')
  OldTractState = collections.namedtuple('OldTractState', old_fields)  # the layout before
  old = OldTractState(
    jnp.asarray(5, jnp.int32),
    jnp.asarray(1, jnp.int32),
    jnp.asarray(0, jnp.int32),
    jnp.asarray(0, jnp.int32),
    {},
  )
  tx = optax.chain(_tract(), optax.sgd(0.1, momentum=0.9))
  fresh = tx.init(PARAMS)
  checkpoint = {'params': PARAMS, 'opt_state': (old, fresh[1])}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'ckpt', checkpoint)
  checkpointer.wait_until_finished()
  target = {'params': PARAMS, 'opt_state': fresh}
  with pytest.raises(ValueError, match=r'Structure mismatch|do not match'):  # Orbax's own
    checkpointer.restore(
      tmp_path / 'ckpt', jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
    )
  raw = checkpointer.restore(tmp_path / 'ckpt')
  checkpointer.close()
  stats = _stem_stats(0)
  with pytest.raises(TypeError, match=r'extra: refresh_every; missing: due'):
    tx.update(PARAMS, tuple(raw['opt_state']), tract_stats=stats)
  opt_state = (fresh[0]._replace(count=jnp.asarray(raw['opt_state'][0]['count'])), *fresh[1:])
  assert int(opt_state[0].count) == 5
  tx.update(PARAMS, opt_state, tract_stats=stats)


# ----------------------------------------------------------------------------
# issue 21 section 2: flatten, lookahead, an injected lambda schedule


def test_flatten_around_the_chain_is_named_and_inside_it_works():
  stats = _stem_stats(0)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
  around = optax.flatten(optax.chain(_tract(), optax.sgd(0.1)))
  with pytest.raises(
    ValueError,
    match=r'tract\(...\).update received one array of shape '
    r'\(15,\), not the parameter tree.*optax.flatten.*optax.chain\('
    r'tract_optax.tract\(lam\), optax.flatten\(optimizer\)\)',
  ):
    around.update(grads, around.init(PARAMS), PARAMS, tract_stats=stats)
  amortised = optax.flatten(tract_optax.tract(LAM, layers=['stem'], refresh_every=2))
  with pytest.raises(ValueError, match=r'tract\(...\).init received one array.*optax.flatten'):
    amortised.init(PARAMS)
  inside = optax.chain(_tract(), optax.flatten(optax.sgd(0.1)))
  plain = optax.chain(_tract(), optax.sgd(0.1))
  a, _ = inside.update(grads, inside.init(PARAMS), PARAMS, tract_stats=stats)
  b, _ = plain.update(grads, plain.init(PARAMS), PARAMS, tract_stats=stats)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6)


def test_lookahead_is_named():
  stats = _stem_stats(0)
  tx = optax.lookahead(optax.chain(_tract(), optax.sgd(0.1)), 2, 0.5)
  state = _abstract_state(tx)
  with pytest.raises(
    TypeError,
    match=r'f: the tx around tract \(state LookaheadState\) takes no '
    r'extra arguments.*optax.lookahead.*gradient route',
  ):
    _check(state, tract_stats=stats, tx=tx)
  _check(state, tract_stats=None, tx=tx)  # no statistic given: nothing to refuse
  # nested in a chain, lookahead drops the statistic: tract says it is missing
  nested = optax.chain(tx)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    nested_state = nested.init(optax.LookaheadParams.init_synced(PARAMS))
  with pytest.raises(
    TypeError,
    match=r'received no tract_stats.*a wrapper without extra '
    r'arguments drops them too',
  ):
    nested.update(
      optax.LookaheadParams.init_synced(PARAMS),
      nested_state,
      optax.LookaheadParams.init_synced(PARAMS),
      tract_stats=stats,
    )


def test_an_injected_lambda_schedule_that_reaches_zero_is_refused_under_jit():
  stats = _stem_stats(0)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
  tx = optax.inject_hyperparams(tract_optax.tract)(lam=optax.linear_schedule(LAM, 0.0, 2))
  update = jax.jit(lambda g, s: tx.update(g, s, tract_stats=stats))
  state = tx.init(PARAMS)
  for _ in range(2):  # lambda 0.1, 0.05: fine
    updates, state = update(grads, state)
    assert np.all(np.isfinite(updates['stem']['kernel']))
  with pytest.raises(jax.errors.JaxRuntimeError, match=r'lam = 0.0 reached tract inside jit'):
    jax.block_until_ready(update(grads, state))  # lambda 0.0
  with pytest.raises(ValueError, match=r'reaches 0\.0 at step'):  # given to tract itself
    tract_optax.tract(optax.linear_schedule(LAM, 0.0, 2))


@pytest.mark.parametrize(
  'make, checked',
  [
    (lambda: tract_optax.tract(LAM), False),
    (lambda: tract_optax.tract(optax.cosine_decay_schedule(LAM, 100, alpha=0.1)), False),
    (lambda: optax.inject_hyperparams(tract_optax.tract)(lam=LAM), True),
    (lambda: optax.inject_hyperparams(tract_optax.tract)(lam=LAM, check_condition=False), False),
  ],
  ids=['number', 'schedule_given_to_tract', 'injected', 'injected_unchecked'],
)
def test_only_a_traced_lambda_adds_a_run_time_check(make, checked):
  """A number or a schedule given to tract is checked at construction: the
  jitted update holds no host callback; an injected (traced) lambda does."""
  tx = make()
  stats = _stem_stats(0)
  jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, tract_stats=stats))(PARAMS, tx.init(PARAMS))
  assert ('callback' in str(jaxpr)) == checked


# ----------------------------------------------------------------------------
# one rule for both routes under jax.vmap: a statistic split by lanes


def _members(count=3, rows=12, seed=0):
  """An ensemble: each member's own data and the gradient of its own kernel."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((count, rows, 4)), jnp.float32)
  kernels = jnp.asarray(rng.standard_normal((count, 4, 3)), jnp.float32)
  grads = jax.vmap(jax.grad(lambda k, xi: jnp.mean(jnp.tanh(xi @ k))))(kernels, x)
  return x, {'stem': {'kernel': grads, 'bias': jnp.zeros((count, 3))}}


def test_vmap_of_update_with_per_lane_statistics_is_refused_as_on_the_gradient_route():
  x, grads = _members()
  tx = tract_optax.tract(LAM)

  def update(g, xi):
    return tx.update(g, tx.init(PARAMS), tract_stats={'stem': tract_optax.dense_stats(xi)})[0]

  with pytest.raises(ValueError, match=r"tract for 'stem' runs inside jax.vmap with a statistic "
                     r'that differs from lane to lane'):
    jax.vmap(update)(grads, x)


@pytest.mark.parametrize('named', [False, True], ids=['vmap', "vmap(axis_name='ens')"])
def test_an_ensemble_with_its_own_data_per_lane_is_exact_with_per_lane_stats(named):
  x, grads = _members()
  tx = tract_optax.tract(LAM, per_lane_stats=True, local_stats=named)

  def update(g, xi):
    return tx.update(g, tx.init(PARAMS), tract_stats={'stem': tract_optax.dense_stats(xi)})[0]

  mapped = jax.vmap(update, axis_name='ens' if named else None)(grads, x)
  for lane in range(x.shape[0]):
    rows = np.asarray(x[lane], np.float64)
    expected = reference.tract_solve(rows, np.asarray(grads['stem']['kernel'][lane]), LAM)
    np.testing.assert_allclose(mapped['stem']['kernel'][lane], expected, rtol=2e-5, atol=1e-7)
  # axis_name='ens' (the advice for data parallelism) would pool the members' statistics
  if named:
    pooled_tx = tract_optax.tract(LAM, per_lane_stats=True, axis_name='ens')
    pooled = jax.vmap(
      lambda g, xi: pooled_tx.update(
        g, pooled_tx.init(PARAMS), tract_stats={'stem': tract_optax.dense_stats(xi)}
      )[0],
      axis_name='ens',
    )(grads, x)
    assert reference.rel_err(pooled['stem']['kernel'], mapped['stem']['kernel']) > 0.05


def test_per_lane_stats_with_a_gradient_shared_by_the_lanes_is_refused():
  x, grads = _members()
  tx = tract_optax.tract(LAM, per_lane_stats=True)
  shared = jax.tree.map(lambda a: a[0], grads)

  def update(xi):
    return tx.update(shared, tx.init(PARAMS), tract_stats={'stem': tract_optax.dense_stats(xi)})[0]

  with pytest.raises(ValueError, match=r'per_lane_stats=True with a kernel shared by the lanes'):
    jax.vmap(update)(x)


def test_named_axis_message_tells_an_ensemble_from_data_parallelism():
  x, grads = _members()
  tx = tract_optax.tract(LAM)
  with pytest.raises(ValueError, match=r"named axis \['ens'\] without axis_name\. For data "
                     r"parallelism build it with tract\(\.\.\., axis_name='ens'\).*for an "
                     r'ensemble \(one model per lane\) pass local_stats=True, and '
                     r'per_lane_stats=True where each model has its own data'):
    jax.vmap(
      lambda g, xi: tx.update(g, tx.init(PARAMS), tract_stats={'stem': tract_optax.dense_stats(xi)}),
      axis_name='ens',
    )(grads, x)


def test_tract_train_state_names_lookahead():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  from tract_optax import linen as tract_linen  # pylint: disable=import-outside-toplevel

  model = nn.Dense(3, name='stem')
  x = _rows((8, 4))
  params = model.init(jax.random.key(0), x)['params']
  tx = optax.lookahead(optax.chain(_tract(), optax.sgd(0.1)), 2, 0.5)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    state = tract_linen.TractTrainState.create(
      apply_fn=model.apply, params=optax.LookaheadParams.init_synced(params), tx=tx
    )
  grads = jax.tree.map(jnp.ones_like, state.params)
  with pytest.raises(TypeError, match=r'TractTrainState.apply_gradients: the tx around tract '
                     r'\(state LookaheadState\) takes no extra arguments.*optax.lookahead'):
    state.apply_gradients(grads=grads, tract_stats={('stem',): tract_optax.dense_stats(x)})
