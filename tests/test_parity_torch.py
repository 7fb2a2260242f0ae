"""Parity with the authors' PyTorch reference, PyPI ``torch_tract`` 1.0.0.

The reference wraps nn.Linear / nn.Conv2d and returns the TrAct weight gradient
from backward. For the same layer, weights, inputs and output cotangent,
tract_optax (statistic of the inputs + ``precondition`` of the plain kernel
gradient in Flax layout) must return the reference's TrAct gradient.

Two sources of the reference's outputs, the same checks on both:

- golden (always runs, no torch needed): ``tests/golden/torch_tract_parity.npz``,
  written by ``python -m tests.golden.make_torch_golden``;
- live (only when torch and torch_tract are importable, e.g. after
  ``pip install -e ".[test,parity]"``): torch computes every case now, and its
  outputs must also still match the golden file.

Measured errors are printed (run with ``-s``) and asserted.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tract_optax
from tests import parity_cases
from tests import reference

try:
  import torch  # noqa: F401  pylint: disable=unused-import
  import torch_tract  # noqa: F401  pylint: disable=unused-import
  HAVE_TORCH = True
except ImportError:
  HAVE_TORCH = False
live = pytest.mark.skipif(not HAVE_TORCH, reason='torch and torch_tract are not installed '
                          '(pip install -e ".[test,parity]"); the golden checks still ran')

TOLERANCE = {'float64': 1e-10, 'float32': 1e-5}
LAM = parity_cases.LAM


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
  if dtype == 'float32' and kappa > 300:
    tolerance = 3e-7 * kappa
  print(f'parity {name} {dtype}: relative error {err:.2e} '
        f'(kappa {kappa:.0f}, bound {tolerance:.1e})')
  assert err < tolerance


@pytest.fixture(params=parity_cases.DTYPES)
def dtype(request):
  """The case dtype; float64 cases run with ``jax_enable_x64``."""
  if request.param == 'float64':
    previous = jax.config.jax_enable_x64
    jax.config.update('jax_enable_x64', True)
    yield request.param
    jax.config.update('jax_enable_x64', previous)
  else:
    yield request.param


@pytest.fixture(scope='module')
def golden():
  with np.load(parity_cases.GOLDEN_PATH) as stored:
    return {name: stored[name] for name in stored.files}


def _live_case(kind, *args):
  """The case computed by torch now (imports torch only when called)."""
  from tests.golden import make_torch_golden  # pylint: disable=import-outside-toplevel
  return getattr(make_torch_golden, f'{kind}_case')(*args)


# ------------------------------------------------------------ the checks


def check_linear(arrays, shape, dtype):
  """tract_optax on a Linear case's input and plain gradient vs the reference's TrAct."""
  x = arrays['x']
  stats = tract_optax.dense_stats(jnp.asarray(x), precision='highest')
  assert stats.is_woodbury == (np.prod(shape[:-1]) < shape[-1])
  got = tract_optax.precondition(jnp.asarray(arrays['plain'].T), stats, LAM)  # (n, m)
  _check(f'linear {shape}', np.asarray(got).T, arrays['tract'], dtype,
         _condition_number(x, LAM))


def check_conv(arrays, case, dtype):
  """The same for a Conv2d case (NCHW / OIHW in the arrays, Flax layout in tract_optax)."""
  batch, channels, _, kernel, stride, padding = case
  out_shape = arrays['out_shape']
  x_nhwc = jnp.asarray(arrays['x'].transpose(0, 2, 3, 1))
  stats = tract_optax.conv_stats(x_nhwc, (kernel, kernel), stride, padding,
                                 precision='highest')
  num_rows = batch * out_shape[2] * out_shape[3]
  assert stats.is_woodbury == (num_rows < channels * kernel * kernel)
  flax_grad = jnp.asarray(arrays['plain'].transpose(2, 3, 1, 0))  # OIHW -> HWIO
  got = np.asarray(tract_optax.precondition(flax_grad, stats, LAM)).transpose(3, 2, 0, 1)
  rows = tract_optax.conv_patches(x_nhwc, (kernel, kernel), stride, padding)
  _check(parity_cases.conv_id(*case), got, arrays['tract'], dtype,
         _condition_number(rows, LAM))


def check_step(arrays):
  """One SGD step of a conv stem through optax.chain equals the reference's."""
  to_hwio = lambda a: jnp.asarray(a.transpose(2, 3, 1, 0))  # noqa: E731
  params = {'stem': {'kernel': to_hwio(arrays['weight'])}}
  grads = {'stem': {'kernel': to_hwio(arrays['plain'])}}
  tx = optax.chain(tract_optax.tract(LAM), optax.sgd(parity_cases.STEP_LEARNING_RATE))
  stats = {('stem',): tract_optax.conv_stats(jnp.asarray(arrays['x'].transpose(0, 2, 3, 1)),
                                             (3, 3), 1, 1, precision='highest')}
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, tract_stats=stats)
  expected = -parity_cases.STEP_LEARNING_RATE * arrays['tract'].transpose(2, 3, 1, 0)
  _check('optax.chain sgd step', updates['stem']['kernel'], expected, 'float32')


def _matches_golden(live_arrays, stored):
  """torch's outputs now are the recorded ones (same inputs, same TrAct gradient).

  Float entries are compared to the array's own scale: torch orders its float32 sums by its
  thread count, and on a loaded 2-core machine its plain gradient moved by 1e-7 and its
  float32 TrAct gradient (an inverse, kappa up to ~100) by up to 1e-5 of the largest entry
  between runs. A changed reference (a dropped dilation, another solve) moves it by O(1).
  """
  assert set(live_arrays) == set(stored)
  for name, value in live_arrays.items():
    want = np.asarray(stored[name])
    floating = want.size and want.dtype.kind == 'f'
    scale = float(np.max(np.abs(want))) if floating else 0.0
    relative = 1e-4 if floating and want.dtype == np.float32 else 1e-9
    np.testing.assert_allclose(value, want, rtol=1e-6, atol=max(1e-12, relative * scale),
                               err_msg=name)


# ------------------------------------------------------------ golden


LINEAR = pytest.mark.parametrize('shape,out_features', parity_cases.LINEAR_CASES,
                                 ids=[parity_cases.linear_id(*c) for c in
                                      parity_cases.LINEAR_CASES])
CONV = pytest.mark.parametrize('case', parity_cases.CONV_CASES,
                               ids=[parity_cases.conv_id(*c) for c in parity_cases.CONV_CASES])


def test_golden_file_covers_every_case(golden):
  expected = {parity_cases.key(parity_cases.linear_id(*c), d, name)
              for c in parity_cases.LINEAR_CASES for d in parity_cases.DTYPES
              for name in ('x', 'plain', 'tract')}
  expected |= {parity_cases.key(parity_cases.conv_id(*c), d, name)
               for c in parity_cases.CONV_CASES for d in parity_cases.DTYPES
               for name in ('x', 'plain', 'tract', 'out_shape')}
  expected |= {parity_cases.key(parity_cases.STEP_CASE, 'float32', name)
               for name in ('x', 'weight', 'plain', 'tract')}
  assert set(golden) == expected | {'versions'}
  assert list(golden['versions']) == ['torch 2.13.0+cpu', 'torch_tract 1.0.0']
  for name, value in golden.items():
    if name.endswith(('__x', '__plain', '__tract', '__weight')):
      assert value.dtype == np.dtype(name.split('__')[1]), name


@LINEAR
def test_linear_parity_golden(golden, dtype, shape, out_features):
  arrays = parity_cases.case_arrays(golden, parity_cases.linear_id(shape, out_features), dtype)
  check_linear(arrays, shape, dtype)


@CONV
def test_conv2d_parity_golden(golden, dtype, case):
  check_conv(parity_cases.case_arrays(golden, parity_cases.conv_id(*case), dtype), case, dtype)


def test_full_transformation_matches_reference_step_golden(golden):
  check_step(parity_cases.case_arrays(golden, parity_cases.STEP_CASE, 'float32'))


# ------------------------------------------------------------ live


@live
@LINEAR
def test_linear_parity_live(golden, dtype, shape, out_features):
  arrays = _live_case('linear', shape, out_features, dtype)
  check_linear(arrays, shape, dtype)
  _matches_golden(arrays, parity_cases.case_arrays(
      golden, parity_cases.linear_id(shape, out_features), dtype))


@live
@CONV
def test_conv2d_parity_live(golden, dtype, case):
  arrays = _live_case('conv', *case, dtype)
  check_conv(arrays, case, dtype)
  _matches_golden(arrays, parity_cases.case_arrays(golden, parity_cases.conv_id(*case), dtype))


@live
def test_full_transformation_matches_reference_step_live(golden):
  arrays = _live_case('step')
  check_step(arrays)
  _matches_golden(arrays, parity_cases.case_arrays(golden, parity_cases.STEP_CASE, 'float32'))
