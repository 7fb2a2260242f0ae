"""precondition: the TrAct gradient against independent solves and its math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tract_optax
from tests import reference

RNG = np.random.default_rng


def _setup(num_rows, n, m, seed=0):
  rng = RNG(seed)
  rows = rng.normal(size=(num_rows, n))
  grad = rng.normal(size=(n, m))
  return rows, grad


@pytest.mark.parametrize('num_rows,n,m', [(64, 5, 3), (200, 27, 16), (9, 9, 4)])
@pytest.mark.parametrize('lam', [0.05, 0.1, 1.6])
def test_matches_dense_numpy_solve(num_rows, n, m, lam):
  rows, grad = _setup(num_rows, n, m)
  stats = tract_optax.dense_stats(jnp.asarray(rows, jnp.float32))
  got = tract_optax.precondition(jnp.asarray(grad, jnp.float32), stats, lam)
  assert reference.rel_err(got, reference.tract_solve(rows, grad, lam)) < 1e-5


def test_is_the_ridge_least_squares_minimiser(x64):
  """TrAct = argmin_W ||A W - Z||^2 / N + lam ||W||^2 for G = A^T Z / N.

  This is TRACT.md's step (2): the weights that reproduce the proposed
  pre-activations best, with a ridge term. Solved here by lstsq on the stacked
  system [A / sqrt(N); sqrt(lam) I] W = [Z / sqrt(N); 0].
  """
  num_rows, n, m, lam = 50, 12, 4, 0.1
  rng = RNG(1)
  rows = rng.normal(size=(num_rows, n)) * rng.uniform(0.1, 3, size=n)
  target = rng.normal(size=(num_rows, m))
  grad = rows.T @ target / num_rows
  stacked_a = np.concatenate([rows / np.sqrt(num_rows), np.sqrt(lam) * np.eye(n)])
  stacked_b = np.concatenate([target / np.sqrt(num_rows), np.zeros((n, m))])
  expected = jnp.linalg.lstsq(jnp.asarray(stacked_a), jnp.asarray(stacked_b))[0]
  got = tract_optax.precondition(jnp.asarray(grad), tract_optax.dense_stats(rows), lam)
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('num_rows,n', [(3, 10), (1, 72), (7, 8)])
def test_woodbury_equals_direct(x64, num_rows, n):
  rows, grad = _setup(num_rows, n, 5, seed=2)
  woodbury = tract_optax.stats_from_rows(jnp.asarray(rows))
  direct = tract_optax.stats_from_rows(jnp.asarray(rows), force_moment=True)
  assert woodbury.is_woodbury and not direct.is_woodbury
  for lam in (0.01, 0.1, 2.0):
    a = tract_optax.precondition(jnp.asarray(grad), woodbury, lam)
    b = tract_optax.precondition(jnp.asarray(grad), direct, lam)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a, reference.tract_solve(rows, grad, lam),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('woodbury', [False, True])
def test_large_lambda_gives_scaled_gradient(woodbury):
  rows, grad = _setup(4 if woodbury else 40, 6, 3, seed=3)
  stats = tract_optax.dense_stats(jnp.asarray(rows, jnp.float32))
  assert stats.is_woodbury == woodbury
  lam = 1e6
  got = tract_optax.precondition(jnp.asarray(grad, jnp.float32), stats, lam)
  np.testing.assert_allclose(np.asarray(got) * lam, grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('woodbury', [False, True])
def test_zero_gradient_gives_zero_update(woodbury):
  rows, _ = _setup(4 if woodbury else 40, 6, 3, seed=4)
  stats = tract_optax.dense_stats(jnp.asarray(rows, jnp.float32))
  got = tract_optax.precondition(jnp.zeros((6, 3)), stats, 0.1)
  np.testing.assert_array_equal(got, np.zeros((6, 3)))


def test_small_lambda_whitens_the_inputs(x64):
  rows, _ = _setup(500, 4, 4, seed=5)
  moment = rows.T @ rows / 500
  got = tract_optax.precondition(jnp.asarray(moment), tract_optax.dense_stats(rows), 1e-9)
  np.testing.assert_allclose(got, np.eye(4), atol=1e-6)


@pytest.mark.parametrize('kernel,strides,padding', [
    ((3, 3), (1, 1), 'SAME'), ((5, 5), (2, 2), 'VALID'), ((1, 1), (1, 1), 'VALID')])
def test_conv_kernel_layout_against_explicit_patches(kernel, strides, padding):
  rng = RNG(6)
  x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  c_out = 4
  grad = rng.normal(size=kernel + (3, c_out)).astype(np.float32)
  pads = ([(0, 0)] * 2 if padding == 'VALID' else
          [reference.same_pads(8, k, s, 1) for k, s in zip(kernel, strides)])
  rows = reference.explicit_patches(x, kernel, strides, pads, (1, 1))
  stats = tract_optax.conv_stats(x, kernel, strides, padding)
  got = tract_optax.precondition(jnp.asarray(grad), stats, 0.1)
  assert got.shape == grad.shape
  expected = reference.tract_solve(rows, grad.reshape(-1, c_out), 0.1).reshape(grad.shape)
  assert reference.rel_err(got, expected) < 1e-5


@pytest.mark.parametrize('num_images', [2, 1])  # moment form and Woodbury form
def test_grouped_conv_is_block_diagonal(num_images):
  rng = RNG(7)
  groups, c_in, c_out = 2, 4, 6
  x = rng.normal(size=(num_images, 3, 3, c_in)).astype(np.float32)
  grad = rng.normal(size=(3, 3, c_in // groups, c_out)).astype(np.float32)
  stats = tract_optax.conv_stats(x, (3, 3), 1, 'SAME', feature_group_count=groups)
  got = np.asarray(tract_optax.precondition(jnp.asarray(grad), stats, 0.1))
  rows = reference.explicit_patches(x, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1),
                                    groups=groups)
  per_out = c_out // groups
  for g in range(groups):
    block = grad[..., g * per_out:(g + 1) * per_out].reshape(-1, per_out)
    expected = reference.tract_solve(rows[g], block, 0.1)
    assert reference.rel_err(got[..., g * per_out:(g + 1) * per_out].reshape(-1, per_out),
                             expected) < 1e-5


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_half_precision_gradient_solved_in_float32(dtype):
  rows, grad = _setup(64, 8, 3, seed=8)
  stats = tract_optax.dense_stats(jnp.asarray(rows, dtype))
  got = tract_optax.precondition(jnp.asarray(grad, dtype), stats, 0.1)
  assert got.dtype == dtype
  expected = reference.tract_solve(np.asarray(jnp.asarray(rows, dtype), np.float64),
                                   np.asarray(jnp.asarray(grad, dtype), np.float64), 0.1)
  assert reference.rel_err(got, expected) < 1e-2  # half-precision output rounding
  assert np.all(np.isfinite(np.asarray(got, np.float32)))


def test_traced_lambda_under_jit():
  rows, grad = _setup(32, 4, 2, seed=9)
  stats = tract_optax.dense_stats(jnp.asarray(rows, jnp.float32))
  fn = jax.jit(lambda g, s, lam: tract_optax.precondition(g, s, lam))
  for lam in (0.1, 0.5):
    got = fn(jnp.asarray(grad, jnp.float32), stats, jnp.float32(lam))
    assert reference.rel_err(got, reference.tract_solve(rows, grad, lam)) < 1e-5


def test_shape_mismatch_names_both_shapes():
  stats = tract_optax.conv_stats(np.ones((2, 6, 6, 3), np.float32), (3, 3))
  with pytest.raises(ValueError, match=r'shape \(27, 27\), n = 27.*shape \(5, 5, 3, 8\).*n = prod\(kernel.shape\[:-1\]\) = 75'):
    tract_optax.precondition(jnp.zeros((5, 5, 3, 8)), stats, 0.1)
  with pytest.raises(ValueError, match='at least 2-D'):
    tract_optax.precondition(jnp.zeros((27,)), stats, 0.1)
  grouped = tract_optax.conv_stats(np.ones((2, 6, 6, 4), np.float32), (3, 3),
                                   feature_group_count=2)
  with pytest.raises(ValueError, match='2 feature groups, which do not divide the 5'):
    tract_optax.precondition(jnp.zeros((3, 3, 2, 5)), grouped, 0.1)
  with pytest.raises(TypeError, match='must be a tract_optax.TractStats'):
    tract_optax.precondition(jnp.zeros((3, 2)), np.eye(3), 0.1)


@pytest.mark.parametrize('shape', [(6,), (6, 1), (6, 40)])
def test_cholesky_solve_against_numpy(shape):
  """The transposed right-side solves equal a float64 solve of L L^T x = b."""
  from tract_optax._src import precondition as precondition_lib

  rng = np.random.default_rng(0)
  a = rng.normal(size=(6, 6))
  system = a @ a.T + 0.5 * np.eye(6)
  rhs = rng.normal(size=shape)
  factor = np.linalg.cholesky(system)
  expected = np.linalg.solve(system, rhs)
  got = precondition_lib._cho_solve(jnp.asarray(factor, jnp.float32), jnp.asarray(rhs, jnp.float32))
  assert got.shape == rhs.shape
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  batched = jax.vmap(precondition_lib._cho_solve)(
    jnp.asarray(np.stack([factor, 2 * factor]), jnp.float32),
    jnp.asarray(np.stack([rhs, rhs]), jnp.float32),
  )
  np.testing.assert_allclose(batched[1], expected / 4, rtol=1e-4, atol=1e-5)
