"""Parity with the authors' PyTorch reference, PyPI ``torch_tract`` 1.0.0.

The reference wraps nn.Linear / nn.Conv2d and returns the TrAct weight gradient
from backward. Here the same layer, weights, inputs and output cotangent go
through torch (plain and TrAct) and through tract_optax (statistic of the
inputs + ``precondition`` of the plain kernel gradient in Flax layout).
Measured errors are printed (run with ``-s``) and asserted.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torch_tract = pytest.importorskip('torch_tract')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

import tract_optax
from tests import reference

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _torch_grads(layer, x, cotangent):
  """Plain and TrAct weight gradients of ``layer`` for sum(out * cotangent)."""
  plain_grad = None
  for module in (layer, torch_tract.TrAct(layer, l=LAM)):
    layer.weight.grad = None
    out = module(x)
    (out * cotangent).sum().backward()
    if plain_grad is None:
      plain_grad = layer.weight.grad.clone()
  return plain_grad, layer.weight.grad.clone()


LAM = 0.1


def _condition_number(rows, lam):
  """Condition number of A^T A / N + lam I (of A A^T / N + lam I when N < n)."""
  rows = np.asarray(rows, np.float64).reshape(-1, rows.shape[-1])
  top = np.linalg.svd(rows, compute_uv=False)[0] ** 2 / rows.shape[0]
  return (top + lam) / lam


def _check(name, got, want, dtype, kappa=1.0):
  """Asserts the relative error; float32 allows for ill-conditioned systems.

  A float32 kernel gradient carries a rounding error of ~6e-8 relative, and
  the solve amplifies it by up to the condition number kappa: with one patch
  row of 72 standardised features and lam = 0.1, kappa = 721 and no float32
  algorithm fed the rounded G can promise 1e-5 (the reference avoids rounding
  G by working from A and dL/dz). Such cases get a kappa-scaled bound.
  """
  err = reference.rel_err(got, want)
  tolerance = TOLERANCE[dtype]
  if dtype == torch.float32 and kappa > 300:
    tolerance = 3e-7 * kappa
  print(f'parity {name} {str(dtype)[6:]}: relative error {err:.2e} '
        f'(kappa {kappa:.0f}, bound {tolerance:.1e})')
  assert err < tolerance


@pytest.fixture(params=[torch.float64, torch.float32], ids=['float64', 'float32'])
def dtype(request):
  if request.param == torch.float64:
    previous = jax.config.jax_enable_x64
    jax.config.update('jax_enable_x64', True)
    yield request.param
    jax.config.update('jax_enable_x64', previous)
  else:
    yield request.param


@pytest.mark.parametrize('shape,out_features', [
    ((64, 10), 7),       # N > n
    ((8, 16, 12), 5),    # ViT-like batch x tokens x features
    ((5, 24), 6),        # N < n: Woodbury branch in both
    ((2, 3, 20), 4),     # N = 6 < n = 20 with 3-D inputs
])
def test_linear_parity(dtype, shape, out_features):
  torch.manual_seed(0)
  layer = torch.nn.Linear(shape[-1], out_features).to(dtype)
  x = torch.randn(*shape, dtype=dtype)
  cotangent = torch.randn(*shape[:-1], out_features, dtype=dtype)
  plain, tract_ref = _torch_grads(layer, x, cotangent)
  stats = tract_optax.dense_stats(jnp.asarray(x.numpy()))
  assert stats.is_woodbury == (np.prod(shape[:-1]) < shape[-1])
  got = tract_optax.precondition(jnp.asarray(plain.numpy().T), stats, LAM)  # (n, m)
  _check(f'linear {shape}', np.asarray(got).T, tract_ref.numpy(), dtype,
         _condition_number(x.numpy(), LAM))


@pytest.mark.parametrize('batch,channels,size,kernel,stride,padding', [
    (4, 3, 10, 3, 1, 1),
    (4, 3, 11, 3, 2, 1),
    (2, 1, 12, 5, 2, 2),
    (3, 2, 9, 3, 1, 0),
    (2, 3, 16, 4, 4, 0),   # ViT-style patchify
    (2, 4, 8, 1, 1, 0),
    (1, 8, 3, 3, 1, 0),    # N = 1 < n = 72: Woodbury
    (2, 6, 4, 3, 2, 1),    # N = 8 < n = 54: Woodbury
])
def test_conv2d_parity(dtype, batch, channels, size, kernel, stride, padding):
  torch.manual_seed(1)
  layer = torch.nn.Conv2d(channels, 6, kernel, stride=stride, padding=padding).to(dtype)
  x = torch.randn(batch, channels, size, size, dtype=dtype)
  out_shape = layer(x).shape
  cotangent = torch.randn(*out_shape, dtype=dtype)
  plain, tract_ref = _torch_grads(layer, x, cotangent)
  x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  stats = tract_optax.conv_stats(x_nhwc, (kernel, kernel), stride, padding)
  num_rows = batch * out_shape[2] * out_shape[3]
  assert stats.is_woodbury == (num_rows < channels * kernel * kernel)
  flax_grad = jnp.asarray(plain.numpy().transpose(2, 3, 1, 0))  # OIHW -> HWIO
  got = np.asarray(tract_optax.precondition(flax_grad, stats, LAM)).transpose(3, 2, 0, 1)
  rows = tract_optax.conv_patches(x_nhwc, (kernel, kernel), stride, padding)
  _check(f'conv2d b{batch} c{channels} s{size} k{kernel} st{stride} p{padding}',
         got, tract_ref.numpy(), dtype, _condition_number(rows, LAM))


def test_full_transformation_matches_reference_step():
  """One SGD step of a conv stem through optax.chain equals torch_tract's."""
  torch.manual_seed(2)
  layer = torch.nn.Conv2d(3, 5, 3, stride=1, padding=1)
  x = torch.randn(4, 3, 8, 8)
  cotangent = torch.randn(4, 5, 8, 8)
  plain, tract_ref = _torch_grads(layer, x, cotangent)
  import optax  # pylint: disable=g-import-not-at-top
  params = {'stem': {'kernel': jnp.asarray(layer.weight.detach().numpy().transpose(2, 3, 1, 0))}}
  grads = {'stem': {'kernel': jnp.asarray(plain.numpy().transpose(2, 3, 1, 0))}}
  tx = optax.chain(tract_optax.tract(LAM), optax.sgd(0.5))
  stats = {('stem',): tract_optax.conv_stats(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                                             (3, 3), 1, 1)}
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, tract_stats=stats)
  expected = -0.5 * tract_ref.numpy().transpose(2, 3, 1, 0)
  _check('optax.chain sgd step', updates['stem']['kernel'], expected, torch.float32)
