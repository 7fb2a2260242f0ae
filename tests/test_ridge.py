"""The ridge: relative lambda, a lambda that reaches 0, ill-conditioned solves."""

import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tract_optax
from tests import reference


def _rows(shape, seed=0, scale=1.0, shift=0.0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


def _relative_solve(rows, grad, lam):
  """float64: ``(M + lam trace(M)/n I)^{-1} G``, ``M = A^T A / N``."""
  rows = np.asarray(rows, np.float64)
  n = rows.shape[1]
  moment = rows.T @ rows / rows.shape[0]
  ridge = lam * np.trace(moment) / n
  return np.linalg.solve(moment + ridge * np.eye(n), np.asarray(grad, np.float64))


@pytest.mark.parametrize('num_rows', [40, 6], ids=['moment', 'woodbury'])
def test_relative_lambda_against_float64(num_rows):
  rows = _rows((num_rows, 10), shift=0.3)
  grad = _rows((10, 4), seed=1)
  stats = tract_optax.stats_from_rows(rows)
  assert stats.is_woodbury == (num_rows < 10)
  got = tract_optax.precondition(jnp.asarray(grad), stats, 0.1, relative_lam=True)
  assert reference.rel_err(got, _relative_solve(rows, grad, 0.1)) < 1e-5


def test_relative_lambda_per_feature_group():
  x = _rows((2, 6, 6, 4))
  stats = tract_optax.conv_stats(x, (3, 3), feature_group_count=2)
  grad = _rows((3, 3, 2, 6), seed=2)
  got = tract_optax.precondition(jnp.asarray(grad), stats, 0.2, relative_lam=True)
  rows = reference.patch_rows(x, (3, 3), (1, 1), 'SAME', (1, 1), groups=2)
  weights = grad.reshape(18, 2, 3)
  for g in range(2):
    expected = _relative_solve(rows[g], weights[:, g], 0.2)
    assert reference.rel_err(np.asarray(got).reshape(18, 2, 3)[:, g], expected) < 1e-5


@pytest.mark.parametrize('num_rows', [64, 6], ids=['moment', 'woodbury'])
@pytest.mark.filterwarnings('ignore::tract_optax.ConditioningWarning')  # absolute lam x 255
def test_relative_lambda_makes_tract_invariant_to_input_scale(num_rows):
  """Inputs x s: G scales by s, the TrAct gradient by 1/s, so the change of
  the pre-activations (x s) @ dW is the same for every scale s."""
  rows = _rows((num_rows, 12), shift=0.5)
  upstream = _rows((num_rows, 3), seed=3)
  base = None
  for scale in (1.0, 255.0, 1e-3):
    scaled = rows * scale
    grad = scaled.T @ upstream
    stats = tract_optax.dense_stats(scaled)
    update = tract_optax.precondition(jnp.asarray(grad), stats, 0.1, relative_lam=True)
    change = scaled @ np.asarray(update, np.float64)
    if base is None:
      base = change
    else:
      assert reference.rel_err(change, base) < 5e-5, scale
  # an absolute lambda is not invariant
  absolute = [scale * np.asarray(tract_optax.precondition(
      jnp.asarray((rows * scale).T @ upstream), tract_optax.dense_stats(rows * scale), 0.1))
              for scale in (1.0, 255.0)]
  assert reference.rel_err(absolute[1] * 255.0, absolute[0]) > 0.1


def test_relative_lambda_of_no_rows_falls_back_to_lambda():
  stats = tract_optax.dense_stats(jnp.zeros((0, 3)))
  got = tract_optax.precondition(jnp.ones((3, 2)), stats, 0.5, relative_lam=True)
  np.testing.assert_allclose(got, 2.0)


def test_tract_with_relative_lambda_in_a_chain():
  rows = _rows((30, 5), scale=100.0)
  grads = {'stem': {'kernel': jnp.asarray(_rows((5, 2), seed=4))}}
  tx = tract_optax.tract(0.1, relative_lam=True)
  out, _ = tx.update(grads, tx.init(grads), tract_stats={'stem': tract_optax.dense_stats(rows)})
  expected = _relative_solve(rows, grads['stem']['kernel'], 0.1)
  assert reference.rel_err(out['stem']['kernel'], expected) < 1e-5


# ----------------------------------------------------------------------------
# lambda reaching 0


def test_schedule_that_reaches_zero_is_refused_at_construction():
  with pytest.raises(ValueError, match=r'The lam schedule reaches 0.0 at step \d+: '
                     r'lambda must stay > 0.*alpha=0.1'):
    tract_optax.tract(optax.cosine_decay_schedule(0.1, 1000))
  tract_optax.tract(optax.cosine_decay_schedule(0.1, 1000, alpha=0.1))  # accepted


@pytest.mark.parametrize('bad', [0.0, -0.05, float('nan')])
def test_lambda_that_is_not_positive_at_run_time_is_refused_even_inside_jit(bad):
  params = {'stem': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}
  grads = jax.tree.map(jnp.ones_like, params)
  stats = {'stem': tract_optax.dense_stats(_rows((10, 3)))}
  tx = optax.inject_hyperparams(tract_optax.tract)(lam=0.1)
  state = tx.init(params)
  state.hyperparams['lam'] = jnp.asarray(bad)
  # eagerly, inject_hyperparams rebuilds tract with the concrete value: an error
  with pytest.raises(ValueError, match='lam must be a finite number > 0'):
    tx.update(grads, state, tract_stats=stats)
  # under jit the value is traced: checked in the computation, the call raises
  with pytest.raises(Exception, match='reached tract inside jit'):
    jax.block_until_ready(jax.jit(lambda g, s: tx.update(g, s, tract_stats=stats))(grads, state))


@pytest.mark.parametrize('bad', [0.0, -0.05, float('nan')])
def test_unchecked_lambda_that_is_not_positive_gives_nan_that_apply_if_finite_skips(bad):
  params = {'stem': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}
  grads = jax.tree.map(jnp.ones_like, params)
  stats = {'stem': tract_optax.dense_stats(_rows((10, 3)))}
  tx = optax.inject_hyperparams(tract_optax.tract)(lam=0.1, check_condition=False)
  state = tx.init(params)
  state.hyperparams['lam'] = jnp.asarray(bad)
  updates, _ = jax.jit(lambda g, s: tx.update(g, s, tract_stats=stats))(grads, state)
  assert np.all(np.isnan(updates['stem']['kernel']))
  np.testing.assert_array_equal(updates['stem']['bias'], 1.0)
  # optax.apply_if_finite placed after tract (it checks its own input) skips the step
  # instead of corrupting the parameters
  guarded = optax.chain(
      optax.inject_hyperparams(tract_optax.tract)(lam=0.1, check_condition=False),
      optax.apply_if_finite(optax.sgd(0.1), 3))
  state = guarded.init(params)
  state[0].hyperparams['lam'] = jnp.asarray(bad)
  updates, state = jax.jit(lambda g, s: guarded.update(g, s, params, tract_stats=stats))(
      grads, state)
  assert int(state[1].notfinite_count) == 1
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, 0.0)


def test_lambda_of_the_wrong_shape_is_refused():
  stats = tract_optax.dense_stats(_rows((10, 3)))
  with pytest.raises(ValueError, match=r'lam must be a scalar.*\(3,\)'):
    tract_optax.precondition(jnp.ones((3, 2)), stats, jnp.ones(3) * 0.1)
  with pytest.raises(ValueError, match=r'lam must be a finite number > 0'):
    jax.jit(lambda lam: tract_optax.tract(lam))(jnp.ones(3))


# ----------------------------------------------------------------------------
# ill-conditioned solves: raw 0..255 pixels


def _smooth_raw_images(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 255, (16, 40, 40, 3))
  kernel = np.ones(9) / 9  # smooth along both axes: strongly correlated patches
  images = np.apply_along_axis(lambda v: np.convolve(v, kernel, 'same'), 1, images)
  images = np.apply_along_axis(lambda v: np.convolve(v, kernel, 'same'), 2, images)
  return jnp.asarray(images, jnp.float32)


def test_eager_call_warns_when_float32_cannot_resolve_the_solve():
  stats = tract_optax.conv_stats(_smooth_raw_images(), (7, 7), 2)
  grad = jnp.ones((7, 7, 3, 4))
  with pytest.warns(tract_optax.ConditioningWarning,
                    match=r'condition number ~\S+, too large for float32.*can reach '
                    r'eps x condition.*raw 0..255 pixels.*standardise the inputs.*'
                    r'relative_lam=True'):
    tract_optax.precondition(grad, stats, 0.1)
  with warnings.catch_warnings():
    warnings.simplefilter('error', tract_optax.ConditioningWarning)
    tract_optax.precondition(grad, stats, 0.1, relative_lam=True)  # well conditioned
    standardized = tract_optax.conv_stats((_smooth_raw_images() - 127.5) / 40.0, (7, 7), 2)
    tract_optax.precondition(grad, standardized, 0.1)


def test_jit_warns_only_with_check_condition():
  stats = tract_optax.conv_stats(_smooth_raw_images(), (7, 7), 2)
  grads = {'stem': {'kernel': jnp.ones((7, 7, 3, 4))}}
  for check, expected in ((False, 0), (True, 1)):
    tx = tract_optax.tract(0.1, check_condition=check)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      jax.jit(lambda g: tx.update(g, tx.init(g), tract_stats={'stem': stats})[0])(grads)
      jax.effects_barrier()
    hits = [w for w in caught if issubclass(w.category, tract_optax.ConditioningWarning)]
    assert len(hits) == expected, [str(w.message) for w in caught]
    if expected:
      assert "kernel of 'stem'" in str(hits[0].message)


def test_condition_estimate_against_numpy():
  # tract_optax.precondition is the function; the module is reached by name
  module = importlib.import_module('tract_optax._src.precondition')
  stats = tract_optax.conv_stats(_smooth_raw_images(), (7, 7), 2)
  system = np.asarray(stats.moment, np.float64) + 0.1 * np.eye(147)
  factor = jnp.linalg.cholesky(jnp.asarray(system, jnp.float32))
  estimate = float(module.condition_estimate(jnp.asarray(system, jnp.float32), factor))
  exact = np.linalg.cond(system)
  assert 0.5 * exact < estimate <= 1.05 * exact


def test_woodbury_form_warns_like_the_moment_form():
  """N < n rows of raw pixels: the Woodbury result cancels as badly as the
  n x n system is conditioned, and says so."""
  rng = np.random.default_rng(0)
  base = rng.uniform(0, 255, (1, 48))
  rows = jnp.asarray(base + rng.uniform(-5, 5, (8, 48)), jnp.float32)  # similar rows
  stats = tract_optax.dense_stats(rows)
  assert stats.is_woodbury
  with pytest.warns(tract_optax.ConditioningWarning, match='condition number'):
    tract_optax.precondition(jnp.asarray(rows.T @ rng.standard_normal((8, 3)), jnp.float32),
                             stats, 0.1)


def test_check_condition_false_never_estimates():
  stats = tract_optax.conv_stats(_smooth_raw_images(), (7, 7), 2)
  grad = jnp.ones((7, 7, 3, 4))

  def program(check):
    jaxpr = jax.make_jaxpr(
      lambda g: tract_optax.precondition(g, stats, 0.1, check_condition=check)
    )(grad)
    return str(jaxpr)

  checked, unchecked = program(True), program(False)
  # the estimate is power / inverse iteration (fori_loops: scans) reported by a callback
  assert 'scan' in checked and 'callback' in checked
  assert 'scan' not in unchecked and 'while' not in unchecked and 'callback' not in unchecked
  with warnings.catch_warnings():
    warnings.simplefilter('error', tract_optax.ConditioningWarning)
    tract_optax.precondition(grad, stats, 0.1, check_condition=False)