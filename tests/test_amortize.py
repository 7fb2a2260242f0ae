"""The opt-in amortised statistic: refresh every k steps, moving average."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tract_optax
from tests import reference


def _batches(num, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(24, 5)) * (1 + i), jnp.float32) for i in range(num)]


def _grads(seed=1):
  rng = np.random.default_rng(seed)
  return {'stem': {'kernel': jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
                   'bias': jnp.zeros(3)}}


def _moment(x):
  x = np.asarray(x, np.float64)
  return x.T @ x / x.shape[0]


def _solve(moment, grad, lam):
  return np.linalg.solve(moment + lam * np.eye(len(moment)), np.asarray(grad, np.float64))


@pytest.mark.parametrize('refresh_every', [1, 3])
def test_refresh_every_k_reuses_the_last_refreshed_statistic(refresh_every):
  grads, batches = _grads(), _batches(7)
  tx = tract_optax.tract(0.1, layers=['stem'], refresh_every=refresh_every)
  state = tx.init(grads)

  @jax.jit
  def update(state, x):
    due = tract_optax.stats_due(state)
    # Skip the computation when it is not due; the zero statistic is ignored.
    stats = jax.lax.cond(
        due, tract_optax.dense_stats,
        lambda v: jax.tree.map(jnp.zeros_like, tract_optax.dense_stats(v)), x)
    return tx.update(grads, state, tract_stats={('stem',): stats})

  for step, x in enumerate(batches):
    assert bool(tract_optax.stats_due(state)) == (step % refresh_every == 0)
    out, state = update(state, x)
    source = batches[step - step % refresh_every]
    expected = _solve(_moment(source), grads['stem']['kernel'], 0.1)
    assert reference.rel_err(out['stem']['kernel'], expected) < 1e-5
    np.testing.assert_array_equal(out['stem']['bias'], grads['stem']['bias'])
  # refresh_every=1 is the per-batch mode: nothing is kept, nothing refreshed
  expected_refreshes = len(range(0, 7, refresh_every)) if refresh_every > 1 else 0
  assert int(state.refreshes) == expected_refreshes


def test_moving_average_of_refreshed_statistics():
  grads, batches = _grads(), _batches(4, seed=2)
  decay = 0.75
  tx = tract_optax.tract(0.2, layers=[('stem',)], stats_decay=decay)
  state = tx.init(grads)
  average = None
  for x in batches:
    out, state = tx.update(grads, state, tract_stats={'stem': tract_optax.dense_stats(x)})
    m = _moment(x)
    average = m if average is None else decay * average + (1 - decay) * m
    expected = _solve(average, grads['stem']['kernel'], 0.2)
    assert reference.rel_err(out['stem']['kernel'], expected) < 1e-5


def test_woodbury_statistics_enter_the_cache_as_moments():
  grads = _grads()
  tx = tract_optax.tract(0.1, layers=['stem'], refresh_every=2)
  x = _batches(1)[0][:3]  # N = 3 < n = 5
  out, state = tx.update(grads, tx.init(grads), tract_stats={'stem': tract_optax.dense_stats(x)})
  expected = _solve(_moment(x), grads['stem']['kernel'], 0.1)
  assert reference.rel_err(out['stem']['kernel'], expected) < 1e-5
  assert state.stats_cache['stem'].moment.shape == (5, 5)


def test_static_skip_with_an_empty_mapping_and_inside_a_chain():
  grads, batches = _grads(), _batches(2)
  tx = optax.chain(tract_optax.tract(0.1, layers=['stem'], refresh_every=2), optax.sgd(1.0))
  state = tx.init(grads)
  _, state = tx.update(grads, state, tract_stats={'stem': tract_optax.dense_stats(batches[0])})
  assert not bool(tract_optax.stats_due(state))
  out, state = tx.update(grads, state, tract_stats={})
  expected = -_solve(_moment(batches[0]), grads['stem']['kernel'], 0.1)
  assert reference.rel_err(out['stem']['kernel'], expected) < 1e-5


@pytest.mark.parametrize('kwargs,match', [
    (dict(refresh_every=0, layers=['stem']), 'refresh_every must be an int >= 1; got 0'),
    (dict(refresh_every=2.5, layers=['stem']), 'refresh_every must be an int >= 1'),
    (dict(stats_decay=1.0, layers=['stem']), r'stats_decay must be a number in \[0, 1\); got 1.0'),
    (dict(refresh_every=4), r"tract needs the layers at construction: tract\(..., layers=\[\('stem',\)\]\)"),
])
def test_amortization_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tract_optax.tract(0.1, **kwargs)


def test_unknown_layer_fails_at_init():
  tx = tract_optax.tract(0.1, layers=['stemm'], refresh_every=2)
  with pytest.raises(KeyError, match=r"tract\(layers=...\) names the module path \('stemm',\) \('stemm'\), but params have no 'kernel' under it. Module paths with a kernel: \('stem',\)"):
    tx.init(_grads())


def test_stats_due_needs_one_tract_state():
  with pytest.raises(ValueError, match='exactly one TrAct state; found 0'):
    tract_optax.stats_due(optax.sgd(0.1).init({'w': jnp.zeros(2)}))
