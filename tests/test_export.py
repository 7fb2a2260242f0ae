"""jax.export with a symbolic batch size: statistics, the gradient route, a train step.

One exported program must serve every batch size. Each test exports with
``jax.export.symbolic_shape('b')``, calls the result at two (or more) batch
sizes and holds it to the same computation without export and to an
independent float64 numpy computation (explicit patches, a dense solve).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tract_optax
from tests import reference
from tract_optax import linen as tract_linen
from tract_optax._src import conv
from tract_optax._src import stats as stats_lib

BATCH, = jax.export.symbolic_shape('b')


def _random(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _export(fn, *shapes):
  """``fn`` exported for the given (possibly symbolic) input shapes, float32."""
  specs = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
  return jax.export.export(jax.jit(fn))(*specs)


def _moment(stats):
  """The float64 moment of a statistic in either form."""
  if stats.moment is not None:
    return np.asarray(stats.moment, np.float64)
  rows = np.asarray(stats.rows, np.float64)
  return rows.swapaxes(-1, -2) @ rows / float(stats.count)


def _moment_of(rows):
  rows = np.asarray(rows, np.float64)
  return rows.swapaxes(-1, -2) @ rows / rows.shape[-2]


# --- 1. The form rule ------------------------------------------------------------


def test_form_rule_for_concrete_and_symbolic_row_counts():
  n_wide = stats_lib.SYMBOLIC_MOMENT_MAX_FEATURES + 1
  assert stats_lib.woodbury_form(3, 8) and not stats_lib.woodbury_form(8, 8)
  assert not stats_lib.woodbury_form(BATCH, 8)  # b < 8 is open: n is small
  assert stats_lib.woodbury_form(BATCH, n_wide)  # open, n is wide
  assert not stats_lib.woodbury_form(8 * BATCH, 8)  # settled: 8b >= 8
  assert stats_lib.woodbury_form(8 * BATCH, 8, 'rows')
  assert not stats_lib.woodbury_form(BATCH, n_wide, 'moment')
  assert stats_lib.settled(lambda: BATCH < 8) is None
  assert stats_lib.settled(lambda: 4 * BATCH >= 4) is True


@pytest.mark.parametrize('fn', [
    lambda: tract_optax.dense_stats(jnp.ones((4, 3)), form='woodbury'),
    lambda: tract_optax.conv_stats(jnp.ones((1, 4, 4, 1)), (3, 3), form='Moment'),
    lambda: tract_optax.stats_from_rows(jnp.ones((4, 3)), form=1),
])
def test_unknown_form_is_named(fn):
  with pytest.raises(ValueError, match=r"form=.* is not understood; use 'moment'"):
    fn()


def test_force_moment_contradicting_form_rows_is_refused():
  with pytest.raises(ValueError, match=r"force_moment=True contradicts form='rows'"):
    tract_optax.stats_from_rows(jnp.ones((2, 3)), force_moment=True, form='rows')


@pytest.mark.parametrize('form', ['moment', 'rows'])
def test_form_argument_chooses_the_form(form):
  for x in (_random((3, 6), 1), _random((9, 6), 2)):  # N < n and N > n
    stats = tract_optax.dense_stats(x, form=form)
    assert stats.is_woodbury == (form == 'rows')
    np.testing.assert_allclose(_moment(stats), _moment_of(x), rtol=1e-5, atol=1e-6)
  images = _random((1, 3, 3, 2), 3)  # N = 9 < n = 18
  stats = tract_optax.conv_stats(images, (3, 3), form=form)
  assert stats.is_woodbury == (form == 'rows')
  expected = _moment_of(reference.patch_rows(images, (3, 3), (1, 1), 'SAME', (1, 1))[0])
  np.testing.assert_allclose(_moment(stats), expected, rtol=1e-5, atol=1e-6)


def test_forced_moment_of_no_rows_is_zero_not_nan():
  stats = tract_optax.conv_stats(jnp.zeros((0, 4, 4, 2)), (3, 3), form='moment')
  np.testing.assert_array_equal(stats.moment, np.zeros((18, 18)))
  assert float(stats.count) == 0


# --- 2. dense_stats and conv_stats exported ---------------------------------------


@pytest.mark.parametrize('example_shape,is_woodbury', [
    ((16,), False),  # b < 16 open; n = 16 is small: the moment
    ((4, 16), False),  # tokens: 4b < 16 open
    ((8, 4), False),  # 8b < 4 settled false
    ((stats_lib.SYMBOLIC_MOMENT_MAX_FEATURES + 4,), True),  # wide: the rows
])
def test_dense_stats_exported_at_two_batch_sizes(example_shape, is_woodbury):
  exported = _export(tract_optax.dense_stats, (BATCH, *example_shape))
  for batch in (3, 20):
    x = _random((batch, *example_shape), seed=batch)
    got = exported.call(x)
    plain = tract_optax.dense_stats(x)
    assert got.is_woodbury == is_woodbury
    assert float(got.count) == float(plain.count) == x.size // example_shape[-1]
    rows = x.reshape(-1, example_shape[-1])
    if is_woodbury:
      np.testing.assert_array_equal(got.rows, rows)
    else:
      np.testing.assert_allclose(got.moment, _moment(plain), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(got.moment, _moment_of(rows), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kernel,strides,padding,groups,images_per_chunk', [
    ((3, 3), 1, 'SAME', 1, None),  # one chunk
    ((3, 3), 1, 'SAME', 1, 3),  # chunks of 3 images, counted at run time
    ((3, 3), 2, 'CIRCULAR', 2, 2),  # grouped, mode padding
    ((9, 9), 1, 'SAME', 1, 2),  # identity_conv route
    ((4, 4), 4, 'VALID', 1, 2),  # non_overlapping route
    ((3, 3), 1, 'SAME', 1, 0.3),  # budget under one image: bands
])
def test_conv_stats_exported_at_several_batch_sizes(kernel, strides, padding, groups,
                                                    images_per_chunk):
  example = (12, 12, 4)
  geometry = conv.conv_geometry(jax.ShapeDtypeStruct((1, *example), jnp.float32), kernel,
                                strides, padding, feature_group_count=groups)
  example_bytes = geometry.rows_per_example * geometry.num_features * groups * 4
  budget = None if images_per_chunk is None else int(images_per_chunk * example_bytes)

  def stats_of(v):
    return tract_optax.conv_stats(v, kernel, strides, padding, feature_group_count=groups,
                                  precision='highest', max_chunk_bytes=budget)

  exported = _export(stats_of, (BATCH, *example))
  for batch in (1, 2, 7):  # fewer than a chunk, about a chunk, several and a rest
    x = _random((batch, *example), seed=10 + batch)
    got = exported.call(x)
    plain = jax.jit(stats_of)(x)
    assert not got.is_woodbury  # n <= 4096: the moment, whatever b is
    assert float(got.count) == float(plain.count) == batch * geometry.rows_per_example
    np.testing.assert_allclose(got.moment, _moment(plain), rtol=1e-5, atol=1e-6)
    rows = reference.patch_rows(x, kernel, (strides,) * 2, padding, (1, 1), groups)
    expected = _moment_of(rows)
    np.testing.assert_allclose(got.moment, expected[0] if groups == 1 else expected,
                               rtol=1e-5, atol=1e-5)


def test_conv_stats_exported_chunks_at_run_time_within_the_budget():
  example = (12, 12, 4)
  budget = 3 * 144 * 36 * 4  # three images' patches
  def moment_of(v):
    return tract_optax.conv_stats(v, (3, 3), max_chunk_bytes=budget).moment

  exported = _export(moment_of, (BATCH, *example))
  text = exported.mlir_module()
  assert 'stablehlo.while' in text  # the whole chunks, however many there are
  assert 'tensor<3x' in text  # a chunk is three images


def test_conv_stats_exported_keeps_wide_rows():
  # n = 16 * 16 * 17 = 4352 > 4096, N = 4b: the rows, whatever b is
  def stats_of(v):
    return tract_optax.conv_stats(v, (16, 16), 16, 'VALID')

  exported = _export(stats_of, (BATCH, 32, 32, 17))
  for batch in (1, 2):
    x = _random((batch, 32, 32, 17), seed=30 + batch)
    got = exported.call(x)
    assert got.is_woodbury and got.rows.shape == (4 * batch, 4352)
    rows = reference.patch_rows(x, (16, 16), (16, 16), 'VALID', (1, 1))[0]
    np.testing.assert_allclose(got.rows, rows, rtol=0, atol=0)
    assert float(got.count) == 4 * batch


def test_combined_statistics_of_symbolic_calls():
  def both(first, second):
    return tract_optax.combine_stats(
        [tract_optax.dense_stats(first), tract_optax.dense_stats(second)])

  exported = _export(both, (BATCH, 6), (2 * BATCH, 6))
  for batch in (1, 4):
    first, second = _random((batch, 6), batch), _random((2 * batch, 6), 5 + batch)
    got = exported.call(first, second)
    expected = _moment_of(np.concatenate([first, second]))
    np.testing.assert_allclose(_moment(got), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_moment(got), _moment(both(first, second)), rtol=1e-5,
                               atol=1e-6)
    assert float(got.count) == 3 * batch


# --- 3. The gradient route and a train step, exported -----------------------------


class _SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name='stem')(x)
    x = nn.relu(x)
    x = nn.Conv(6, (3, 3), strides=2, name='body')(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(3, name='head')(x)


def _cnn_problem():
  model = _SmallCNN()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  return model, params


def _batch(batch, seed):
  return _random((batch, 8, 8, 3), seed), _random((batch, 3), seed + 100)


class _SmallMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8, name='stem')(x.reshape(x.shape[0], -1))
    return nn.Dense(3, name='head')(nn.relu(x))


def _stem_rows(model, x):
  """The stem's input rows, float64: explicit patches, or the flattened input."""
  if isinstance(model, _SmallCNN):
    return reference.patch_rows(x, (3, 3), (1, 1), 'SAME', (1, 1))[0]
  return np.asarray(x, np.float64).reshape(x.shape[0], -1)


@pytest.mark.slow
@pytest.mark.parametrize('model,tolerance', [(_SmallCNN(), 1e-5), (_SmallMLP(), 1e-3)],
                         ids=['cnn', 'mlp'])
def test_grad_through_apply_tract_exported_at_two_batch_sizes(model, tolerance):
  # MLP: n = 192 features; batch 2 has N < n, so the unexported statistic is
  # in Woodbury form while the exported one keeps the moment: the same
  # gradient up to float32 rounding of a system of condition number ~1e3
  # (measured: moment 2.4e-4, Woodbury 4.4e-4 off float64).
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']

  def loss(p, x, y, tract):
    apply = tract_linen.apply_tract if tract else lambda m, v, x: m.apply(v, x)
    return jnp.mean((apply(model, {'params': p}, x) - y) ** 2)

  grad = jax.grad(lambda p, x, y: loss(p, x, y, True))
  specs = (jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params),
           jax.ShapeDtypeStruct((BATCH, 8, 8, 3), jnp.float32),
           jax.ShapeDtypeStruct((BATCH, 3), jnp.float32))
  exported = jax.export.export(jax.jit(grad))(*specs)
  for batch in (2, 5):
    x, y = _batch(batch, seed=batch)
    got = exported.call(params, x, y)
    plain = jax.jit(grad)(params, x, y)
    assert reference.rel_err(got['stem']['kernel'], plain['stem']['kernel']) < 2 * tolerance
    got_rest = {k: v for k, v in got.items() if k != 'stem'}
    plain_rest = {k: v for k, v in plain.items() if k != 'stem'}
    for leaf_got, leaf_plain in zip(jax.tree_util.tree_leaves((got_rest, got['stem']['bias'])),
                                    jax.tree_util.tree_leaves((plain_rest,
                                                               plain['stem']['bias'])),
                                    strict=True):
      np.testing.assert_allclose(leaf_got, leaf_plain, rtol=1e-5, atol=1e-7)
    # independent: the stem's TrAct gradient from explicit rows, float64
    ordinary = jax.jit(jax.grad(loss), static_argnums=3)(params, x, y, False)
    expected = reference.tract_solve(_stem_rows(model, x), ordinary['stem']['kernel'], 0.1)
    assert reference.rel_err(got['stem']['kernel'], expected) < tolerance
    np.testing.assert_allclose(got['head']['kernel'], ordinary['head']['kernel'], rtol=1e-5,
                               atol=1e-7)


@pytest.mark.slow
def test_jitted_train_step_with_tract_in_the_chain_exported_at_two_batch_sizes():
  model, params = _cnn_problem()
  tx = optax.chain(tract_optax.tract(0.1), optax.sgd(0.05, momentum=0.9))
  opt_state = tx.init(params)

  def train_step(params, opt_state, x, y):
    def loss(p):
      out, stats = tract_linen.apply_with_stats(model, {'params': p}, x, layers=['stem'])
      return jnp.mean((out - y) ** 2), stats

    (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, tract_stats=stats)
    return optax.apply_updates(params, updates), opt_state, value

  def spec(tree):
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)

  exported = jax.export.export(jax.jit(train_step))(
      spec(params), spec(opt_state), jax.ShapeDtypeStruct((BATCH, 8, 8, 3), jnp.float32),
      jax.ShapeDtypeStruct((BATCH, 3), jnp.float32))
  state_got = state_plain = (params, opt_state)
  for batch in (3, 6):  # two steps, two batch sizes, momentum carried across
    x, y = _batch(batch, seed=40 + batch)
    *state_got, value_got = exported.call(*state_got, x, y)
    *state_plain, value_plain = jax.jit(train_step)(*state_plain, x, y)
    np.testing.assert_allclose(value_got, value_plain, rtol=1e-6)
    for leaf_got, leaf_plain in zip(jax.tree_util.tree_leaves(state_got),
                                    jax.tree_util.tree_leaves(state_plain), strict=True):
      np.testing.assert_allclose(leaf_got, leaf_plain, rtol=1e-5, atol=1e-7)
  # independent: the first step's stem update is -lr * (M + lam I)^{-1} G
  x, y = _batch(3, seed=43)
  ordinary = jax.jit(jax.grad(lambda p: jnp.mean((model.apply({'params': p}, x) - y) ** 2)))(
      params)
  rows = reference.patch_rows(x, (3, 3), (1, 1), 'SAME', (1, 1))[0]
  expected = -0.05 * reference.tract_solve(rows, ordinary['stem']['kernel'], 0.1)
  first, _, _ = exported.call(params, opt_state, x, y)
  step = np.asarray(first['stem']['kernel'], np.float64) - np.asarray(params['stem']['kernel'])
  assert reference.rel_err(step, expected) < 1e-4
