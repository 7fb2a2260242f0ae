"""tract_optax.conv / tract_optax.dense against an explicit float64 patch matrix."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tract_optax

LAM = 0.1


def _normal(shape, seed):
  return np.random.default_rng(seed).normal(size=shape)


def _dilate_and_pad(x, pads, lhs_dilation):
  """``x`` (B, *S, C) with zeros between input positions, then (low, high) padding."""
  for axis, d in enumerate(lhs_dilation, start=1):
    if d > 1:
      shape = list(x.shape)
      shape[axis] = (x.shape[axis] - 1) * d + 1
      dilated = np.zeros(shape)
      index = [slice(None)] * x.ndim
      index[axis] = slice(None, None, d)
      dilated[tuple(index)] = x
      x = dilated
  for axis, (lo, hi) in enumerate(pads, start=1):
    width = [(0, 0)] * x.ndim
    width[axis] = (max(lo, 0), max(hi, 0))
    x = np.pad(x, width)
    index = [slice(None)] * x.ndim
    index[axis] = slice(max(-lo, 0), x.shape[axis] - max(-hi, 0))
    x = x[tuple(index)]
  return x


def _patch_matrix(x, window, strides, pads, lhs_dilation, rhs_dilation, groups):
  """(groups, N, n) rows, one per (example, output position), window-major."""
  x = _dilate_and_pad(np.asarray(x, np.float64), pads, lhs_dilation)
  spatial = x.shape[1:-1]
  extent = [(k - 1) * d + 1 for k, d in zip(window, rhs_dilation, strict=True)]
  out = [(s - e) // st + 1 for s, e, st in zip(spatial, extent, strides, strict=True)]
  rows = []
  for b in range(x.shape[0]):
    for position in itertools.product(*map(range, out)):
      entries = []
      for offset in itertools.product(*map(range, window)):
        at = tuple(
          p * s + o * d for p, s, o, d in zip(position, strides, offset, rhs_dilation, strict=True)
        )
        entries.append(x[(b,) + at])
      rows.append(np.stack(entries))  # (window, C)
  rows = np.stack(rows)  # (N, window, C)
  n_rows, size, channels = rows.shape
  rows = rows.reshape(n_rows, size, groups, channels // groups).transpose(2, 0, 1, 3)
  return rows.reshape(groups, n_rows, -1), out


def _tract_reference(rows, grad, lam, relative=False):
  """Per group: solve(A^T A / N + ridge I, G_g) in float64."""
  groups, n_rows, n = rows.shape
  blocks = np.split(grad, groups, axis=1)
  solved = []
  for a, g in zip(rows, blocks, strict=True):
    moment = a.T @ a / n_rows
    ridge = lam * np.trace(moment) / n if relative else lam
    solved.append(np.linalg.solve(moment + ridge * np.eye(n), g))
  return np.concatenate(solved, axis=1)


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# (x shape, kernel shape, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups)
CASES = {
  'nchw_valid_strided': ((2, 3, 7, 6), (4, 3, 3, 2), (2, 1), 'VALID', None, None, None, 1),
  'nchw_same_dilated': ((2, 2, 8, 8), (3, 2, 3, 3), (2, 2), 'SAME', None, (2, 1), None, 1),
  'explicit_negative': ((2, 2, 6, 7), (3, 2, 2, 3), (1, 2), ((1, 2), (0, -1)), None, None, None, 1),
  'nhwc_hwio_groups': (
    (2, 6, 6, 4),
    (3, 3, 2, 6),
    (1, 1),
    'SAME',
    None,
    None,
    ('NHWC', 'HWIO', 'NHWC'),
    2,
  ),
  'same_lower_1d': ((3, 2, 9), (4, 2, 4), (2,), 'SAME_LOWER', None, None, None, 1),
  'lhs_dilation_1d_nwc': (
    (2, 5, 3),
    (3, 3, 4),
    (1,),
    ((2, 1),),
    (2,),
    None,
    ('NWC', 'WIO', 'NWC'),
    1,
  ),
  'rows_form_identity': ((1, 8, 4, 4), (5, 8, 3, 3), (1, 1), 'VALID', None, None, None, 1),
  'rows_form_groups': ((1, 6, 3, 3), (4, 3, 2, 2), (1, 1), 'VALID', None, None, None, 2),
}


def _conv_case(name, relative=False):
  x_shape, k_shape, strides, padding, lhs_dil, rhs_dil, dnums, groups = CASES[name]
  x = _normal(x_shape, 0)
  kernel = 0.3 * _normal(k_shape, 1)
  args = (strides, padding, lhs_dil, rhs_dil, dnums, groups)
  out = jax.lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(kernel), *args)
  cotangent = _normal(out.shape, 2)

  def loss(k, xx):
    return jnp.sum(tract_optax.conv(xx, k, *args, lam=LAM, relative_lam=relative) * cotangent)

  # geometry for the reference, in rhs-spatial order, channels last
  d = jax.lax.conv_dimension_numbers(x.shape, k_shape, dnums)
  x_cl = np.transpose(x, (d.lhs_spec[0], *d.lhs_spec[2:], d.lhs_spec[1]))
  k_flax = np.transpose(kernel, (*d.rhs_spec[2:], d.rhs_spec[1], d.rhs_spec[0]))
  window = k_flax.shape[:-2]
  num_spatial = len(window)
  lhs = lhs_dil or (1,) * num_spatial
  rhs = rhs_dil or (1,) * num_spatial
  if isinstance(padding, str):
    effective = [(k - 1) * r + 1 for k, r in zip(window, rhs, strict=True)]
    pads = jax.lax.padtype_to_pads(x_cl.shape[1:-1], effective, strides, padding)
  else:
    pads = padding
  rows, _ = _patch_matrix(x_cl, window, strides, pads, lhs, rhs, groups)
  c_out = k_flax.shape[-1]
  d_rows = np.transpose(cotangent, (d.out_spec[0], *d.out_spec[2:], d.out_spec[1]))
  d_rows = d_rows.reshape(-1, c_out)
  grad = np.concatenate(
    [a.T @ dd for a, dd in zip(rows, np.split(d_rows, groups, axis=1), strict=True)], axis=1
  )  # plain G = A^T d, per group, (n, c_out)
  want_flax = _tract_reference(rows, grad, LAM, relative)
  want = np.transpose(
    want_flax.reshape(k_flax.shape), np.argsort((*d.rhs_spec[2:], d.rhs_spec[1], d.rhs_spec[0]))
  )
  # the patch matrix reproduces lax's output
  w_blocks = np.split(k_flax.reshape(-1, c_out), groups, axis=1)
  out_rows = np.concatenate([a @ w for a, w in zip(rows, w_blocks, strict=True)], axis=1)
  np.testing.assert_allclose(
    out_rows,
    np.asarray(jnp.transpose(out, (d.out_spec[0], *d.out_spec[2:], d.out_spec[1]))).reshape(
      -1, c_out
    ),
    atol=1e-4,
  )
  return x, kernel, args, loss, want


@pytest.mark.parametrize('name', sorted(CASES))
def test_conv_output_is_lax_and_gradient_is_tract_float32(name):
  x, kernel, args, loss, want = _conv_case(name)
  xs, ks = jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
  y = tract_optax.conv(xs, ks, *args)
  np.testing.assert_array_equal(y, jax.lax.conv_general_dilated(xs, ks, *args))
  grad = jax.jit(jax.grad(loss))(ks, xs)
  assert _rel(grad, want) < 2e-5


@pytest.mark.parametrize(
  'name', ['nchw_valid_strided', 'nhwc_hwio_groups', 'rows_form_groups', 'lhs_dilation_1d_nwc']
)
def test_conv_gradient_float64_matches_to_rounding(x64, name):
  del x64
  x, kernel, _, loss, want = _conv_case(name, relative=name == 'rows_form_groups')
  grad = jax.grad(loss)(jnp.asarray(kernel), jnp.asarray(x))
  assert grad.dtype == jnp.float64
  assert _rel(grad, want) < 1e-11


def test_conv_input_gradient_is_unchanged():
  x, kernel, args, _, _ = _conv_case('nchw_same_dilated')
  xs, ks = jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
  tract = jax.grad(lambda v: jnp.sum(tract_optax.conv(v, ks, *args) ** 2))(xs)
  plain = jax.grad(lambda v: jnp.sum(jax.lax.conv_general_dilated(v, ks, *args) ** 2))(xs)
  np.testing.assert_allclose(tract, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('shape', [(2, 5, 7), (4, 30)])  # moment form; rows form (N < n)
def test_dense_is_matmul_with_the_tract_gradient(x64, shape):
  del x64
  x = _normal(shape, 0)
  kernel = _normal((shape[-1], 3), 1)
  cotangent = _normal(shape[:-1] + (3,), 2)
  np.testing.assert_allclose(tract_optax.dense(jnp.asarray(x), jnp.asarray(kernel)), x @ kernel)
  grad = jax.grad(lambda k: jnp.sum(tract_optax.dense(jnp.asarray(x), k) * cotangent))(
    jnp.asarray(kernel)
  )
  rows = x.reshape(-1, shape[-1])
  want = _tract_reference(rows[None], rows.T @ cotangent.reshape(-1, 3), LAM)
  assert _rel(grad, want) < 1e-11


def test_dense_refuses_a_kernel_that_does_not_fit():
  with pytest.raises(ValueError, match=r'dense: x @ kernel needs'):
    tract_optax.dense(jnp.ones((4, 3)), jnp.ones((2, 3)))


def _images(batch, size=28, smooth=3, seed=0):
  """Correlated, standardised pixels: an ill-conditioned first-layer statistic."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(batch, size + 2 * smooth, size + 2 * smooth))
  box = np.ones(2 * smooth + 1) / (2 * smooth + 1)
  for axis in (1, 2):
    z = np.apply_along_axis(lambda v: np.convolve(v, box, 'valid'), axis, z)
  z = np.maximum(3 * z + 0.2, 0)
  return (z - z.mean()) / z.std()


def test_rows_form_float32_accuracy_matches_the_moment_form():
  """Woodbury with one refinement step, and the layer op's identity, vs float64.

  A 784-input Dense stem at batch 64 (N < n): before the refinement the rows
  form was 6x further from float64 than the moment form (1.9e-4 vs 3.1e-5).
  """
  x = _images(64).reshape(64, 784)
  cotangent = _normal((64, 16), 3) / 64
  want = _tract_reference(x[None], x.T @ cotangent, LAM)
  x32 = jnp.asarray(x, jnp.float32)
  grad = jnp.asarray(x.T @ cotangent, jnp.float32)
  errors = {
    form: _rel(tract_optax.precondition(grad, tract_optax.dense_stats(x32, form=form), LAM), want)
    for form in ('rows', 'moment')
  }
  kernel = jnp.zeros((784, 16), jnp.float32)
  layer_op = jax.grad(lambda k: jnp.sum(tract_optax.dense(x32, k) * cotangent))(kernel)
  errors['identity'] = _rel(layer_op, want)
  assert errors['rows'] < errors['moment'], errors
  assert errors['identity'] < errors['moment'], errors
  assert errors['identity'] < 2e-5, errors


def test_vit_patches_relative_lam_rows_form_accuracy():
  """14x14 patches of 28x28 images, relative lambda (n = 196, N = 128)."""
  images = _images(32)[:, None]  # NCHW, one channel
  kernel = jnp.zeros((8, 1, 14, 14), jnp.float32)
  args = ((14, 14), 'VALID')
  cotangent = _normal((32, 8, 2, 2), 4) / 32
  rows, _ = _patch_matrix(
    np.moveaxis(images, 1, -1), (14, 14), (14, 14), ((0, 0), (0, 0)), (1, 1), (1, 1), 1
  )
  d_rows = np.moveaxis(cotangent, 1, -1).reshape(-1, 8)
  want = _tract_reference(rows, rows[0].T @ d_rows, LAM, relative=True)
  x32 = jnp.asarray(images, jnp.float32)
  grad = jax.grad(
    lambda k: jnp.sum(tract_optax.conv(x32, k, *args, relative_lam=True) * cotangent)
  )(kernel)
  got = np.transpose(np.asarray(grad), (2, 3, 1, 0)).reshape(196, 8)
  assert _rel(got, want) < 2e-5


# ----------------------------------------------------------------------------
# Options shared with tract_kernel


def test_named_vmap_axis_gives_the_whole_batch_gradient():
  x = _normal((6, 10), 0)
  kernel = jnp.asarray(_normal((10, 2), 1), jnp.float32)

  def per_example(k, xi):
    return jnp.sum(tract_optax.dense(xi[None], k, axis_name='batch') ** 2)

  grads = jax.vmap(jax.grad(per_example), (None, 0), axis_name='batch')(kernel, jnp.asarray(x))
  plain = 2 * x.T @ (x @ np.asarray(kernel, np.float64))
  want = _tract_reference(x[None], plain, LAM)
  assert _rel(grads.sum(0), want) < 2e-5


def test_per_example_statistic_inside_vmap_is_refused():
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match='per_lane_stats=True'):
    jax.grad(lambda k: jax.vmap(lambda xi: tract_optax.dense(xi[None], k).sum())(x).sum())(
      jnp.ones((3, 2))
    )


def test_shared_kernel_with_per_lane_stats_is_refused():
  x = jnp.asarray(_normal((3, 8, 4), 0), jnp.float32)

  def loss(k):
    return jax.vmap(lambda xi: jnp.sum(tract_optax.dense(xi, k, per_lane_stats=True) ** 2))(x).sum()

  with pytest.raises(ValueError, match=r'per_lane_stats=True with a kernel shared by the lanes'):
    jax.grad(loss)(jnp.ones((4, 2)))


def test_kernel_wrapped_by_tract_kernel_then_a_layer_op_is_refused():
  x = jnp.ones((8, 3))
  k = jnp.ones((3, 2))
  with pytest.raises(ValueError, match='already TrAct-wrapped'):
    jax.grad(
      lambda k: tract_optax.dense(x, tract_optax.tract_kernel(k, tract_optax.dense_stats(x))).sum()
    )(k)


def test_forward_mode_is_refused_with_the_way_out():
  x = jnp.ones((8, 3))
  with pytest.raises(TypeError, match='forward-mode'):
    jax.jvp(lambda k: tract_optax.dense(x, k), (jnp.ones((3, 2)),), (jnp.ones((3, 2)),))


def test_wide_dense_few_rows_identity_is_accurate_and_its_check_reads_its_own_system():
  """n = 2500 inputs, 2 rows: G = A^T d rounded in float32 is amplified by the n x n
  system's condition (~1.3e4) on the rows and moment forms; the identity solves the
  well-conditioned 2 x 2 system, so it is accurate and raises no ConditioningWarning."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 2500))
  cotangent = rng.normal(size=(2, 16)) / 2
  want = _tract_reference(x[None], x.T @ cotangent, LAM)
  x32, d32 = jnp.asarray(x, jnp.float32), jnp.asarray(cotangent, jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter('error', tract_optax.ConditioningWarning)
    grad = jax.grad(lambda k: jnp.sum(tract_optax.dense(x32, k) * d32))(
      jnp.zeros((2500, 16), jnp.float32)
    )
  assert _rel(grad, want) < 1e-5
  with pytest.warns(tract_optax.ConditioningWarning, match='condition number'):
    rows_form = tract_optax.precondition(x32.T @ d32, tract_optax.dense_stats(x32), LAM)
  assert _rel(rows_form, want) > 1e-4  # what the identity avoids


def test_per_lane_kernels_on_their_own_data_are_exact():
  """vmap(grad) over stacked kernels and data, N < n per lane: the identity per lane."""
  x = _normal((3, 4, 12), 0)
  kernels = jnp.asarray(_normal((3, 12, 2), 1), jnp.float32)

  def loss(k, xi):
    return jnp.sum(tract_optax.dense(xi, k, per_lane_stats=True) ** 2)

  grads = jax.vmap(jax.grad(loss))(kernels, jnp.asarray(x, jnp.float32))
  for i in range(3):
    plain = 2 * x[i].T @ (x[i] @ np.asarray(kernels[i], np.float64))
    assert _rel(grads[i], _tract_reference(x[i][None], plain, LAM)) < 2e-5
