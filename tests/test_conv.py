"""conv_stats / conv_patches: routes, chunking, arguments and inputs.

Two independent references: the explicit numpy patches of tests/reference.py,
and the output of the convolution itself (``jax.lax.conv_general_dilated`` or
``flax.linen.Conv``), which the patch rows times the kernel must reproduce.
"""

import inspect
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tract_optax
from tract_optax._src import conv
from tests import reference

ROUTES = conv.ROUTES


def _random(shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _moment_of(rows):
  rows = np.asarray(rows, np.float64)
  return rows.swapaxes(-1, -2) @ rows / rows.shape[-2]


def _reference_rows(x, kernel, strides, padding, dilation, groups=1):
  """Explicit patches, with padding resolved here from its definition."""
  num_spatial = len(kernel)
  spatial = x.shape[1:-1]
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
  mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}.get(padding, 'constant')
  if padding == 'SAME':
    pads = [reference.same_pads(i, k, s, d)
            for i, k, s, d in zip(spatial, kernel, strides, dilation)]
  elif padding == 'VALID':
    pads = [(0, 0)] * num_spatial
  elif padding in ('CIRCULAR', 'REFLECT'):
    pads = [((w - 1) // 2, w // 2) for w in dilated]
  elif padding == 'CAUSAL':
    pads = [(dilated[0] - 1, 0)]
  elif isinstance(padding, int):
    pads = [(padding, padding)] * num_spatial
  else:
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  # Negative padding crops the input, as lax does; the rest is padded.
  crop = tuple([slice(None)] + [slice(max(-lo, 0), size - max(-hi, 0))
                                for size, (lo, hi) in zip(spatial, pads)] + [slice(None)])
  pads = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
  return reference.explicit_patches(np.asarray(x)[crop], kernel, strides, pads,
                                    dilation, groups=groups, pad_mode=mode)


def _applies(route, kernel, strides, dilation):
  if route != 'non_overlapping':
    return True
  return all(s >= k and (d == 1 or k == 1)
             for k, s, d in zip(kernel, strides, dilation))


def _route_cases(cases):
  """``(route, *case)`` for every route that applies to each case."""
  return [(route,) + tuple(case) for case in cases for route in ROUTES
          if _applies(route, case[0], case[1], case[3])]


def _conv_output(x, kernel, strides, padding, dilation, groups=1):
  """``lax.conv_general_dilated`` of ``x`` with ``kernel`` (``(*window, c/g, o)``)."""
  spatial = 'DHW'[3 - (kernel.ndim - 2):]
  return jax.lax.conv_general_dilated(
      x, kernel, strides, padding, rhs_dilation=dilation,
      feature_group_count=groups,
      dimension_numbers=('N' + spatial + 'C', spatial + 'IO', 'N' + spatial + 'C'),
      precision=jax.lax.Precision.HIGHEST)


def _assert_rows_reproduce_output(rows, kernel, output, groups=1):
  """``rows[g] @ kernel[..., g-th block]`` is the g-th block of output channels."""
  rows = np.asarray(rows, np.float64).reshape(groups, -1, rows.shape[-1])
  kernel = np.asarray(kernel, np.float64)
  per_group = kernel.shape[-1] // groups
  output = np.asarray(output, np.float64).reshape(-1, kernel.shape[-1])
  for g in range(groups):
    block = kernel[..., g * per_group:(g + 1) * per_group].reshape(-1, per_group)
    np.testing.assert_allclose(rows[g] @ block, output[:, g * per_group:(g + 1) * per_group],
                               rtol=1e-4, atol=1e-4)


# --- 1. The default padding is Flax's ------------------------------------------

def test_default_padding_is_same_as_flax_conv():
  assert nn.Conv.__dataclass_fields__['padding'].default == 'SAME'
  for fn in (tract_optax.conv_stats, tract_optax.conv_patches):
    assert inspect.signature(fn).parameters['padding'].default == 'SAME'
  x = _random((2, 9, 8, 3), seed=1)
  layer = nn.Conv(5, (3, 3))  # every setting left at Flax's default
  kernel = _random((3, 3, 3, 5), seed=2)
  output = jax.jit(layer.apply)(
      {'params': {'kernel': kernel, 'bias': np.zeros(5, np.float32)}}, x)
  rows = tract_optax.conv_patches(x, (3, 3))
  _assert_rows_reproduce_output(rows, kernel, output)
  expected = _reference_rows(x, (3, 3), (1, 1), 'SAME', (1, 1))
  stats = tract_optax.conv_stats(x, (3, 3))
  assert float(stats.count) == 2 * 9 * 8 == expected.shape[0]
  np.testing.assert_allclose(stats.moment, _moment_of(expected), rtol=1e-5, atol=1e-5)


# --- 2. Every route against the explicit patches ------------------------------

ROUTE_CASES = [
    # kernel, strides, padding, dilation, input shape, groups
    ((3, 3), (1, 1), 'SAME', (1, 1), (2, 7, 6, 3), 1),
    ((3, 3), (2, 2), 'SAME', (1, 1), (2, 8, 7, 2), 1),
    ((5, 3), (2, 1), ((1, 2), (0, 1)), (1, 1), (2, 9, 8, 2), 1),
    ((3, 3), (1, 2), 1, (2, 1), (2, 9, 8, 2), 1),
    ((3, 3), (1, 1), ((-1, 0), (1, -2)), (1, 1), (2, 7, 6, 4), 2),
    ((3, 4), (1, 1), 'CIRCULAR', (1, 1), (2, 6, 7, 2), 1),
    ((3, 4), (2, 1), 'REFLECT', (1, 2), (2, 7, 9, 2), 1),
    ((2, 2), (2, 2), 'VALID', (1, 1), (3, 8, 8, 3), 1),
    ((4, 4), (4, 4), 'SAME', (1, 1), (2, 10, 9, 2), 1),      # not divisible
    ((2, 3), (3, 3), 'VALID', (1, 1), (2, 8, 10, 4), 2),     # gaps, groups
    ((2, 2), (2, 2), 'CIRCULAR', (1, 1), (2, 5, 5, 3), 1),
    ((1, 1), (1, 1), 'VALID', (3, 1), (2, 4, 4, 5), 1),
    ((3,), (1,), 'SAME', (1,), (3, 11, 4), 2),
    ((4,), (3,), 'CAUSAL', (2,), (3, 13, 3), 1),
    ((4,), (4,), ((-1, 2),), (1,), (2, 13, 3), 1),
    ((2, 3, 2), (1, 2, 1), 'SAME', (1, 1, 1), (2, 4, 6, 5, 2), 1),
    ((2, 2, 2), (2, 2, 3), ((1, -1), (0, 1), (-1, 2)), (1, 1, 1), (2, 5, 6, 5, 2), 1),
]


def _assert_stats_equal_rows(stats, rows):
  assert float(stats.count) == rows.shape[-2]
  if stats.is_woodbury:
    np.testing.assert_allclose(stats.rows, rows, rtol=1e-6, atol=1e-6)
  else:
    np.testing.assert_allclose(stats.moment, _moment_of(rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('route,kernel,strides,padding,dilation,shape,groups',
                         _route_cases(ROUTE_CASES))
def test_every_route_matches_explicit_patches(route, kernel, strides, padding,
                                              dilation, shape, groups):
  x = _random(shape, seed=len(shape) + groups)
  expected = _reference_rows(x, kernel, strides, padding, dilation, groups)
  args = (kernel, strides, padding, dilation, groups)
  geometry = conv.conv_geometry(x, *args[:4], feature_group_count=groups)
  row_bytes = geometry.groups * geometry.num_features * 4
  budgets = (None,                                     # one chunk
             geometry.rows_per_example * row_bytes,     # one image per chunk
             2 * math.prod(geometry.out_spatial[1:]) * row_bytes)  # 2-row bands

  @jax.jit
  def patches_and_stats(v):
    return (conv._patches(v, *args, route=route),
            [conv._stats(v, *args, 'highest', b, route=route) for b in budgets])

  rows, all_stats = patches_and_stats(x)
  np.testing.assert_allclose(rows, expected, rtol=1e-6, atol=1e-6)
  for stats in all_stats:
    _assert_stats_equal_rows(stats, expected)


@pytest.mark.parametrize('kernel,strides,dilation,shape,route', [
    ((16, 16), 16, 1, (1, 224, 224, 3), 'non_overlapping'),   # ViT-B/16
    ((16, 16), 16, 1, (1, 30, 30, 3), 'non_overlapping'),     # not divisible
    ((2, 2), 3, 1, (1, 9, 9, 3), 'non_overlapping'),           # gaps
    ((1, 1), 1, 2, (1, 9, 9, 3), 'non_overlapping'),           # 1x1, any dilation
    ((4,), 4, 1, (1, 16, 3), 'non_overlapping'),
    ((3, 3), 1, 1, (1, 28, 28, 1), 'strided_slices'),
    ((7, 7), 2, 1, (1, 32, 32, 3), 'strided_slices'),          # ResNet stem
    ((2, 2), 2, 2, (1, 9, 9, 3), 'strided_slices'),            # dilated: overlap
    ((3, 3, 3), 1, 1, (1, 6, 6, 6, 2), 'strided_slices'),
    ((8, 8), 1, 1, (1, 16, 16, 1), 'identity_conv'),
    ((16, 16), 8, 1, (1, 32, 32, 3), 'identity_conv'),
    ((64, 64), 2, 1, (1, 64, 64, 1), 'identity_conv'),
    ((5, 5, 5), 1, 1, (1, 6, 6, 6, 1), 'identity_conv'),
])
def test_route_choice(monkeypatch, kernel, strides, dilation, shape, route):
  taken = []
  for name, build in conv._ROUTE_ROWS.items():
    monkeypatch.setitem(conv._ROUTE_ROWS, name,
                        lambda *a, _name=name, _build=build: taken.append(_name) or _build(*a))
  geometry = conv.conv_geometry(jax.ShapeDtypeStruct(shape, jnp.float32), kernel,
                                strides, dilation=dilation)
  assert conv.patch_route(geometry) == route
  jax.eval_shape(lambda v: tract_optax.conv_stats(v, kernel, strides,
                                                  dilation=dilation), jnp.zeros(shape))
  jax.eval_shape(lambda v: tract_optax.conv_patches(v, kernel, strides,
                                                    dilation=dilation), jnp.zeros(shape))
  assert set(taken) == {route}


def test_forcing_non_overlapping_on_overlapping_windows_fails():
  with pytest.raises(ValueError, match='non_overlapping route does not apply'):
    conv._patches(np.ones((1, 5, 5, 1)), (3, 3), 1, 'SAME', 1, 1, route='non_overlapping')


# --- 3. Rows times the kernel give the convolution (lax and Flax) -------------

@pytest.mark.parametrize('route,kernel,strides,padding,dilation,shape,groups', _route_cases([
    ((3, 3), (1, 1), ((-1, 0), (1, -2)), (1, 1), (2, 7, 6, 4), 2),
    ((3, 2), (2, 1), ((-2, 1), (0, -1)), (2, 1), (2, 9, 7, 3), 1),
    ((2, 2), (2, 2), ((-1, -1), (1, 0)), (1, 1), (2, 9, 7, 3), 1),
    ((4,), (4,), ((-3, 2),), (1,), (2, 15, 2), 2),
    ((3,), (1,), ((-1, -2),), (2,), (2, 15, 2), 1),
    ((2, 2, 3), (1, 2, 1), ((-1, 1), (0, -1), (1, 1)), (1, 1, 1), (1, 5, 6, 5, 2), 1),
]))
def test_negative_padding_matches_lax_conv(route, kernel, strides, padding,
                                           dilation, shape, groups):
  x = _random(shape, seed=11)
  weights = _random(kernel + (shape[-1] // groups, 2 * groups), seed=12)
  output = _conv_output(x, weights, strides, padding, dilation, groups)
  rows = jax.jit(lambda v: conv._patches(v, kernel, strides, padding, dilation,
                                         groups, route=route))(x)
  _assert_rows_reproduce_output(rows, weights, output, groups)
  np.testing.assert_allclose(
      rows, _reference_rows(x, kernel, strides, padding, dilation, groups),
      rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('settings', [
    dict(kernel_size=(3, 3), padding=((-1, 0), (1, -2))),
    dict(kernel_size=(3, 3), padding=-1, strides=2),
    dict(kernel_size=(2, 2), padding=((1, -2), -1), strides=(2, 2)),
    dict(kernel_size=(3, 3), strides=2, kernel_dilation=2, feature_group_count=2),
    dict(kernel_size=(4, 3), padding='CIRCULAR', kernel_dilation=(1, 2)),
    dict(kernel_size=(3, 3), padding='REFLECT', strides=(1, 2)),
    dict(kernel_size=(9, 9), padding='SAME'),                        # identity_conv
    dict(kernel_size=(4, 4), strides=4),                              # non_overlapping
    dict(kernel_size=(3,), padding='CAUSAL', kernel_dilation=2),
    dict(kernel_size=(5,), strides=5, padding='VALID'),
    dict(kernel_size=(2, 3, 2), strides=(1, 2, 1), padding=((0, 1), (-1, 1), 1)),
])
def test_rows_times_kernel_give_flax_conv_output(settings):
  shape = {1: (2, 13, 4), 2: (2, 13, 11, 4), 3: (2, 6, 7, 5, 4)}
  x = _random(shape[len(settings['kernel_size'])], seed=13)
  layer = nn.Conv(6, use_bias=False, precision='highest', **settings)
  groups = settings.get('feature_group_count', 1)
  kernel = _random(tuple(settings['kernel_size']) + (4 // groups, 6), seed=14)
  output = jax.jit(layer.apply)({'params': {'kernel': kernel}}, x)
  conv_args = dict(strides=settings.get('strides', 1),
                   padding=settings.get('padding', 'SAME'),
                   dilation=settings.get('kernel_dilation', 1),
                   feature_group_count=groups)
  rows, stats = jax.jit(lambda v: (
      tract_optax.conv_patches(v, settings['kernel_size'], **conv_args),
      tract_optax.conv_stats(v, settings['kernel_size'], **conv_args,
                             max_chunk_bytes=2000)))(x)
  _assert_rows_reproduce_output(rows, kernel, output, groups)
  _assert_stats_equal_rows(stats, np.asarray(rows))


# --- 4. Arguments --------------------------------------------------------------

X2D = np.ones((2, 8, 8, 4), np.float32)

BAD_ARGUMENTS = [
    (dict(strides=0), ValueError, r'strides=0: every entry must be at least 1'),
    (dict(strides=(1, -1)), ValueError, r'strides=\(1, -1\): every entry must be at least 1'),
    (dict(strides=1.5), TypeError, r'strides=1.5 must be an int or a sequence of 2 ints'),
    (dict(strides=(1, 1, 1)), ValueError,
     r'strides=\(1, 1, 1\) has 3 entries but the kernel has 2'),
    (dict(dilation=0), ValueError,
     r'dilation=0: every entry must be at least 1 \(1 = no dilation\)'),
    (dict(dilation=(2, True)), TypeError, r'dilation=\(2, True\) must be an int'),
    (dict(kernel_size=(3, 0)), ValueError,
     r'kernel_size=\(3, 0\): every window size must be at least 1'),
    (dict(kernel_size=2.5), TypeError, r'kernel_size=2.5 must be an int or a sequence'),
    (dict(kernel_size=()), ValueError, r'kernel_size=\(\): 1-D, 2-D or 3-D'),
    (dict(padding=True), TypeError, r'padding=True must be a padding name, an int'),
    (dict(padding=1.0), TypeError, r'padding=1.0 must be a padding name, an int'),
    (dict(padding='FULL'), ValueError, r"padding='FULL' is not understood"),
    (dict(padding=((1, 1, 0), (1, 1, 0))), ValueError,
     r'entry 0 has 3 numbers; each entry is an int or a \(low, high\) pair'),
    (dict(padding=((1, 1), (0, 0), (0, 0))), ValueError,
     r'has 3 entries but the kernel has 2 spatial dimensions'),
    (dict(padding=[(1, 1)]), ValueError, r'padding=\[\(1, 1\)\] has 1 entries'),
    (dict(padding=((1, 1), (1.0, 2))), TypeError,
     r'entry 1 \(\(1.0, 2\)\) must be an int or a \(low, high\) pair'),
    (dict(padding=((1, 1), (False, 2))), TypeError, r'entry 1 .* must be an int'),
    (dict(padding='CAUSAL'), ValueError, r"'CAUSAL' is defined for 1-D"),
    (dict(feature_group_count=0), ValueError, r'feature_group_count=0 must be at least 1'),
    (dict(feature_group_count=np.int64(3)), ValueError,
     r'feature_group_count=3 must divide the 4 input channels'),
    (dict(feature_group_count=True), TypeError, r'feature_group_count=True must be an int'),
    (dict(feature_group_count=2.0), TypeError, r'feature_group_count=2.0 must be an int'),
    (dict(padding='VALID', x=np.ones((2, 2, 2, 1))), ValueError,
     r'smaller than the dilated kernel'),
    (dict(padding=((-4, -4), 0)), ValueError, r'smaller than the dilated kernel'),
    (dict(x=np.ones((8, 8))), ValueError, r'rank 4; got shape \(8, 8\)'),
    (dict(x=np.ones((2, 8, 8, 1), np.complex64)), TypeError,
     r'TrAct statistics are defined for real inputs; got complex64'),
]


@pytest.mark.parametrize('fn', [tract_optax.conv_stats, tract_optax.conv_patches])
@pytest.mark.parametrize('kwargs,error,match', BAD_ARGUMENTS)
def test_bad_arguments_are_named(fn, kwargs, error, match):
  kwargs = dict(dict(x=X2D, kernel_size=(3, 3)), **kwargs)
  with pytest.raises(error, match=match):
    fn(**kwargs)


@pytest.mark.parametrize('budget,error,match', [
    (0, ValueError, r'max_chunk_bytes=0 must be at least 1'),
    ('64MB', TypeError, r"max_chunk_bytes='64MB' must be a number of bytes"),
])
def test_bad_chunk_budget(budget, error, match):
  with pytest.raises(error, match=match):
    tract_optax.conv_stats(X2D, (3, 3), max_chunk_bytes=budget)


@pytest.mark.parametrize('numpy_kwargs,python_kwargs', [
    (dict(kernel_size=np.int64(3), strides=np.int32(2), padding=np.int64(1),
          dilation=np.int64(1), feature_group_count=np.int64(2)),
     dict(kernel_size=3, strides=2, padding=1, dilation=1, feature_group_count=2)),
    (dict(kernel_size=(np.int64(3),), strides=(np.int16(1),),
          padding=((np.int64(2), np.int32(0)),), dilation=(np.int64(2),)),
     dict(kernel_size=(3,), strides=(1,), padding=((2, 0),), dilation=(2,))),
    (dict(kernel_size=np.array([3]), padding=np.array([[1, 2]])),
     dict(kernel_size=(3,), padding=((1, 2),))),
    (dict(kernel_size=(3,), padding='causal'), dict(kernel_size=(3,), padding='CAUSAL')),
    (dict(kernel_size=3, padding='same'), dict(kernel_size=3, padding='SAME')),
    (dict(kernel_size=3, padding='Circular'), dict(kernel_size=3, padding='CIRCULAR')),
    (dict(kernel_size=3, padding='reflect'), dict(kernel_size=3, padding='REFLECT')),
])
def test_numpy_integers_and_lower_case_names_are_accepted(numpy_kwargs, python_kwargs):
  x = _random((3, 12, 4), seed=14)
  got = tract_optax.conv_stats(x, **numpy_kwargs)
  expected = tract_optax.conv_stats(x, **python_kwargs)
  np.testing.assert_array_equal(got.moment, expected.moment)
  np.testing.assert_array_equal(tract_optax.conv_patches(x, **numpy_kwargs),
                                tract_optax.conv_patches(x, **python_kwargs))


def test_mixed_int_and_pair_padding_as_flax():
  x = _random((2, 8, 9, 2), seed=15)
  got = tract_optax.conv_patches(x, (3, 3), padding=(1, (0, 2)))
  expected = _reference_rows(x, (3, 3), (1, 1), ((1, 1), (0, 2)), (1, 1))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


# --- 5. Inputs -----------------------------------------------------------------

@pytest.mark.parametrize('dtype', [np.uint8, np.int32, np.bool_])
def test_integer_and_bool_inputs_are_cast_to_float32(dtype):
  x = (np.arange(2 * 6 * 6 * 3) % 7).reshape(2, 6, 6, 3).astype(dtype)
  stats = tract_optax.conv_stats(x, (3, 3))
  assert stats.moment.dtype == jnp.float32
  expected = _reference_rows(x.astype(np.float64), (3, 3), (1, 1), 'SAME', (1, 1))
  np.testing.assert_allclose(stats.moment, _moment_of(expected), rtol=1e-6)
  assert tract_optax.conv_patches(x, (3, 3)).dtype == jnp.float32


def test_int64_inputs_under_x64(x64):
  x = (np.arange(2 * 6 * 6 * 3, dtype=np.int64) % 11).reshape(2, 6, 6, 3)
  assert jnp.asarray(x).dtype == jnp.int64
  stats = jax.jit(lambda v: tract_optax.conv_stats(v, (3, 3), 2))(jnp.asarray(x[:, :5]))
  assert stats.rows.dtype == jnp.float32  # N = 2 x 3 x 3 < n = 27: Woodbury form
  np.testing.assert_allclose(
      stats.rows, _reference_rows(x[:, :5], (3, 3), (2, 2), 'SAME', (1, 1)))
  stats = jax.jit(lambda v: tract_optax.conv_stats(v, (3, 3)))(jnp.asarray(x))
  assert stats.moment.dtype == jnp.float32
  expected = _reference_rows(x, (3, 3), (1, 1), 'SAME', (1, 1))
  np.testing.assert_allclose(stats.moment, _moment_of(expected), rtol=1e-6)


def test_float64_inputs_under_x64_give_float64(x64):
  x = np.random.default_rng(16).normal(size=(2, 20, 20, 1))
  for kernel, stride in (((9, 9), 1), ((4, 4), 4), ((3, 3), 1)):  # every route
    stats = jax.jit(lambda v: tract_optax.conv_stats(v, kernel, stride,
                                                     max_chunk_bytes=4000))(x)
    assert stats.moment.dtype == jnp.float64
    expected = _reference_rows(x, kernel, (stride,) * 2, 'SAME', (1, 1))
    np.testing.assert_allclose(stats.moment, _moment_of(expected), rtol=1e-12)


@pytest.mark.parametrize('route', ROUTES)
def test_bfloat16_patches_stay_bfloat16_and_the_moment_is_float32(route):
  x = jnp.asarray(_random((2, 12, 12, 3), seed=20), jnp.bfloat16)
  strides = 3 if route == 'non_overlapping' else 1
  fn = jax.jit(lambda v: conv._stats(v, (3, 3), strides, 'SAME', 1, 1, 'highest',
                                     None, route=route).moment)
  assert fn(x).dtype == jnp.float32
  expected = _reference_rows(np.asarray(x.astype(jnp.float32)), (3, 3), (strides,) * 2,
                             'SAME', (1, 1))
  np.testing.assert_allclose(fn(x), _moment_of(expected), rtol=1e-5, atol=1e-5)
  rows = expected.shape[0]
  assert f'tensor<1x{rows}x27xf32>' not in fn.lower(x).as_text()
  assert f'tensor<1x{rows}x27xbf16>' in fn.lower(x).as_text()


@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('shape', [(0, 8, 8, 3), (2, 0, 8, 8, 3)])
def test_empty_batch_gives_zero_rows_and_no_nan(route, shape):
  kernel = (2, 2) if route == 'non_overlapping' else (3, 3)
  strides = 2 if route == 'non_overlapping' else 1
  stats = jax.jit(lambda v: conv._stats(v, kernel, strides, 'SAME', 1, 1, 'highest',
                                        1000, route=route))(jnp.zeros(shape))
  assert float(stats.count) == 0.0
  assert stats.is_woodbury and stats.rows.shape == (0, 12 if strides == 2 else 27)
  assert stats.rows.dtype == jnp.float32
  assert conv._patches(np.zeros(shape), kernel, strides, 'SAME', 1, 1,
                       route=route).shape == stats.rows.shape


def test_empty_batch_statistic_preconditions_to_the_scaled_gradient():
  stats = tract_optax.conv_stats(np.zeros((0, 8, 8, 3), np.float32), (3, 3))
  grad = jnp.asarray(_random((3, 3, 3, 4), seed=17))
  got = tract_optax.precondition(grad, stats, 0.1)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, grad / 0.1, rtol=1e-6)


# --- 6. Compile cost does not grow with the window -----------------------------

def _lowered_ops(kernel, stride, shape):
  fn = jax.jit(lambda v: tract_optax.conv_stats(v, kernel, stride, 'VALID',
                                                max_chunk_bytes=None))
  text = fn.lower(jax.ShapeDtypeStruct(shape, jnp.float32)).as_text()
  return sum(1 for line in text.splitlines() if ' = ' in line)


def test_program_size_is_flat_in_the_window():
  small = _lowered_ops((8, 8), 1, (16, 40, 40, 1))
  for window in (16, 32, 64):
    size = 40 + window
    assert _lowered_ops((window, window), 1, (16, size, size, 1)) <= small + 5
    assert _lowered_ops((window, window), window // 2, (16, 2 * size, size, 1)) <= small + 5
  patchify = _lowered_ops((16, 16), 16, (64, 224, 224, 3))
  assert patchify <= 15, patchify  # a reshape, a transpose, one dot
  stem = jax.jit(lambda v: tract_optax.conv_stats(v, (7, 7), 2)).lower(
      jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)).as_text()
  # slices of the image (rank 4 and 5), not of the small result: 7 + 7, not 7 x 7
  window_slices = [line for line in stem.splitlines() if 'stablehlo.slice' in line
                   and line.rsplit('-> tensor<', 1)[-1].count('x') >= 4]
  assert len(window_slices) == 7 + 7


# --- 7. The chunk budget holds within one example ------------------------------

@pytest.mark.parametrize('route,kernel,strides', [
    ('strided_slices', (7, 7), 1), ('identity_conv', (9, 9), 1),
    ('non_overlapping', (4, 4), 4)])
def test_one_example_larger_than_the_budget_is_split_into_bands(route, kernel, strides):
  x = jnp.asarray(_random((2, 64, 62, 3), seed=18))
  budget = 64 * 1024 if route != 'non_overlapping' else 4 * 1024
  geometry = conv.conv_geometry(x, kernel, strides)
  example_bytes = geometry.rows_per_example * geometry.num_features * 4
  assert example_bytes > 4 * budget  # one image is well over the budget

  def stats_with(max_chunk_bytes):
    return jax.jit(lambda v: conv._stats(v, kernel, strides, 'SAME', 1, 1, 'highest',
                                         max_chunk_bytes, route=route).moment)

  chunked = stats_with(budget)
  text = chunked.lower(x).as_text()
  assert 'while' in text
  full_rows = 2 * geometry.rows_per_example
  assert f'tensor<{full_rows}x{geometry.num_features}xf32>' not in text
  np.testing.assert_allclose(chunked(x), stats_with(None)(x), rtol=1e-5, atol=1e-6)
  expected = _reference_rows(np.asarray(x)[:1, :20], kernel, (strides,) * 2, 'SAME', (1, 1))
  band = jax.jit(lambda v: conv._stats(v, kernel, strides, 'SAME', 1, 1, 'highest',
                                      3000, route=route))(x[:1, :20])
  np.testing.assert_allclose(band.moment, _moment_of(expected), rtol=1e-5, atol=1e-5)


def test_compiled_temporary_memory_stays_near_the_budget():
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  budget = 256 * 1024
  input_bytes = 2 * 64 * 64 * 3 * 4

  def temp_bytes(kernel, strides, max_chunk_bytes):
    compiled = jax.jit(lambda v: tract_optax.conv_stats(
        v, kernel, strides, max_chunk_bytes=max_chunk_bytes).moment).lower(x).compile()
    analysis = compiled.memory_analysis()
    if analysis is None or not hasattr(analysis, 'temp_size_in_bytes'):
      pytest.skip('no memory analysis on this backend')
    return analysis.temp_size_in_bytes

  for kernel in ((7, 7), (9, 9)):  # strided slices, identity convolution
    example_patch_bytes = 64 * 64 * math.prod(kernel) * 3 * 4  # 2.4 / 4 MB
    assert temp_bytes(kernel, 1, None) > 2 * example_patch_bytes
    chunked = temp_bytes(kernel, 1, budget)
    assert chunked <= 3 * budget + 2 * input_bytes, (kernel, chunked)


# --- 8. jit, vmap, traced inputs ------------------------------------------------

@pytest.mark.parametrize('kernel,strides', [((3, 3), 1), ((9, 9), 1), ((4, 4), 4)])
def test_jit_and_vmap_agree_with_one_batch_at_a_time(kernel, strides):
  x = _random((3, 2, 16, 16, 2), seed=19)
  fn = lambda v: tract_optax.conv_stats(v, kernel, strides, max_chunk_bytes=3000)
  batched = jax.jit(jax.vmap(fn))(x)
  one = jax.jit(fn)
  for i in range(3):
    np.testing.assert_allclose(batched.moment[i], one(x[i]).moment, rtol=1e-5, atol=1e-6)
    expected = _reference_rows(x[i], kernel, (strides,) * 2, 'SAME', (1, 1))
    np.testing.assert_allclose(batched.moment[i], _moment_of(expected),
                               rtol=1e-5, atol=1e-5)
