"""Statistics stacked by scan/vmap, merged into one (``capture.merge_lifted``).

A layer inside ``nn.scan`` / ``nnx.scan`` / ``nn.vmap`` sows one statistic per
iteration; its kernel's statistic is that of all their rows together. The
merge is one array operation: its program does not grow with the number of
iterations (it was a Python loop, and a first layer inside a 3000-step scan
took minutes to compile).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tract_optax
from tract_optax import linen as tract_linen
from tract_optax._src import capture
from tract_optax._src import stats as stats_lib


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _moment(rows):
  rows = np.float64(rows)
  return rows.T @ rows / len(rows)


@pytest.mark.parametrize(
  'iterations,rows_each,features,merged_form',
  [
    (4, 8, 3, 'moment'),  # moments stacked
    (6, 2, 5, 'moment'),  # rows stacked (2 < 5), 12 rows in all: a moment
    (2, 2, 6, 'rows'),  # rows stacked, 4 rows in all (< 6): still rows
  ],
)
def test_merge_equals_the_statistic_of_all_rows(iterations, rows_each, features, merged_form):
  x = _normal((iterations, rows_each, features))
  stacked = jax.vmap(tract_optax.dense_stats)(x)
  merged = capture.merge_lifted(stacked, 'highest')
  assert float(merged.count) == iterations * rows_each
  all_rows = np.asarray(x).reshape(-1, features)
  if merged_form == 'rows':
    assert merged.is_woodbury
    np.testing.assert_array_equal(merged.rows, all_rows)
  else:
    assert not merged.is_woodbury
    np.testing.assert_allclose(merged.moment, _moment(all_rows), rtol=1e-5, atol=1e-6)


def test_merge_of_two_leading_axes():
  """vmap inside scan: two lifted axes."""
  x = _normal((3, 2, 4, 3))
  stacked = jax.vmap(jax.vmap(tract_optax.dense_stats))(x)
  merged = capture.merge_lifted(stacked, 'highest')
  np.testing.assert_allclose(
    merged.moment, _moment(np.asarray(x).reshape(-1, 3)), rtol=1e-5, atol=1e-6
  )
  assert float(merged.count) == 24


@pytest.mark.parametrize('form', ['moment', 'rows'])
def test_grouped_merge_equals_combine_stats(form):
  """Grouped conv statistics, against the slow obvious path (one
  combine_stats of the iterations taken one by one)."""
  x = _normal((3, 1, 4, 4, 4))  # 3 iterations of one 4x4 image, 4 channels
  conv = jax.jit(
    lambda image: tract_optax.conv_stats(image, (3, 3), feature_group_count=2, form=form)
  )
  stacked = jax.vmap(conv)(x)
  merged = capture.merge_lifted(stacked, 'highest')
  pieces = [conv(image) for image in x]
  expected = stats_lib.combine_stats(pieces, precision='highest')
  assert merged.is_woodbury == expected.is_woodbury
  if expected.is_woodbury:
    np.testing.assert_array_equal(merged.rows, expected.rows)
  else:
    np.testing.assert_allclose(merged.moment, expected.moment, rtol=1e-5, atol=1e-6)
  assert stats_lib.to_moment(merged, 'highest').moment.shape == (2, 18, 18)


def test_iterations_without_rows_add_nothing():
  x = _normal((2, 5, 3))
  moments = jnp.stack(
    [tract_optax.dense_stats(x[0]).moment, jnp.zeros((3, 3)), tract_optax.dense_stats(x[1]).moment]
  )
  stacked = stats_lib.TractStats(moment=moments, rows=None, count=jnp.array([5.0, 0.0, 5.0]))
  merged = capture.merge_lifted(stacked, 'highest')
  np.testing.assert_allclose(
    merged.moment, _moment(np.asarray(x).reshape(-1, 3)), rtol=1e-5, atol=1e-6
  )
  assert float(merged.count) == 10
  empty = stats_lib.TractStats(moment=jnp.zeros((2, 3, 3)), rows=None, count=jnp.zeros(2))
  np.testing.assert_array_equal(capture.merge_lifted(empty, 'highest').moment, 0.0)


def test_a_malformed_stack_is_refused():
  bad = stats_lib.TractStats(moment=jnp.zeros((4, 3, 2)), rows=None, count=jnp.ones(4))
  with pytest.raises(
    ValueError,
    match=r'the statistic of a layer inside scan/vmap: '
    r'TractStats.moment must be \(n, n\)',
  ):
    capture.merge_lifted(bad, 'highest')


@pytest.mark.parametrize('rows_each,features', [(8, 3), (2, 5)])
def test_merge_program_does_not_grow_with_the_iterations(rows_each, features):
  def equations(iterations):
    stacked = jax.vmap(tract_optax.dense_stats)(jnp.ones((iterations, rows_each, features)))
    return len(jax.make_jaxpr(lambda s: capture.merge_lifted(s, 'highest'))(stacked).eqns)

  assert equations(3) == equations(300)


class Cell(nn.Module):
  @nn.compact
  def __call__(self, h, x):
    h = jnp.tanh(nn.Dense(4, name='inp')(x) + nn.Dense(4, name='rec')(h))
    return h, h


class RNN(nn.Module):
  @nn.compact
  def __call__(self, xs):
    scan = nn.scan(
      Cell,
      variable_broadcast='params',
      split_rngs={'params': False},
      variable_axes={tract_linen.COLLECTION: 0},
      in_axes=0,
      out_axes=0,
    )
    h, _ = scan(name='cell')(jnp.zeros((xs.shape[1], 4)), xs)
    return nn.Dense(2, name='head')(h)


@pytest.mark.slow
def test_linen_scan_capture_program_does_not_grow_with_the_sequence():
  """The whole capture of a first layer inside nn.scan: the same number of
  equations at T = 4 and T = 400 (the Python loop added ~5 per step), and the
  statistic of every step's rows at small T."""
  model = RNN()
  variables = model.init(jax.random.key(0), jnp.ones((2, 3, 6)))

  def capture_fn(v, xs):
    return tract_linen.apply_with_stats(model, v, xs, layers=['cell/inp'])

  sizes = {
    t: len(jax.make_jaxpr(capture_fn)(variables, jnp.ones((t, 3, 6))).eqns) for t in (4, 400)
  }
  assert sizes[4] == sizes[400], sizes
  xs = _normal((4, 3, 6))
  _, stats = jax.jit(capture_fn)(variables, xs)
  np.testing.assert_allclose(
    stats[('cell', 'inp')].moment, _moment(np.asarray(xs).reshape(-1, 6)), rtol=1e-5, atol=1e-6
  )
