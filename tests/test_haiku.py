"""tract_optax.haiku: the gradient route for Haiku models.

Every gradient is checked against an explicit float64 patch matrix
(``tests/reference.py``) with the padding written out by hand, and the
patch matrix is first checked to reproduce Haiku's own output; every other
leaf must equal the plain gradient.
"""

import functools
import subprocess
import sys
import textwrap

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tract_optax
from tests import reference
from tract_optax import haiku as tract_hk

LAM = 0.1
TOL = 5e-6  # float32 network vs the float64 solve (measured: below 4e-7)


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@functools.partial(jax.jit, static_argnums=0, static_argnames=('tract', 'layers'))
def _grads(apply_fn, params, *args, tract=True, **kwargs):
  """Gradient of a fixed quadratic loss of the output, and the output (jitted)."""
  return _eager_grads(apply_fn, params, *args, tract=tract, **kwargs)


def _eager_grads(apply_fn, params, *args, tract=True, **kwargs):
  def loss(p):
    out = (tract_hk.apply_tract if tract else lambda f, *a, **k: f(*a, **k))(
      apply_fn, p, *args, **kwargs
    )
    logits = out[0] if isinstance(out, tuple) else out
    weights = jnp.cos(jnp.arange(logits.size, dtype=logits.dtype)).reshape(logits.shape)
    return jnp.sum(weights * logits + 0.5 * logits**2), out

  return jax.grad(loss, has_aux=True)(params)


def _assert_rest_plain(grads, plain, stem):
  for module, leaves in plain.items():
    for name, value in leaves.items():
      if (module, name) != (stem, 'w'):
        np.testing.assert_allclose(grads[module][name], value, rtol=1e-6, atol=1e-7)


def _conv_reference(x_nhwc, w, plain_w, strides, pads, rate, groups):
  """TrAct gradient of an HWIO kernel from the float64 patch rows, per group."""
  kernel_size = w.shape[:-2]
  rows = reference.patch_rows(x_nhwc, kernel_size, strides, pads, rate, groups)
  m = w.shape[-1] // groups
  blocks = []
  for g in range(groups):
    block = np.asarray(plain_w, np.float64)[..., g * m : (g + 1) * m].reshape(-1, m)
    blocks.append(reference.tract_solve(rows[g], block, LAM).reshape(w.shape[:-1] + (m,)))
  return np.concatenate(blocks, axis=-1), rows


# (kwargs of hk.Conv2D, input NHWC shape, the padding written out by hand)
CONV_CASES = {
  'stride2_valid': (dict(kernel_shape=3, stride=2, padding='VALID'), (3, 9, 9, 2), [(0, 0)] * 2),
  'stride2_same': (dict(kernel_shape=4, stride=2, padding='SAME'), (3, 9, 9, 2), [(1, 2)] * 2),
  'nchw_same': (
    dict(kernel_shape=3, stride=1, padding='SAME', data_format='NCHW'),
    (2, 7, 7, 3),
    [(1, 1)] * 2,
  ),
  'rate2': (dict(kernel_shape=3, rate=2, padding='SAME'), (2, 9, 9, 2), [(2, 2)] * 2),
  'groups': (
    dict(kernel_shape=3, stride=2, padding='SAME', feature_group_count=2),
    (2, 8, 8, 4),
    [(0, 1)] * 2,
  ),
  'pairs': (dict(kernel_shape=(3, 2), padding=[(1, 0), (2, 1)]), (2, 6, 7, 2), [(1, 0), (2, 1)]),
  'padfn': (dict(kernel_shape=3, padding=hk.pad.full), (2, 5, 5, 2), [(2, 2)] * 2),
}


def _cnn(conv_kwargs):
  def net(x):
    h = hk.Conv2D(4, name='stem', **conv_kwargs)(x)
    return hk.Linear(3, name='head')(jax.nn.relu(h).reshape(h.shape[0], -1))

  return hk.transform(net)


@pytest.mark.parametrize('case', sorted(CONV_CASES))
def test_cnn_gradient_matches_float64_patches(case):
  conv_kwargs, shape, pads = CONV_CASES[case]
  channels_first = conv_kwargs.get('data_format') == 'NCHW'
  x_nhwc = _normal(shape)
  x = jnp.transpose(x_nhwc, (0, 3, 1, 2)) if channels_first else x_nhwc
  f = _cnn(conv_kwargs)
  params = f.init(jax.random.key(1), x)
  grads, out = _grads(f.apply, params, None, x)
  plain, plain_out = _grads(f.apply, params, None, x, tract=False)
  np.testing.assert_array_equal(out, plain_out)
  w = params['stem']['w']
  rate = (conv_kwargs.get('rate', 1),) * 2
  stride = (conv_kwargs.get('stride', 1),) * 2
  groups = conv_kwargs.get('feature_group_count', 1)
  want, rows = _conv_reference(x_nhwc, w, plain['stem']['w'], stride, pads, rate, groups)
  # the hand-written padding is Haiku's: the rows reproduce the stem's output
  m = w.shape[-1] // groups
  stem = hk.transform(lambda v: hk.Conv2D(4, name='stem', with_bias=False, **conv_kwargs)(v))
  y = np.asarray(stem.apply({'stem': {'w': w}}, None, x), np.float64)
  y = np.moveaxis(y, 1, -1) if channels_first else y
  blocks = [
    rows[g] @ np.asarray(w, np.float64)[..., g * m : (g + 1) * m].reshape(-1, m)
    for g in range(groups)
  ]
  np.testing.assert_allclose(np.concatenate(blocks, -1), y.reshape(-1, 4), atol=1e-4)
  assert reference.rel_err(grads['stem']['w'], want) < TOL
  assert reference.rel_err(plain['stem']['w'], want) > 1e-2  # TrAct changed it
  _assert_rest_plain(grads, plain, 'stem')


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_mlp_linear_stem_on_flattened_pixels(dtype, request):
  if dtype == 'float64':
    request.getfixturevalue('x64')
  f = hk.transform(lambda x: hk.nets.MLP([16, 10])(hk.Flatten()(x)))
  x = _normal((6, 28, 28, 1), seed=2).astype(dtype)
  params = f.init(jax.random.key(0), x)
  grads, _ = _grads(f.apply, params, None, x)
  plain, _ = _grads(f.apply, params, None, x, tract=False)
  rows = np.asarray(x, np.float64).reshape(6, 784)
  want = reference.tract_solve(rows, plain['mlp/~/linear_0']['w'], LAM)
  # N = 6 < n = 784: the solve's condition number is about 784 / 6 / lam
  assert reference.rel_err(grads['mlp/~/linear_0']['w'], want) < (
    2e-4 if dtype == 'float32' else 1e-10
  )
  _assert_rest_plain(grads, plain, 'mlp/~/linear_0')


def _bn_cnn():
  def net(x):
    h = hk.Conv2D(4, 3, stride=2, padding='VALID', name='stem')(x)
    h = hk.BatchNorm(True, True, 0.9, name='bn')(h, is_training=True)
    return hk.Linear(3, name='head')(jax.nn.relu(h).reshape(h.shape[0], -1))

  return hk.transform_with_state(net)


def test_transform_with_state_batchnorm_after_the_stem():
  f = _bn_cnn()
  x = _normal((4, 9, 9, 2), seed=3)
  params, state = f.init(jax.random.key(0), x)
  (grads, (out, new_state)) = _grads(f.apply, params, state, None, x)
  (plain, (plain_out, plain_state)) = _grads(f.apply, params, state, None, x, tract=False)
  np.testing.assert_allclose(out, plain_out, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_state, plain_state)
  want, _ = _conv_reference(x, params['stem']['w'], plain['stem']['w'], (2, 2), 'VALID', (1, 1), 1)
  assert reference.rel_err(grads['stem']['w'], want) < TOL
  _assert_rest_plain(grads, plain, 'stem')


def test_axis_name_under_vmap_over_batch_shards_equals_the_whole_batch():
  f = hk.transform(lambda x: hk.Linear(3, name='head')(jax.nn.relu(hk.Linear(8, name='stem')(x))))
  x = _normal((12, 5), seed=4)
  params = f.init(jax.random.key(0), x)

  def loss(p, xs, **kwargs):
    return jnp.sum(jnp.sin(tract_hk.apply_tract(f.apply, p, None, xs, **kwargs)))

  whole = jax.grad(loss)(params, x)
  shards = x.reshape(3, 4, 5)
  per_shard = jax.vmap(lambda xs: jax.grad(loss)(params, xs, axis_name='batch'), axis_name='batch')(
    shards
  )
  summed = jax.tree.map(lambda g: g.sum(0), per_shard)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), summed, whole)
  # without the axis, each shard's own statistic would be refused
  with pytest.raises(ValueError, match='axis'):
    jax.vmap(lambda xs: jax.grad(loss)(params, xs), axis_name='batch')(shards)


def test_optax_route_equivalence():
  conv_kwargs, shape, _ = CONV_CASES['groups']
  x = _normal(shape, seed=5)
  f = _cnn(conv_kwargs)
  params = f.init(jax.random.key(1), x)
  grads, _ = _grads(f.apply, params, None, x)
  plain, _ = _grads(f.apply, params, None, x, tract=False)
  stats = tract_optax.conv_stats(x, (3, 3), (2, 2), 'SAME', feature_group_count=2)
  # tract finds a 'kernel' leaf: hand it Haiku's 'w' under that name
  tx = tract_optax.tract(LAM)
  tree = {'stem': {'kernel': plain['stem']['w']}}
  updates, _ = tx.update(tree, tx.init(tree), tract_stats={('stem',): stats})
  np.testing.assert_allclose(updates['stem']['kernel'], grads['stem']['w'], rtol=1e-4, atol=1e-6)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)


def test_explicit_layers_and_the_first_layer_rule():
  def net(x, t):
    scale = hk.Linear(4, name='time_embed')(t)
    h = hk.Conv2D(4, 3, name='stem')(x)
    return hk.Linear(2, name='head')((h * scale[:, None, None, :]).mean(axis=(1, 2)))

  f = hk.transform(net)
  x, t = _normal((2, 6, 6, 1)), _normal((2, 3), seed=1)
  params = f.init(jax.random.key(0), x, t)
  with pytest.raises(ValueError, match=r'Several hk\.Conv/hk\.Linear layers') as error:
    tract_hk.apply_tract(f.apply, params, None, x, t)
  assert "'stem'" in str(error.value) and "'time_embed'" in str(error.value)
  grads, _ = _eager_grads(f.apply, params, None, x, t, layers='stem')  # not jitted
  plain, _ = _grads(f.apply, params, None, x, t, tract=False)
  want, _ = _conv_reference(x, params['stem']['w'], plain['stem']['w'], (1, 1), 'SAME', (1, 1), 1)
  assert reference.rel_err(grads['stem']['w'], want) < TOL
  _assert_rest_plain(grads, plain, 'stem')
  both, _ = _grads(f.apply, params, None, x, t, layers=('stem', 'time_embed'))
  assert reference.rel_err(both['stem']['w'], want) < TOL
  want_t = reference.tract_solve(t, plain['time_embed']['w'], LAM)
  assert reference.rel_err(both['time_embed']['w'], want_t) < TOL
  np.testing.assert_allclose(both['head']['w'], plain['head']['w'], rtol=1e-6)
  with pytest.raises(ValueError, match=r"never called.*'time_embed', 'stem', 'head'") as error:
    tract_hk.apply_tract(f.apply, params, None, x, t, layers='stme')
  assert len(str(error.value)) < 300 and 'docs/routes.md#haiku' in str(error.value)


def test_first_layer_read_off_the_differentiated_pass():
  """Under jax.grad in every parameter the first trace runs the model once
  (no probe); without a gradient the probe runs too; refusals are the probe's."""
  from tract_optax._src import first_layer

  runs = []

  def net(x):
    runs.append('call')
    return hk.Linear(2, name='head')(jax.nn.relu(hk.Conv2D(4, 3, name='stem')(x)).mean((1, 2)))

  f = hk.transform(net)
  x = _normal((2, 6, 6, 1))
  params = f.init(jax.random.key(0), x)

  def loss(p):
    return jnp.sum(tract_hk.apply_tract(f.apply, p, None, x) ** 2)

  for fn, expected in [(jax.grad(loss), 1), (loss, 2)]:
    first_layer.clear_cache()
    runs.clear()
    jax.make_jaxpr(fn)(params)
    assert len(runs) == expected
  first_layer.clear_cache()
  plain, _ = _grads(f.apply, params, None, x, tract=False)
  want, _ = _conv_reference(x, params['stem']['w'], plain['stem']['w'], (1, 1), 'SAME', (1, 1), 1)
  chosen, _ = _eager_grads(f.apply, params, None, x)  # the choice read off this pass
  assert reference.rel_err(chosen['stem']['w'], want) < TOL

  def conditioned(x, t):
    scale = hk.Linear(4, name='time_embed')(t)
    return hk.Linear(2, name='head')((hk.Conv2D(4, 3, name='stem')(x) * scale).mean((1, 2)))

  g = hk.transform(conditioned)
  t = _normal((2, 1, 1, 3), seed=1)
  params = g.init(jax.random.key(0), x, t)
  messages = []
  for grad in (False, True):
    first_layer.clear_cache()
    call = lambda p: jnp.sum(tract_hk.apply_tract(g.apply, p, None, x, t))  # noqa: E731
    with pytest.raises(ValueError, match=r'Several hk\.Conv/hk\.Linear layers') as error:
      (jax.grad(call) if grad else call)(params)
    messages.append(str(error.value))
  assert messages[0] == messages[1]


def test_refusals():
  no_layer = hk.transform(lambda x: x * hk.get_parameter('s', [], init=jnp.ones))
  x = _normal((2, 3))
  with pytest.raises(ValueError, match=r'No hk\.Conv/hk\.Linear layer was called'):
    tract_hk.apply_tract(no_layer.apply, no_layer.init(None, x), None, x)

  class Scaled(hk.Linear):
    def __call__(self, inputs, *, precision=None):
      return 2.0 * super().__call__(inputs, precision=precision)

  sub = hk.transform(lambda x: Scaled(2, name='stem')(x))
  with pytest.raises(TypeError, match='overrides __call__') as error:
    tract_hk.apply_tract(sub.apply, sub.init(jax.random.key(0), x), None, x)
  assert len(str(error.value)) < 300 and 'docs/routes.md#haiku' in str(error.value)

  masked = hk.transform(lambda x: hk.Conv1D(2, 2, mask=jnp.ones((2, 1, 2)), name='stem')(x))
  x1 = _normal((2, 5, 1))
  with pytest.raises(ValueError, match='has a mask'):
    tract_hk.apply_tract(masked.apply, masked.init(jax.random.key(0), x1), None, x1)

  twice = hk.transform(lambda x: (lambda layer: layer(layer(x)))(hk.Linear(3, name='stem')))
  with pytest.raises(ValueError, match='called more than once'):
    tract_hk.apply_tract(twice.apply, twice.init(jax.random.key(0), x), None, x, layers='stem')

  with pytest.raises(TypeError, match='apply_fn is jitted'):
    tract_hk.apply_tract(jax.jit(sub.apply), {}, None, x)

  other = hk.transform(lambda x: hk.LayerNorm(-1, True, True, name='norm')(x))
  with pytest.raises(TypeError, match=r'hk\.LayerNorm'):
    tract_hk.apply_tract(other.apply, other.init(None, x), None, x, layers=['norm'])


# A fresh interpreter in which Haiku cannot be found, as if it were not installed: the
# standard path finder is replaced by one that skips it.
_WITHOUT_HAIKU = textwrap.dedent("""
  import importlib.machinery, sys

  class _Finder(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
      if fullname.split('.')[0] == 'haiku':
        return None
      return super().find_spec(fullname, path, target)

  sys.meta_path = [_Finder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
  import tract_optax
  try:
    tract_optax.haiku
  except ImportError as error:
    print(error)
""")


def test_core_imports_no_haiku_and_the_glue_names_the_extra():
  code = 'import sys, tract_optax\nprint("haiku" in sys.modules)\ntract_optax.haiku\n'
  code += 'print("haiku" in sys.modules)'
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert result.stdout.split() == ['False', 'True']
  result = subprocess.run(
    [sys.executable, '-c', _WITHOUT_HAIKU], capture_output=True, text=True, check=True
  )
  assert result.stdout.strip() == (
    'tract_optax.haiku needs Haiku, which is not installed. Install the extra: pip install '
    '"tract_optax[haiku]" (the core, tract_optax.tract / tract_kernel / dense_stats / '
    'conv_stats, works without it).'
  )
