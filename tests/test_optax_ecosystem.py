"""TrAct with the rest of Optax: accumulation, injection, skipping, checkpoints.

Plain-JAX model throughout: a 3x3 conv ``stem`` (the preconditioned first
layer) and a dense ``head``, parameters in nested dicts as Flax lays them out.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tract_optax
from tract_optax._src import stats as stats_lib

LAM = 0.1
KERNEL_SIZE = (3, 3)
NUM_CLASSES = 3
STEM = ('stem',)


def _params(seed: int = 0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  stem_kernel = rng.standard_normal(KERNEL_SIZE + (2, 4)) / np.sqrt(18)
  head_kernel = rng.standard_normal((4, NUM_CLASSES)) / 2
  params = {'stem': {'kernel': stem_kernel, 'bias': np.zeros(4)},
            'head': {'kernel': head_kernel, 'bias': np.zeros(NUM_CLASSES)}}
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), params)


def _batch(seed: int, dtype=jnp.float32, batch: int = 4):
  """Images of varying contrast and brightness, and their labels."""
  rng = np.random.default_rng(100 + seed)
  scale = rng.uniform(0.2, 3.0, (batch, 1, 1, 1))
  shift = rng.uniform(-1.0, 1.0, (batch, 1, 1, 1))
  x = rng.standard_normal((batch, 6, 6, 2)) * scale + shift
  labels = rng.integers(0, NUM_CLASSES, batch)
  return jnp.asarray(x, dtype), jnp.asarray(labels)


def _loss(params, x, labels):
  z = jax.lax.conv_general_dilated(
      x, params['stem']['kernel'], (1, 1), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  hidden = jnp.tanh(z + params['stem']['bias']).mean(axis=(1, 2))
  logits = hidden @ params['head']['kernel'] + params['head']['bias']
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def _stats(x):
  return {STEM: tract_optax.conv_stats(x, KERNEL_SIZE, padding='SAME')}


@jax.jit
def _grads_and_stats(params, x, labels):
  return jax.grad(_loss)(params, x, labels), _stats(x)


def _tract_by_hand(grads, stats, lam=LAM):
  """``grads`` with the stem kernel's gradient replaced by its TrAct gradient."""
  grads = jax.tree.map(lambda g: g, grads)  # a copy to modify
  grads['stem']['kernel'] = tract_optax.precondition(
      grads['stem']['kernel'], stats[STEM], lam)
  return grads


def _assert_trees_close(actual, expected, rtol=1e-6, atol=1e-7):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a, np.float64),
                               np.asarray(b, np.float64), rtol=rtol, atol=atol)


def _rel_diff(a_tree, b_tree) -> float:
  """Largest difference over the largest magnitude of ``b_tree``."""
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a_tree)])
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b_tree)])
  a, b = a.astype(np.float64), b.astype(np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _jitted_update(tx):
  return jax.jit(lambda grads, state, params, stats: tx.update(
      grads, state, params, tract_stats=stats))


# ---------------------------------------------------------------- optimizers

OPTIMIZERS = {
    'sgd': lambda: optax.sgd(0.1),
    'sgd_momentum': lambda: optax.sgd(0.1, momentum=0.9),
    'adam': lambda: optax.adam(1e-2),
    'adamw': lambda: optax.adamw(1e-2, weight_decay=1e-2),
    'lion': lambda: optax.lion(1e-3),
}


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_chain_equals_precondition_then_optimizer(name):
  """Two steps of chain(tract, opt) = by-hand TrAct gradient fed to opt."""
  tx = optax.chain(tract_optax.tract(LAM), OPTIMIZERS[name]())
  inner = OPTIMIZERS[name]()
  update = _jitted_update(tx)
  by_hand_update = jax.jit(lambda grads, state, params, stats: inner.update(
      _tract_by_hand(grads, stats), state, params))
  params = by_hand = _params()
  state, inner_state = tx.init(params), inner.init(by_hand)
  for step in range(2):
    x, labels = _batch(step)
    grads, stats = _grads_and_stats(params, x, labels)
    updates, state = update(grads, state, params, stats)
    params = optax.apply_updates(params, updates)

    grads, stats = _grads_and_stats(by_hand, x, labels)
    updates, inner_state = by_hand_update(grads, inner_state, by_hand, stats)
    by_hand = optax.apply_updates(by_hand, updates)
  _assert_trees_close(params, by_hand)
  assert _rel_diff(params, _params()) > 1e-4  # the steps did move


# ------------------------------------------------------ gradient accumulation

K_MICRO = 3


def _mean(trees):
  return jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *trees)


def _inner():
  return optax.sgd(0.1, momentum=0.9)


def _emitted_update(tx, params, micro):
  """Feeds the micro-batches; checks nothing is emitted before the last."""
  update = _jitted_update(tx)
  state = tx.init(params)
  for i, (grads, stats) in enumerate(micro):
    updates, state = update(grads, state, params, stats)
    if i < len(micro) - 1:
      assert all(not np.any(u) for u in jax.tree.leaves(updates))
  return updates


@pytest.fixture(scope='module')
def accumulation():
  """Emitted updates of both MultiSteps arrangements on K_MICRO micro-batches."""
  params = _params()
  micro = [_grads_and_stats(params, *_batch(i)) for i in range(K_MICRO)]
  outside = optax.chain(
      tract_optax.tract(LAM),
      optax.MultiSteps(_inner(), every_k_schedule=K_MICRO).gradient_transformation())
  inside = optax.MultiSteps(optax.chain(tract_optax.tract(LAM), _inner()),
                            every_k_schedule=K_MICRO)
  return {'params': params, 'micro': micro,
          'outside': _emitted_update(outside, params, micro),
          'inside': _emitted_update(inside, params, micro)}


def _inner_step(grads, params):
  updates, _ = _inner().update(grads, _inner().init(params), params)
  return updates


def test_multisteps_with_tract_outside_preconditions_each_micro_batch(accumulation):
  """chain(tract, MultiSteps(opt)): each micro-batch gets its own statistic.

  The emitted update is the inner step on the mean of per-micro-batch TrAct
  gradients, the gradient-accumulation analogue of PyTorch's reference
  (which applies TrAct in each backward pass).
  """
  micro = accumulation['micro']
  expected = _inner_step(_mean([_tract_by_hand(g, s) for g, s in micro]),
                         accumulation['params'])
  _assert_trees_close(accumulation['outside'], expected, rtol=1e-5)


def test_multisteps_with_tract_inside_sees_only_the_last_statistic(accumulation):
  """MultiSteps(chain(tract, opt)), MultiSteps called directly: the inner chain
  gets the extra arguments of the current (last) micro-batch only, so the
  mean raw gradient is preconditioned with the last micro-batch's statistic."""
  micro = accumulation['micro']
  mean_grads = _mean([g for g, _ in micro])
  expected = _inner_step(_tract_by_hand(mean_grads, micro[-1][1]),
                         accumulation['params'])
  _assert_trees_close(accumulation['inside'], expected, rtol=1e-5)
  assert _rel_diff(accumulation['inside'], accumulation['outside']) > 1e-2


def test_neither_multisteps_arrangement_is_tract_of_the_accumulated_batch(
    accumulation):
  """TrAct of the whole accumulated batch (its combined statistic, its mean
  gradient) differs from both arrangements: MultiSteps cannot combine
  statistics."""
  micro = accumulation['micro']
  combined = {STEM: tract_optax.combine_stats([s[STEM] for _, s in micro])}
  whole_batch = _inner_step(
      _tract_by_hand(_mean([g for g, _ in micro]), combined),
      accumulation['params'])
  assert _rel_diff(accumulation['outside'], whole_batch) > 1e-3
  assert _rel_diff(accumulation['inside'], whole_batch) > 1e-3


def test_multisteps_inside_a_chain_drops_tract_stats():
  """MultiSteps.gradient_transformation() is a plain GradientTransformation:
  optax.chain calls it without extra arguments, so a tract inside it never
  receives tract_stats and says so."""
  params = _params()
  inner = optax.MultiSteps(optax.chain(tract_optax.tract(LAM), _inner()),
                           every_k_schedule=K_MICRO)
  tx = optax.chain(inner.gradient_transformation())
  grads, stats = _grads_and_stats(params, *_batch(0))
  with pytest.raises(TypeError, match='received no tract_stats'):
    tx.update(grads, tx.init(params), params, tract_stats=stats)


# ------------------------------------------------------- injected hyperparams

def test_inject_hyperparams_lam_is_readable_and_changeable_under_jit():
  params = _params()
  grads, stats = _grads_and_stats(params, *_batch(0))
  tx = optax.inject_hyperparams(tract_optax.tract)(lam=LAM)
  update = _jitted_update(tx)
  state = tx.init(params)
  assert float(state.hyperparams['lam']) == pytest.approx(LAM)

  updates, state = update(grads, state, params, stats)
  _assert_trees_close(updates, _tract_by_hand(grads, stats, LAM))

  state.hyperparams['lam'] = jnp.asarray(0.5, state.hyperparams['lam'].dtype)
  updates, state = update(grads, state, params, stats)
  _assert_trees_close(updates, _tract_by_hand(grads, stats, 0.5))
  assert float(state.hyperparams['lam']) == 0.5
  assert _rel_diff(updates, _tract_by_hand(grads, stats, LAM)) > 1e-2


def _lam_schedule(count):
  return 0.4 * 0.5 ** jnp.minimum(count, 8)  # 0.4, 0.2, 0.1, ..., then held


@pytest.mark.parametrize('injected', [False, True], ids=['native', 'injected'])
def test_lam_schedule_uses_the_value_at_each_step(injected):
  params = _params()
  grads, stats = _grads_and_stats(params, *_batch(0))
  if injected:
    tx = optax.inject_hyperparams(tract_optax.tract)(lam=_lam_schedule)
  else:
    tx = tract_optax.tract(lam=_lam_schedule)
  update = _jitted_update(tx)
  state = tx.init(params)
  for step in range(3):
    updates, state = update(grads, state, params, stats)
    _assert_trees_close(updates, _tract_by_hand(grads, stats, _lam_schedule(step)))
    if injected:  # the value used at this step is the one on show
      assert float(state.hyperparams['lam']) == pytest.approx(_lam_schedule(step))


def test_inject_hyperparams_in_a_chain_with_an_optimizer():
  params = _params()
  tx = optax.chain(optax.inject_hyperparams(tract_optax.tract)(lam=LAM),
                   optax.sgd(0.1))
  grads, stats = _grads_and_stats(params, *_batch(0))
  updates, state = _jitted_update(tx)(grads, tx.init(params), params, stats)
  expected = jax.tree.map(lambda g: -0.1 * g, _tract_by_hand(grads, stats))
  _assert_trees_close(updates, expected)
  assert float(state[0].hyperparams['lam']) == pytest.approx(LAM)


def test_inject_hyperparams_with_amortised_settings_needs_static_args():
  """refresh_every and stats_decay shape tract's state, so they must stay
  Python numbers: given explicitly through inject_hyperparams they are
  declared static_args (left at their None defaults, nothing is needed)."""
  params = _params()
  grads, stats = _grads_and_stats(params, *_batch(0))
  with pytest.raises(ValueError, match="static_args=\\('refresh_every'"):
    optax.inject_hyperparams(tract_optax.tract)(
        lam=LAM, layers=[STEM], refresh_every=2).init(params)
  tx = optax.inject_hyperparams(
      tract_optax.tract, static_args=('refresh_every', 'stats_decay'))(
          lam=LAM, layers=[STEM], refresh_every=2)
  updates, state = _jitted_update(tx)(grads, tx.init(params), params, stats)
  _assert_trees_close(updates, _tract_by_hand(grads, stats))
  assert not bool(tract_optax.stats_due(state))


def test_inject_hyperparams_with_bfloat16_params():
  """inject_hyperparams stores lam in the params' dtype: lam = bf16(0.1) =
  0.10009765625 unless hyperparam_dtype=jnp.float32 is given."""
  params = _params(dtype=jnp.bfloat16)
  grads, stats = _grads_and_stats(params, *_batch(0, jnp.bfloat16))
  for hyperparam_dtype, lam_used in [(None, float(jnp.bfloat16(LAM))),
                                     (jnp.float32, float(np.float32(LAM)))]:
    tx = optax.inject_hyperparams(tract_optax.tract,
                                  hyperparam_dtype=hyperparam_dtype)(lam=LAM)
    updates, state = tx.update(grads, tx.init(params), params, tract_stats=stats)
    assert float(state.hyperparams['lam']) == lam_used
    assert updates['stem']['kernel'].dtype == jnp.bfloat16
    _assert_trees_close(updates, _tract_by_hand(grads, stats, lam_used))


# ----------------------------------------------------------- apply_if_finite

def _corrupt(x, value):
  return x.at[1, 2, 3, 0].set(value)


@pytest.mark.parametrize('bad_value', [np.nan, np.inf])
def test_apply_if_finite_skips_a_non_finite_batch(bad_value):
  """apply_if_finite(chain(tract, opt)) tests the incoming gradient, which a
  NaN or inf input makes non-finite along with the statistic."""
  tx_inner = optax.chain(tract_optax.tract(LAM), optax.sgd(0.1, momentum=0.9))
  tx = optax.apply_if_finite(tx_inner, max_consecutive_errors=2)
  update = _jitted_update(tx)
  params = _params()
  state = tx.init(params)

  x, labels = _batch(0)
  grads, stats = _grads_and_stats(params, _corrupt(x, bad_value), labels)
  assert not np.all(np.isfinite(stats[STEM].moment))
  assert not np.all(np.isfinite(grads['stem']['kernel']))
  updates, state = update(grads, state, params, stats)
  new_params = optax.apply_updates(params, updates)
  assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
  for new, old in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
    assert np.all(np.isfinite(new))
    np.testing.assert_array_equal(new, old)

  # The next good step applies, from the untouched inner state.
  grads, stats = _grads_and_stats(params, x, labels)
  updates, state = update(grads, state, params, stats)
  expected, _ = tx_inner.update(grads, tx_inner.init(params), params,
                                tract_stats=stats)
  assert int(state.notfinite_count) == 0 and bool(state.last_finite)
  assert int(state.total_notfinite) == 1
  _assert_trees_close(updates, expected)


# --------------------------------------------------------------------- orbax

def _checkpointer(ocp):
  if hasattr(ocp, 'StandardCheckpointer'):
    return ocp.StandardCheckpointer()
  return ocp.PyTreeCheckpointer()


@pytest.mark.parametrize('tract_kwargs', [
    {},
    # amortised: the state keeps a statistic per layer (a TractStats with a
    # None field) and a refresh counter
    {'layers': [STEM], 'refresh_every': 2},
], ids=['per_batch', 'amortised'])
def test_orbax_round_trip_of_optimizer_state(tmp_path, tract_kwargs):
  ocp = pytest.importorskip('orbax.checkpoint')
  tx = optax.chain(tract_optax.tract(LAM, **tract_kwargs), optax.adam(1e-2))
  update = _jitted_update(tx)
  params = _params()
  state = tx.init(params)
  for step in range(3):  # amortised: the next step reuses the kept statistic
    grads, stats = _grads_and_stats(params, *_batch(step))
    updates, state = update(grads, state, params, stats)
    params = optax.apply_updates(params, updates)

  checkpoint = {'params': params, 'opt_state': state}
  checkpointer = _checkpointer(ocp)
  path = tmp_path / 'checkpoint'
  checkpointer.save(path, checkpoint)
  if hasattr(checkpointer, 'wait_until_finished'):
    checkpointer.wait_until_finished()
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        checkpoint)
  restored = checkpointer.restore(path, target)
  if hasattr(checkpointer, 'close'):
    checkpointer.close()

  assert jax.tree.structure(restored) == jax.tree.structure(checkpoint)
  assert isinstance(restored['opt_state'][0], tract_optax.TractState)
  assert int(restored['opt_state'][0].count) == 3
  # Amortised, the next step is no refresh: it solves with the restored kept
  # statistic, not with the one it is given.
  assert bool(tract_optax.stats_due(restored['opt_state'])) == (not tract_kwargs)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(checkpoint)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)

  grads, stats = _grads_and_stats(params, *_batch(3))
  from_original = update(grads, state, params, stats)
  from_restored = update(grads, restored['opt_state'], restored['params'], stats)
  for a, b in zip(jax.tree.leaves(from_restored), jax.tree.leaves(from_original)):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------- mixed precision

BF16_UNIT_ROUNDOFF = 2.0 ** -8  # 8 significant bits, round to nearest


def _stats_batch(form, dtype=jnp.float32):
  """Inputs whose stem statistic has the given form.

  'woodbury': one 3x3 crop, N = 9 patch rows < n = 18 features.
  """
  x, _ = _batch(0, dtype)
  return x if form == 'moment' else x[:1, :3, :3]


@pytest.mark.parametrize('form', ['moment', 'woodbury'])
def test_bfloat16_inputs_give_float32_statistics(form):
  x16 = _stats_batch(form, jnp.bfloat16)
  x32 = x16.astype(jnp.float32)  # the same values
  for stats16, stats32 in [
      (_stats(x16)[STEM], _stats(x32)[STEM]),
      (tract_optax.dense_stats(x16), tract_optax.dense_stats(x32))]:
    data16 = stats16.moment if stats16.moment is not None else stats16.rows
    data32 = stats32.moment if stats32.moment is not None else stats32.rows
    assert data16.dtype == jnp.float32 and stats16.count.dtype == jnp.float32
    # Products of bf16 numbers are exact in float32; only summation order
    # may differ.
    np.testing.assert_allclose(data16, data32, rtol=1e-6, atol=1e-6)
  assert _stats(x16)[STEM].is_woodbury == (form == 'woodbury')


@pytest.mark.parametrize('form', ['moment', 'woodbury'])
def test_precondition_of_a_bfloat16_gradient(form):
  grads, _ = _grads_and_stats(_params(), *_batch(0))
  stats = _stats(_stats_batch(form))[STEM]
  assert stats.is_woodbury == (form == 'woodbury')
  grad32 = grads['stem']['kernel']
  grad16 = grad32.astype(jnp.bfloat16)
  result16 = tract_optax.precondition(grad16, stats, LAM)
  assert result16.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(result16, np.float32)))

  # The solve runs in float32; the result is only rounded to bfloat16 at the
  # end, so each entry is within one unit roundoff of the float32 solution
  # for the same (bf16-rounded) gradient.
  same_input = tract_optax.precondition(grad16.astype(jnp.float32), stats, LAM)
  np.testing.assert_allclose(np.asarray(result16, np.float32), same_input,
                             rtol=BF16_UNIT_ROUNDOFF, atol=0)

  # Against the float32 gradient: rounding G (relative error <= u) is
  # amplified at most by the condition number of (A^T A / N + lam I), plus
  # the final rounding: ||error|| / ||exact|| <= (kappa + 1) u.
  exact = np.asarray(tract_optax.precondition(grad32, stats, LAM), np.float64)
  moment = np.asarray(stats_lib.to_moment(stats).moment, np.float64)
  kappa = np.linalg.cond(moment + LAM * np.eye(moment.shape[0]))
  error = (np.linalg.norm(np.asarray(result16, np.float64) - exact)
           / np.linalg.norm(exact))
  assert error <= (kappa + 1) * BF16_UNIT_ROUNDOFF


def test_chain_step_with_bfloat16_params_is_close_to_float32():
  """Two steps of chain(tract, sgd momentum) in bfloat16 against float32 from
  the same starting values and inputs.

  We compare the updates, not the new parameters: adding a small update to a
  bf16 parameter rounds it to the parameter's own precision, which says
  nothing about TrAct. In bfloat16 every forward and backward intermediate
  is rounded to 8 significant bits (relative 2^-8 = 0.4%); the gradient's
  error then passes through TrAct's solve and the update is rounded once
  more. Ten or so roundings in sequence allow a few percent of the largest
  update; we allow 5% (measured about 1%).
  """
  tx = optax.chain(tract_optax.tract(LAM), optax.sgd(0.1, momentum=0.9))
  update = _jitted_update(tx)
  params16 = _params(dtype=jnp.bfloat16)
  params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params16)
  state16, state32 = tx.init(params16), tx.init(params32)
  for step in range(2):
    x16, labels = _batch(step, jnp.bfloat16)
    grads16, stats16 = _grads_and_stats(params16, x16, labels)
    grads32, stats32 = _grads_and_stats(params32, x16.astype(jnp.float32), labels)
    updates16, state16 = update(grads16, state16, params16, stats16)
    updates32, state32 = update(grads32, state32, params32, stats32)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates16))
    assert all(np.all(np.isfinite(np.asarray(u, np.float32)))
               for u in jax.tree.leaves(updates16))
    assert _rel_diff(updates16, updates32) < 5e-2
    params16 = optax.apply_updates(params16, updates16)
    params32 = optax.apply_updates(params32, updates32)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params16))
  assert all(np.all(np.isfinite(np.asarray(p, np.float32)))
             for p in jax.tree.leaves(params16))
