"""The tract transformation: chaining, paths, state, and every error."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tract_optax
from tests import reference


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(4, 6, 6, 2)).astype(np.float32)
  params = {
      'stem': {'kernel': rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
               'bias': np.zeros(4, np.float32)},
      'head': {'kernel': rng.normal(size=(4, 3)).astype(np.float32),
               'bias': np.zeros(3, np.float32)},
  }
  labels = rng.integers(0, 3, size=4)
  return jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(labels)


def _loss(params, x, labels):
  z = jax.lax.conv_general_dilated(x, params['stem']['kernel'], (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  h = jax.nn.relu(z + params['stem']['bias']).mean(axis=(1, 2))
  logits = h @ params['head']['kernel'] + params['head']['bias']
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _by_hand_tract(grads, x, lam):
  rows = reference.explicit_patches(np.asarray(x), (3, 3), (1, 1), [(1, 1), (1, 1)],
                                    (1, 1))
  g = np.asarray(grads['stem']['kernel'], np.float64)
  tract_grad = reference.tract_solve(rows, g.reshape(-1, 4), lam).reshape(g.shape)
  out = jax.tree.map(lambda v: np.asarray(v, np.float64), grads)
  out['stem']['kernel'] = tract_grad
  return out


def _step_fn(tx):
  @jax.jit
  def step(params, state, x, labels):
    grads = jax.grad(_loss)(params, x, labels)
    stats = {('stem',): tract_optax.conv_stats(x, (3, 3), padding='SAME')}
    updates, state = tx.update(grads, state, params, tract_stats=stats)
    return optax.apply_updates(params, updates), state, grads
  return step


def test_two_sgd_momentum_steps_equal_by_hand():
  params, x, labels = _problem()
  lr, momentum, lam = 0.05, 0.9, 0.1
  tx = optax.chain(tract_optax.tract(lam), optax.sgd(lr, momentum=momentum))
  step = _step_fn(tx)
  state = tx.init(params)
  p1, state, g1 = step(params, state, x, labels)
  x2 = x[::-1] * 1.5
  p2, state, g2 = step(p1, state, x2, labels)
  t1 = _by_hand_tract(g1, x, lam)
  t2 = _by_hand_tract(g2, x2, lam)
  trace = jax.tree.map(lambda a, b: momentum * a + b, t1, t2)
  expected = jax.tree.map(lambda p, a, b: np.asarray(p, np.float64) - lr * a - lr * b,
                          params, t1, trace)
  for got, want in zip(jax.tree.leaves(p2), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  assert int(state[0].count) == 2


def test_adam_step_equals_by_hand():
  params, x, labels = _problem(1)
  lr, lam, eps = 1e-2, 0.2, 1e-8
  tx = optax.chain(tract_optax.tract(lam), optax.adam(lr, eps=eps))
  p1, _, g1 = _step_fn(tx)(params, tx.init(params), x, labels)
  tract_grads = _by_hand_tract(g1, x, lam)
  expected = jax.tree.map(lambda p, g: p - lr * g / (np.abs(g) + eps), params, tract_grads)
  for got, want in zip(jax.tree.leaves(p1), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Adam's first step is sign-like, so also check the kernel moved differently
  # from a plain Adam step wherever the TrAct gradient's sign differs.
  plain = np.sign(np.asarray(g1['stem']['kernel']))
  assert np.any(plain != np.sign(tract_grads['stem']['kernel']))


def test_only_the_named_kernel_changes():
  params, x, labels = _problem(2)
  grads = jax.grad(_loss)(params, x, labels)
  tx = tract_optax.tract(0.1)
  stats = {'stem': tract_optax.conv_stats(x, (3, 3), padding='SAME')}
  updates, _ = tx.update(grads, tx.init(params), tract_stats=stats)
  np.testing.assert_array_equal(updates['stem']['bias'], grads['stem']['bias'])
  np.testing.assert_array_equal(updates['head']['kernel'], grads['head']['kernel'])
  assert not np.allclose(updates['stem']['kernel'], grads['stem']['kernel'])
  # an empty mapping without layers would be a silent plain step: refused
  with pytest.raises(ValueError, match=r'received an empty tract_stats \(\{\}\): the step would '
                     r'silently be a plain one.*layers=\[...\] and refresh_every=k.*'
                     r'See docs/limits.md#statistics-that-do-not-arrive'):
    tx.update(grads, tx.init(params), tract_stats={})


@pytest.mark.parametrize('tree_builder,key', [
    (lambda k: {'backbone': {'patch_embed': {'kernel': k}}}, ('backbone', 'patch_embed')),
    (lambda k: {'backbone': {'patch_embed': {'kernel': k}}}, 'backbone/patch_embed'),
    (lambda k: {'params': {'stem': {'kernel': k}}}, ('stem',)),
    (lambda k: {'layers': [{'kernel': k}]}, ('layers', 0)),
])
def test_module_paths(tree_builder, key):
  rng = np.random.default_rng(3)
  rows = rng.normal(size=(20, 5)).astype(np.float32)
  grad = rng.normal(size=(5, 2)).astype(np.float32)
  tx = tract_optax.tract(0.3)
  updates, _ = tx.update(tree_builder(jnp.asarray(grad)), tx.init(None),
                         tract_stats={key: tract_optax.dense_stats(rows)})
  (got,) = jax.tree.leaves(updates)
  assert reference.rel_err(got, reference.tract_solve(rows, grad, 0.3)) < 1e-5


def test_lambda_schedule_uses_the_step_count():
  rng = np.random.default_rng(4)
  rows = rng.normal(size=(20, 3)).astype(np.float32)
  grad = {'stem': {'kernel': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}}
  schedule = optax.linear_schedule(1.0, 0.1, transition_steps=3)
  tx = tract_optax.tract(schedule)
  state = tx.init(grad)
  update = jax.jit(lambda g, s: tx.update(g, s, tract_stats={('stem',): tract_optax.dense_stats(rows)}))
  for step in range(4):
    out, state = update(grad, state)
    expected = reference.tract_solve(rows, grad['stem']['kernel'], float(schedule(step)))
    assert reference.rel_err(out['stem']['kernel'], expected) < 1e-5
  assert int(state.count) == 4


@pytest.mark.parametrize('lam', [0, 0.0, -0.1, float('nan'), float('inf'), 'a', None,
                                 True, [0.1, 0.2]])
def test_bad_lambda_rejected_at_construction(lam):
  with pytest.raises(ValueError, match=r'lam must be a finite number > 0 \(the ridge strength lambda'):
    tract_optax.tract(lam)


@pytest.mark.parametrize('lam', [0.1, 1, np.float32(0.2), jnp.asarray(0.5)])
def test_good_lambda_accepted(lam):
  assert isinstance(tract_optax.tract(lam), optax.GradientTransformationExtraArgs)


def test_missing_tract_stats_says_how_to_pass_it():
  params, _, _ = _problem()
  tx = optax.chain(tract_optax.tract(), optax.sgd(0.1))
  with pytest.raises(TypeError, match=r'received no tract_stats.*tx.update\(grads, opt_state, params, tract_stats='):
    tx.update(params, tx.init(params), params)
  with pytest.raises(TypeError, match='tract_stats must be a mapping'):
    tx.update(params, tx.init(params), params, tract_stats=[1])
  with pytest.raises(TypeError, match=r"tract_stats\[\('stem',\)\] must be a tract_optax.TractStats"):
    tx.update(params, tx.init(params), params, tract_stats={('stem',): np.eye(3)})


def test_unknown_path_lists_the_kernels():
  params, x, _ = _problem()
  tx = tract_optax.tract()
  stats = {('stemm',): tract_optax.conv_stats(x, (3, 3), padding='SAME')}
  with pytest.raises(KeyError, match=r"module path \('stemm',\).*Module paths with a kernel: \('head',\), \('stem',\)"):
    tx.update(params, tx.init(params), tract_stats=stats)


def test_statistic_that_does_not_fit_the_kernel():
  params, x, _ = _problem()
  tx = tract_optax.tract()
  stats = {('stem',): tract_optax.conv_stats(x, (5, 5), padding='SAME')}
  with pytest.raises(ValueError, match=r'n = 50\) does not fit the kernel gradient of shape \(3, 3, 2, 4\)'):
    tx.update(params, tx.init(params), tract_stats=stats)


def test_two_layers_at_once_and_no_recompilation():
  rng = np.random.default_rng(5)
  grads = {'a': {'kernel': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)},
           'b': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 1, 2)), jnp.float32)}}
  tx = tract_optax.tract(0.1)
  traces = []

  @jax.jit
  def update(g, s, xa, xb):
    traces.append(1)
    stats = {('a',): tract_optax.dense_stats(xa), ('b',): tract_optax.conv_stats(xb, (3, 3), padding='VALID')}
    return tx.update(g, s, tract_stats=stats)

  state = tx.init(grads)
  for seed in range(3):
    xa = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    xb = jnp.asarray(rng.normal(size=(2, 5, 5, 1)), jnp.float32)
    out, state = update(grads, state, xa, xb)
  assert len(traces) == 1
  rows_b = reference.explicit_patches(np.asarray(xb), (3, 3), (1, 1), [(0, 0)] * 2, (1, 1))
  expected_b = reference.tract_solve(rows_b, np.asarray(grads['b']['kernel']).reshape(9, 2), 0.1)
  assert reference.rel_err(np.asarray(out['b']['kernel']).reshape(9, 2), expected_b) < 1e-5
  assert reference.rel_err(out['a']['kernel'],
                           reference.tract_solve(xa, grads['a']['kernel'], 0.1)) < 1e-5


def test_float64_end_to_end(x64):
  params, x, labels = _problem(6)
  params = jax.tree.map(lambda v: v.astype(jnp.float64), params)
  x = x.astype(jnp.float64)
  grads = jax.grad(_loss)(params, x, labels)
  tx = tract_optax.tract(0.1)
  out, _ = tx.update(grads, tx.init(params),
                     tract_stats={('stem',): tract_optax.conv_stats(x, (3, 3), padding='SAME')})
  assert out['stem']['kernel'].dtype == jnp.float64
  want = _by_hand_tract(grads, x, 0.1)['stem']['kernel']
  np.testing.assert_allclose(out['stem']['kernel'], want, rtol=1e-10, atol=1e-13)
