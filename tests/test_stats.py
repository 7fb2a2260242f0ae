"""Statistics: dense_stats and conv_stats against explicit numpy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tract_optax
from tract_optax._src import stats as stats_lib
from tests import reference


def _moment_of(rows):
  rows = np.asarray(rows, np.float64)
  return rows.swapaxes(-1, -2) @ rows / rows.shape[-2]


def _random(shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


@pytest.mark.parametrize('shape', [(64, 5), (4, 16, 7), (2, 3, 4, 6)])
def test_dense_stats_matches_rows(shape):
  x = _random(shape)
  stats = tract_optax.dense_stats(x)
  rows = x.reshape(-1, shape[-1])
  assert float(stats.count) == rows.shape[0]
  assert stats.moment.dtype == jnp.float32
  np.testing.assert_allclose(stats.moment, _moment_of(rows), rtol=1e-5, atol=1e-6)


def test_dense_stats_woodbury_form_when_fewer_rows_than_features():
  x = _random((3, 10))
  stats = tract_optax.dense_stats(x)
  assert stats.is_woodbury and stats.moment is None
  np.testing.assert_array_equal(stats.rows, x)
  assert float(stats.count) == 3


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_give_float32_statistics(dtype):
  x = jnp.asarray(_random((32, 6)), dtype)
  stats = tract_optax.dense_stats(x)
  assert stats.moment.dtype == jnp.float32
  exact = _moment_of(np.asarray(x.astype(jnp.float32)))
  np.testing.assert_allclose(stats.moment, exact, rtol=1e-5, atol=1e-6)
  conv = tract_optax.conv_stats(jnp.asarray(_random((2, 6, 6, 2)), dtype), (3, 3))
  assert conv.moment.dtype == jnp.float32


def test_dense_stats_does_not_upcast_the_whole_input():
  x = jnp.ones((128, 16), jnp.bfloat16)
  text = jax.jit(tract_optax.dense_stats).lower(x).as_text()
  assert 'tensor<128x16xf32>' not in text  # accumulation in f32, input stays bf16


CONV_CASES = [
    # kernel, strides, padding, dilation, input shape
    ((3, 3), (1, 1), 'VALID', (1, 1), (2, 7, 6, 3)),
    ((3, 3), (1, 1), 'SAME', (1, 1), (2, 7, 6, 3)),
    ((3, 3), (2, 2), 'SAME', (1, 1), (2, 8, 7, 2)),
    ((5, 3), (2, 1), ((1, 2), (0, 1)), (1, 1), (2, 9, 8, 2)),
    ((3, 3), (1, 2), 1, (2, 1), (2, 9, 8, 2)),
    ((2, 2), (2, 2), 'VALID', (1, 1), (3, 8, 8, 3)),
    ((3, 3), (1, 1), 'SAME', (2, 2), (2, 9, 9, 2)),
    ((3,), (1,), 'SAME', (1,), (3, 11, 4)),
    ((4,), (3,), ((2, 1),), (2,), (3, 13, 3)),
    ((2, 3, 2), (1, 2, 1), 'SAME', (1, 1, 1), (2, 4, 6, 5, 2)),
    ((3, 2, 2), (2, 1, 1), 'VALID', (1, 1, 2), (1, 6, 5, 6, 3)),
]


def _explicit_pads(padding, in_spatial, kernel, strides, dilation):
  if padding == 'VALID':
    return [(0, 0)] * len(kernel)
  if padding == 'SAME':
    return [reference.same_pads(i, k, s, d)
            for i, k, s, d in zip(in_spatial, kernel, strides, dilation)]
  if isinstance(padding, int):
    return [(padding, padding)] * len(kernel)
  return list(padding)


@pytest.mark.parametrize('kernel,strides,padding,dilation,shape', CONV_CASES)
def test_conv_stats_matches_explicit_patches(kernel, strides, padding, dilation, shape):
  x = _random(shape, seed=len(shape))
  pads = _explicit_pads(padding, shape[1:-1], kernel, strides, dilation)
  rows = reference.explicit_patches(x, kernel, strides, pads, dilation)
  stats = tract_optax.conv_stats(x, kernel, strides, padding, dilation)
  assert float(stats.count) == rows.shape[0]
  if rows.shape[0] < rows.shape[1]:
    np.testing.assert_allclose(stats.rows, rows, rtol=1e-6, atol=1e-6)
  else:
    np.testing.assert_allclose(stats.moment, _moment_of(rows), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      tract_optax.conv_patches(x, kernel, strides, padding, dilation), rows,
      rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('mode,np_mode', [('CIRCULAR', 'wrap'), ('REFLECT', 'reflect')])
def test_conv_stats_circular_and_reflect_padding(mode, np_mode):
  x = _random((2, 6, 7, 2), seed=3)
  kernel, dilation = (3, 4), (1, 1)
  pads = [((k - 1) // 2, k // 2) for k in kernel]
  rows = reference.explicit_patches(x, kernel, (1, 1), pads, dilation, pad_mode=np_mode)
  stats = tract_optax.conv_stats(x, kernel, 1, mode, dilation)
  np.testing.assert_allclose(stats.moment, _moment_of(rows), rtol=1e-5, atol=1e-5)


def test_conv_stats_causal_padding_1d():
  x = _random((2, 10, 3), seed=4)
  rows = reference.explicit_patches(x, (3,), (1,), [(4, 0)], (2,))
  stats = tract_optax.conv_stats(x, (3,), 1, 'CAUSAL', 2)
  assert float(stats.count) == 20
  np.testing.assert_allclose(stats.moment, _moment_of(rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('groups', [2, 3])
def test_conv_stats_feature_groups(groups):
  x = _random((2, 6, 6, 6), seed=5)
  rows = reference.explicit_patches(x, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1),
                                    groups=groups)
  stats = tract_optax.conv_stats(x, (3, 3), 1, 'SAME', feature_group_count=groups)
  assert stats.groups == groups and stats.num_features == 9 * 6 // groups
  np.testing.assert_allclose(stats.moment, _moment_of(rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('max_chunk_bytes', [1, 3000, 7000, None])
def test_chunked_moment_equals_single_chunk(max_chunk_bytes):
  x = _random((7, 9, 9, 3), seed=6)  # 7 images: chunks leave a remainder
  rows = reference.explicit_patches(x, (3, 3), (2, 2), [(1, 1), (1, 1)], (1, 1))
  stats = tract_optax.conv_stats(x, (3, 3), 2, 'SAME', max_chunk_bytes=max_chunk_bytes)
  np.testing.assert_allclose(stats.moment, _moment_of(rows), rtol=1e-5, atol=1e-5)


def test_chunked_path_uses_a_scan_and_never_builds_all_patches():
  x = jnp.ones((64, 16, 16, 3))
  lowered = jax.jit(lambda v: tract_optax.conv_stats(
      v, (3, 3), padding='SAME', max_chunk_bytes=64 * 1024).moment).lower(x)
  text = lowered.as_text()
  full_patch_rows = 64 * 16 * 16
  assert f'tensor<{full_patch_rows}x27xf32>' not in text
  assert 'while' in text  # lax.scan over chunks of images


def test_conv_stats_woodbury_form_for_tiny_batches():
  x = _random((1, 3, 3, 8), seed=7)
  stats = tract_optax.conv_stats(x, (3, 3), padding='VALID')
  assert stats.is_woodbury and stats.rows.shape == (1, 72)
  np.testing.assert_allclose(stats.rows, x.reshape(1, 72), rtol=1e-6)


def test_conv_stats_leading_batch_axes_are_flattened_and_unbatched_allowed():
  x = _random((2, 3, 6, 6, 2), seed=8)
  stacked = tract_optax.conv_stats(x, (3, 3), padding='VALID')
  flat = tract_optax.conv_stats(x.reshape(6, 6, 6, 2), (3, 3), padding='VALID')
  np.testing.assert_allclose(stacked.moment, flat.moment, rtol=1e-6)
  single = tract_optax.conv_stats(x[0, 0], (3, 3), padding='VALID')
  assert float(single.count) == 16


def test_stats_work_under_jit_vmap():
  x = _random((4, 2, 6, 6, 2), seed=9)
  batched = jax.vmap(lambda v: tract_optax.conv_stats(v, (3, 3), padding='SAME'))(x)
  assert batched.moment.shape == (4, 18, 18)
  one = jax.jit(lambda v: tract_optax.conv_stats(v, (3, 3), padding='SAME'))(x[1])
  np.testing.assert_allclose(batched.moment[1], one.moment, rtol=1e-6)


def test_combine_stats_equals_stats_of_concatenated_rows():
  a, b = _random((10, 4), 1), _random((30, 4), 2)
  combined = tract_optax.combine_stats(
      [tract_optax.dense_stats(a), tract_optax.dense_stats(b)])
  np.testing.assert_allclose(combined.moment, _moment_of(np.concatenate([a, b])),
                             rtol=1e-5, atol=1e-6)
  assert float(combined.count) == 40
  small = tract_optax.combine_stats(
      [tract_optax.dense_stats(a[:2]), tract_optax.dense_stats(b[:1])])
  assert small.is_woodbury and small.rows.shape == (3, 4)
  mixed = tract_optax.combine_stats(
      [tract_optax.dense_stats(a[:2]), tract_optax.dense_stats(b)])
  np.testing.assert_allclose(mixed.moment, _moment_of(np.concatenate([a[:2], b])),
                             rtol=1e-5, atol=1e-6)


def test_float64_statistics_with_x64(x64):
  x = np.random.default_rng(0).normal(size=(2, 6, 6, 2))
  stats = tract_optax.conv_stats(jnp.asarray(x), (3, 3), padding='SAME')
  assert stats.moment.dtype == jnp.float64
  rows = reference.explicit_patches(x, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1))
  np.testing.assert_allclose(stats.moment, _moment_of(rows), rtol=1e-12)


@pytest.mark.parametrize('kwargs,match', [
    (dict(x=np.ones((8, 8)), kernel_size=(3, 3)), r'rank 4; got shape \(8, 8\)'),
    (dict(x=np.ones((2, 8, 8, 1)), kernel_size=(3, 3), strides=(1, 1, 1)),
     r'strides=\(1, 1, 1\) has 3 entries but the kernel has 2'),
    (dict(x=np.ones((2, 8, 8, 1)), kernel_size=(3, 3), padding='FULL'),
     r"padding='FULL' is not understood"),
    (dict(x=np.ones((2, 8, 8, 1)), kernel_size=(3, 3), padding=[(1, 1)]),
     r'padding=\[\(1, 1\)\] has 1 entries'),
    (dict(x=np.ones((2, 8, 8, 1)), kernel_size=(3, 3), padding='CAUSAL'),
     r"'CAUSAL' is defined for 1-D"),
    (dict(x=np.ones((2, 8, 8, 3)), kernel_size=(3, 3), feature_group_count=2),
     r'feature_group_count=2 must divide the 3 input channels'),
    (dict(x=np.ones((2, 2, 2, 1)), kernel_size=(3, 3), padding='VALID'),
     r'smaller than the dilated kernel'),
    (dict(x=np.ones((2, 8, 8, 8, 8, 1)), kernel_size=(1, 1, 1, 1)),
     r'1-D, 2-D or 3-D'),
])
def test_conv_stats_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tract_optax.conv_stats(**kwargs)


def test_bad_precision_and_scalar_errors():
  with pytest.raises(ValueError, match="precision='fast' is not understood"):
    tract_optax.dense_stats(np.ones((4, 2)), precision='fast')
  with pytest.raises(ValueError, match=r'inputs of shape \(\.\.\., n\) with n >= 1 features; got shape \(\)'):
    tract_optax.dense_stats(np.float32(1.0))
  with pytest.raises(ValueError, match='different layers'):
    tract_optax.combine_stats([tract_optax.dense_stats(np.ones((4, 2))),
                               tract_optax.dense_stats(np.ones((4, 3)))])


def test_default_precision_follows_jax():
  # None: JAX's own matmul precision (jax.default_matmul_precision), at which
  # the model's kernel gradient is computed too; 'highest' stays a choice.
  assert stats_lib.DEFAULT_PRECISION is None
