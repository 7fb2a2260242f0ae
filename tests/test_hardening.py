"""Misuse of the public API ends in a clear error or the right answer.

Each test pins one finding of the adversarial sweep (issue 9): empty calls,
amortised steps without their statistic, complex or integer inputs, two
spellings of a layer, masking, odd paths, and the
precision the statistics follow.
"""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tract_optax
from tests import reference
from tract_optax import linen as tract_linen
from tract_optax import nnx as tract_nnx
from tract_optax._src import stats as stats_lib


def _rows(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _grads(n=4, m=3, seed=1):
  return {'stem': {'kernel': jnp.asarray(_rows((n, m), seed)), 'bias': jnp.zeros(m)}}


# ----------------------------------------------------------------------------
# 1. an empty call contributes nothing


@pytest.mark.parametrize('rows', [6, 2], ids=['moment', 'woodbury'])
def test_empty_call_contributes_nothing(rows):
  x = _rows((rows, 4))
  combined = tract_optax.combine_stats([tract_optax.dense_stats(jnp.zeros((0, 4))),
                                        tract_optax.dense_stats(x)])
  alone = tract_optax.dense_stats(x)
  assert float(combined.count) == rows
  assert np.all(np.isfinite(stats_lib.to_moment(combined).moment))
  grad = jnp.asarray(_rows((4, 3), 5))
  np.testing.assert_allclose(tract_optax.precondition(grad, combined, 0.1),
                             tract_optax.precondition(grad, alone, 0.1), rtol=1e-5, atol=1e-6)


def test_statistic_of_zero_rows_alone_gives_g_over_lambda():
  for stats in (tract_optax.dense_stats(jnp.zeros((0, 4))),
                tract_optax.stats_from_rows(jnp.zeros((0, 4)), force_moment=True),
                tract_optax.combine_stats([tract_optax.dense_stats(jnp.zeros((0, 4)))] * 2)):
    got = tract_optax.precondition(jnp.ones((4, 2)), stats, 0.5)
    np.testing.assert_allclose(got, 2.0)


class TwoCrops(nn.Module):
  @nn.compact
  def __call__(self, crops, extra):
    stem = nn.Conv(4, (3, 3), name='stem')
    return stem(crops).mean() + stem(extra).mean()  # extra may be a 0-size batch


def test_stem_called_on_an_empty_batch_keeps_the_update_finite():
  crops, extra = jnp.asarray(_rows((3, 6, 6, 2))), jnp.zeros((0, 6, 6, 2))
  model = TwoCrops()
  variables = model.init(jax.random.key(0), crops, extra)
  tx = optax.chain(tract_optax.tract(0.1), optax.sgd(0.1))

  def loss(p):
    out, stats = tract_linen.apply_with_stats(model, {'params': p}, crops, extra)
    return out, stats

  grads, stats = jax.grad(loss, has_aux=True)(variables['params'])
  updates, _ = tx.update(grads, tx.init(variables['params']), tract_stats=stats)
  assert np.all(np.isfinite(updates['stem']['kernel']))
  alone = tract_optax.conv_stats(crops, (3, 3))
  np.testing.assert_allclose(stats[('stem',)].moment, alone.moment, rtol=1e-6)


# ----------------------------------------------------------------------------
# 3. amortised mode: a due step without its statistic


def _moment(x):
  x = np.asarray(x, np.float64)
  return x.T @ x / x.shape[0]


def test_due_step_without_statistic_is_no_refresh_and_blends_no_zeros():
  grads = _grads(5)
  batches = [jnp.asarray(_rows((24, 5), i) * (1 + i)) for i in range(6)]
  tx = tract_optax.tract(0.1, layers=['stem'], refresh_every=3, stats_decay=0.9)
  state = tx.init(grads)
  update = jax.jit(lambda s, stats: tx.update(grads, s, tract_stats=stats))
  # step 0 is due but has no statistic: nothing to precondition with -> NaN
  # (visible; apply_if_finite after tract skips it), no refresh counted
  out, state = update(state, {})
  assert np.all(np.isnan(out['stem']['kernel']))
  assert int(state.refreshes) == 0 and bool(tract_optax.stats_due(state))
  # step 1: still due; the first statistic is taken as is (never blended with zeros)
  out, state = update(state, {'stem': tract_optax.dense_stats(batches[1])})
  expected = np.linalg.solve(_moment(batches[1]) + 0.1 * np.eye(5), grads['stem']['kernel'])
  assert reference.rel_err(out['stem']['kernel'], expected) < 1e-5
  assert int(state.refreshes) == 1 and not bool(tract_optax.stats_due(state))
  # steps 2, 3: reuse; step 4 (3 after the refresh) is due again
  for step in (2, 3):
    out, state = update(state, {'stem': tract_optax.dense_stats(batches[step])})
    assert reference.rel_err(out['stem']['kernel'], expected) < 1e-5
  assert bool(tract_optax.stats_due(state))
  out, state = update(state, {'stem': tract_optax.dense_stats(batches[4])})
  average = 0.9 * _moment(batches[1]) + 0.1 * _moment(batches[4])
  expected = np.linalg.solve(average + 0.1 * np.eye(5), grads['stem']['kernel'])
  assert reference.rel_err(out['stem']['kernel'], expected) < 1e-5


def test_layers_without_amortisation_require_their_statistic_and_ignore_others():
  grads = {**_grads(), 'head': {'kernel': jnp.ones((3, 2))}}
  tx = tract_optax.tract(0.1, layers=['stem'])
  state = tx.init(grads)
  with pytest.raises(KeyError, match=r"no statistic for 'stem'.*every step.*refresh_every"):
    tx.update(grads, state, tract_stats={})
  x = _rows((10, 4))
  out, state = tx.update(grads, state, tract_stats={
      'stem': tract_optax.dense_stats(x), 'head': tract_optax.dense_stats(_rows((10, 3)))})
  np.testing.assert_array_equal(out['head']['kernel'], grads['head']['kernel'])
  assert state.stats_cache == {}  # nothing is kept between steps


def test_layers_with_a_depthwise_stem_in_the_per_batch_mode():
  x = jnp.asarray(_rows((2, 6, 6, 3)))
  grads = {'stem': {'kernel': jnp.ones((3, 3, 1, 6))}}
  tx = tract_optax.tract(0.1, layers=['stem'])
  stats = tract_optax.conv_stats(x, (3, 3), feature_group_count=3)
  out, _ = tx.update(grads, tx.init(grads), tract_stats={'stem': stats})
  np.testing.assert_allclose(out['stem']['kernel'],
                             tract_optax.precondition(grads['stem']['kernel'], stats, 0.1))


# ----------------------------------------------------------------------------
# 4, 7. inputs: complex, integer, shapes


def test_complex_inputs_are_refused():
  with pytest.raises(TypeError, match='defined for real inputs; got complex64'):
    tract_optax.dense_stats(jnp.ones((4, 3), jnp.complex64))
  with pytest.raises(TypeError, match='defined for real inputs'):
    tract_optax.stats_from_rows(jnp.ones((4, 3), jnp.complex64))


def test_int64_inputs_under_x64(x64):
  x = np.arange(24, dtype=np.int64).reshape(8, 3)
  stats = tract_optax.dense_stats(x)
  np.testing.assert_allclose(stats.moment, _moment(x), rtol=1e-6)


@pytest.mark.parametrize('make,match', [
    (lambda: tract_optax.stats_from_rows(jnp.ones(4)), r'rows of shape \(N, n\).*rows\[None\]'),
    (lambda: tract_optax.dense_stats(jnp.ones((4, 0))), r'n >= 1 features; got shape \(4, 0\)'),
    (lambda: tract_optax.precondition(jnp.ones((3, 2)), tract_optax.TractStats(None, None, 3.0),
                                      0.1), 'holds exactly one of moment'),
])
def test_malformed_inputs_get_sentences(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


# ----------------------------------------------------------------------------
# 6. silent user errors


def test_one_layer_under_two_spellings_is_refused():
  x = tract_optax.dense_stats(_rows((10, 4)))
  tx = tract_optax.tract(0.1)
  with pytest.raises(ValueError, match=r"names the layer 'stem' twice, as 'stem' and as \('stem',\)"):
    tx.update(_grads(), tx.init(None), tract_stats={'stem': x, ('stem',): x})


# Two tract transformations, and tract after the gradient route: see
# tests/test_guards.py (refused by the whole-state check; the latter documented).


def test_masked_group_without_the_stem_explains_the_masking():
  grads = {**_grads(), 'head': {'kernel': jnp.ones((3, 2))}}
  stats = {'stem': tract_optax.dense_stats(_rows((10, 4)))}
  tx = optax.multi_transform({'a': tract_optax.tract(0.1), 'b': optax.sgd(0.1)},
                             {'stem': {'kernel': 'b', 'bias': 'b'}, 'head': {'kernel': 'a'}})
  with pytest.raises(KeyError, match=r"masked-out leaves \(optax.masked / "
                     r"optax.multi_transform\): this tract.s group lacks the kernel. Put tract "
                     r"first, outside the masking"):
    tx.update(grads, tx.init(grads), tract_stats=stats)


def test_axis_name_outside_a_mapped_axis_is_a_sentence():
  tx = tract_optax.tract(0.1, axis_name='data')
  with pytest.raises(ValueError, match=r"tract\(axis_name='data'\): the axis 'data' is not "
                     r"bound here.*leave axis_name out"):
    tx.update(_grads(), tx.init(None), tract_stats={'stem': tract_optax.dense_stats(_rows((10, 4)))})
  with pytest.raises(ValueError, match='not both'):
    tract_optax.tract(0.1, axis_name='data', local_stats=True)


def test_vmap_with_axis_name_needs_axis_name_or_local_stats():
  stats = tract_optax.dense_stats(_rows((10, 4)))
  tx = tract_optax.tract(0.1)
  grads = jax.tree.map(lambda a: jnp.stack([a, a]), _grads())
  run = lambda tx: jax.vmap(lambda g: tx.update(g, tx.init(None), tract_stats={'stem': stats})[0],
                            axis_name='ensemble')(grads)
  with pytest.raises(ValueError, match=r"runs inside the named axis \['ensemble'\].*"
                     r"tract\(..., axis_name='ensemble'\).*local_stats=True"):
    run(tx)
  out = run(tract_optax.tract(0.1, local_stats=True))
  np.testing.assert_allclose(out['stem']['kernel'][0],
                             tract_optax.precondition(_grads()['stem']['kernel'], stats, 0.1),
                             rtol=1e-6)


class HasParamsSubmodule(nnx.Module):
  def __init__(self, rngs):
    self.params = nnx.Sequential(nnx.Linear(4, 3, rngs=rngs))
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.params(x)))


def test_nnx_submodule_named_params_is_found_by_tract():
  model = HasParamsSubmodule(nnx.Rngs(0))
  x = jnp.asarray(_rows((8, 4)))
  _, grads, stats = tract_nnx.value_and_grad_with_stats(lambda m, x: m(x).sum(), model, x)
  assert list(stats) == [('params', 'layers', 0)]
  tx = tract_optax.tract(0.1)
  out, _ = tx.update(grads, tx.init(grads), tract_stats=stats)
  kernel = grads['params']['layers'][0]['kernel']
  np.testing.assert_allclose(out['params']['layers'][0]['kernel'],
                             tract_optax.precondition(kernel.value, stats[('params', 'layers', 0)], 0.1),
                             rtol=1e-6)


def test_a_linen_variables_dict_and_a_params_collection_alike():
  x = tract_optax.dense_stats(_rows((10, 4)))
  tx = tract_optax.tract(0.1)
  out, _ = tx.update({'params': _grads()}, tx.init(None), tract_stats={'stem': x})
  np.testing.assert_allclose(out['params']['stem']['kernel'],
                             tract_optax.precondition(_grads()['stem']['kernel'], x, 0.1))
  both = {'stem': {'kernel': jnp.ones((4, 3))}, 'params': {'stem': {'kernel': jnp.ones((4, 3))}}}
  with pytest.raises(ValueError, match=r"module path \('stem',\) is ambiguous"):
    tx.update(both, tx.init(None), tract_stats={'stem': x})


# ----------------------------------------------------------------------------
# precision: statistics follow JAX's matmul precision unless told otherwise


def _dot_precisions(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  return [str(eqn.params['precision']) for eqn in jaxpr.eqns
          if eqn.primitive.name == 'dot_general']


def test_statistics_follow_the_default_matmul_precision():
  x = jnp.ones((16, 4))
  assert _dot_precisions(tract_optax.dense_stats, x) == ['None']
  highest = _dot_precisions(lambda x: tract_optax.dense_stats(x, precision='highest'), x)
  assert highest and all('HIGHEST' in p for p in highest)
  images = jnp.ones((2, 6, 6, 3))
  assert set(_dot_precisions(lambda x: tract_optax.conv_stats(x, (3, 3)), images)) <= {'None'}
  model = nn.Conv(4, (3, 3))
  variables = model.init(jax.random.key(0), images)
  captured = _dot_precisions(
      lambda v, x: tract_linen.apply_with_stats(model, v, x, precision='highest')[1], variables,
      images)
  assert any('HIGHEST' in p for p in captured)


def test_a_jax_without_axis_detection_warns_loudly(monkeypatch):
  """Where JAX gives no way to see bound axes, tract warns wherever it is traced
  and assumes none (see
  tests/test_jax_compat.py for the readers of the installed JAX)."""
  from tract_optax._src import axes
  monkeypatch.setattr(axes, 'bound_axis_names', lambda: None)
  stats = {'stem': tract_optax.dense_stats(_rows((10, 4)))}
  tx = tract_optax.tract(0.1)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    out, _ = tx.update(_grads(), tx.init(None), tract_stats=stats)
    tx.update(_grads(), tx.init(None), tract_stats=stats)
    jax.grad(lambda k: jnp.sum(tract_optax.tract_kernel(k, stats['stem'], lam=0.1)))(
      jnp.ones((4, 3)))
  hits = [w for w in caught if issubclass(w.category, axes.AxisDetectionWarning)]
  assert len(hits) == 3  # each call that cannot tell says so; nothing is kept to count
  assert re.search(r'no way to see whether TrAct runs inside pmap/shard_map.*'
                   r'axis_name=.*local_stats=True', str(hits[0].message))
  np.testing.assert_allclose(out['stem']['kernel'],
                             tract_optax.precondition(_grads()['stem']['kernel'], stats['stem'], 0.1))
  with warnings.catch_warnings():
    warnings.simplefilter('error', axes.AxisDetectionWarning)  # naming the choice: no warning
    explicit = tract_optax.tract(0.1, local_stats=True)
    out, _ = explicit.update(_grads(), explicit.init(None), tract_stats=stats)
  np.testing.assert_allclose(out['stem']['kernel'],
                             tract_optax.precondition(_grads()['stem']['kernel'], stats['stem'], 0.1))


def test_a_stack_of_statistics_is_not_read_as_feature_groups():
  x = jnp.asarray(_rows((2, 16, 3)))
  stacked = jax.vmap(tract_optax.dense_stats)(x)
  grads = {'stem': {'kernel': jnp.ones((3, 4))}}
  tx = tract_optax.tract(0.1)
  with pytest.raises(ValueError, match=r'count has shape \(2,\): this is a stack of '
                     r'statistics.*combine_stats'):
    tx.update(grads, tx.init(None), tract_stats={'stem': stacked})
  with pytest.raises(ValueError, match='a stack of statistics'):
    tract_optax.tract_kernel(jnp.ones((3, 4)), stacked)


def test_combining_rows_keeps_the_requested_precision():
  rows = [tract_optax.dense_stats(jnp.ones((6, 10))), tract_optax.dense_stats(jnp.ones((6, 10)))]
  assert all(s.is_woodbury for s in rows)
  for precision, expected in (('highest', 'HIGHEST'), (None, 'None')):
    jaxpr = jax.make_jaxpr(lambda a, b: tract_optax.combine_stats(
        [a, b], precision=precision))(*rows)
    dots = [str(e.params['precision']) for e in jaxpr.eqns if e.primitive.name == 'dot_general']
    assert dots and all(expected in d for d in dots), dots


def test_amortised_update_without_a_statistic_uses_the_kept_one():
  grads = _grads(5)
  x = jnp.asarray(_rows((24, 5)))
  tx = tract_optax.tract(0.1, layers=['stem'], refresh_every=2)
  _, state = tx.update(grads, tx.init(grads), tract_stats={'stem': tract_optax.dense_stats(x)})
  out, _ = tx.update(grads, state)  # tract_stats left out on a step that is not due
  np.testing.assert_allclose(out['stem']['kernel'], tract_optax.precondition(
      grads['stem']['kernel'], tract_optax.dense_stats(x), 0.1), rtol=1e-6)
  per_batch = tract_optax.tract(0.1)
  with pytest.raises(TypeError, match='received no tract_stats'):
    per_batch.update(grads, per_batch.init(grads))  # per-batch mode: required
  with pytest.raises(ValueError, match=r'keeps statistics for stem, but this tract keeps them '
                     r'for none \(amortised vs per-batch'):
    per_batch.update(grads, state)  # an amortised state is not a per-batch one
