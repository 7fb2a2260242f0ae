"""Tests of tract_optax.linen: statistics captured from Linen forward passes."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import tract_optax
from tract_optax import linen as tract_linen
from tract_optax._src import stats as stats_lib
from tests.reference import patch_rows, tract_solve

LAM = 0.1

ATOL = 1e-5


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _init(model, *args, seed=0, **kwargs):
  """Variables of the right structure, filled from numpy (no PRNG compiles).

  Entries are +-[0.2, 1]; BatchNorm statistics are positive.
  """
  shapes = jax.eval_shape(
      lambda *a: model.init(jax.random.key(0), *a, **kwargs), *args)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    value = rng.uniform(0.2, 1.0, leaf.shape)
    if 'batch_stats' not in jax.tree_util.keystr(path):
      value = value * rng.choice([-1.0, 1.0], leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@jax.jit
def _dense_stats(x):
  return tract_optax.dense_stats(x)


def _conv_stats(x, *args, **kwargs):
  return jax.jit(lambda x: tract_optax.conv_stats(x, *args, **kwargs))(x)


def _run(model, variables, *args, **kwargs):
  """apply_with_stats under jit (one compile instead of many eager ones)."""
  return jax.jit(lambda v, *a: tract_linen.apply_with_stats(model, v, *a, **kwargs))(
      variables, *args)


def _assert_stats(actual, expected, atol=ATOL):
  assert actual.is_woodbury == expected.is_woodbury
  assert float(actual.count) == float(expected.count)
  data = (lambda s: s.rows) if expected.is_woodbury else (lambda s: s.moment)
  np.testing.assert_allclose(data(actual), data(expected), atol=atol, rtol=1e-5)


class Stem(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Conv(4, (3, 3), strides=2, name='stem')(x))


class Net(nn.Module):
  """backbone/stem conv, backbone/proj dense, head dense."""

  @nn.compact
  def __call__(self, x):
    h = Backbone(name='backbone')(x)
    return nn.Dense(2, name='head')(h)


class Backbone(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), padding='SAME', name='stem')(x))
    return nn.Dense(5, name='proj')(h.mean((1, 2)))


@pytest.fixture(scope='module')
def net():
  x = _normal((3, 6, 6, 2))
  model = Net()
  return model, _init(model, x), x


# ----------------------------------------------------------------------------
# Selection


def test_auto_selects_first_dense():
  model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  x = _normal((8, 3))
  variables = _init(model, x)
  out, stats = tract_linen.apply_with_stats(model, variables, x)
  np.testing.assert_array_equal(out, model.apply(variables, x))
  assert list(stats) == [('layers_0',)]
  _assert_stats(stats[('layers_0',)], _dense_stats(x))


def test_auto_selects_first_conv_in_nested_module(net):
  model, variables, x = net
  _, stats = _run(model, variables, x)
  assert list(stats) == [('backbone', 'stem')]
  _assert_stats(stats[('backbone', 'stem')],
                _conv_stats(x, (3, 3), padding='SAME'))


@pytest.mark.parametrize('layers', [
    [('backbone', 'proj')], ['backbone/proj'], 'backbone/proj', [['backbone', 'proj']]])
def test_named_nested_layer_matches_its_independent_input(net, layers):
  model, variables, x = net
  _, stats = _run(model, variables, x, layers=layers)
  # The input of backbone/proj, computed independently: the stem's output.
  _, inter = model.apply(variables, x, capture_intermediates=True)
  stem_out = inter['intermediates']['backbone']['stem']['__call__'][0]
  expected = _dense_stats(nn.relu(stem_out).mean((1, 2)))
  assert list(stats) == [('backbone', 'proj')]
  _assert_stats(stats[('backbone', 'proj')], expected)


def test_several_named_layers(net):
  model, variables, x = net
  _, stats = _run(model, variables, x, layers=['head', ('backbone', 'stem')])
  assert set(stats) == {('head',), ('backbone', 'stem')}
  _, inter = model.apply(variables, x, capture_intermediates=True)
  proj_out = inter['intermediates']['backbone']['proj']['__call__'][0]
  _assert_stats(stats[('head',)], _dense_stats(proj_out))
  _assert_stats(stats[('backbone', 'stem')],
                _conv_stats(x, (3, 3), padding='SAME'))


def test_root_module_is_a_layer():
  model = nn.Dense(3)
  x = _normal((16, 5))
  variables = _init(model, x)
  _, stats = _run(model, variables, x)
  assert list(stats) == [()]
  _assert_stats(stats[()], _dense_stats(x))


# ----------------------------------------------------------------------------
# Layer settings read from the module


CONV_CASES = [
    dict(kernel_size=(3, 3), strides=2, padding='SAME'),
    dict(kernel_size=(3, 3), padding='VALID', kernel_dilation=2),
    dict(kernel_size=(2, 3), strides=(2, 1), padding='CIRCULAR'),
    dict(kernel_size=(3, 3), padding='REFLECT', kernel_dilation=(1, 2)),
    dict(kernel_size=(3, 3), padding=1, feature_group_count=2),
    dict(kernel_size=(3, 2), strides=2, padding=((2, 0), 1)),
    dict(kernel_size=(4,), padding='CAUSAL', kernel_dilation=2),
    dict(kernel_size=3, strides=2, padding='SAME'),  # an int: a 1-D conv
]


@pytest.mark.parametrize('settings', CONV_CASES, ids=str)
def test_conv_settings_match_numpy_patch_matrix(settings):
  ndim = 1 if isinstance(settings['kernel_size'], int) else len(settings['kernel_size'])
  x = _normal((2,) + (7, 6)[:ndim] + (4,))
  conv = nn.Conv(6, **settings)
  variables = _init(conv, x)
  out, stats = _run(conv, variables, x)
  kernel_size = ((settings['kernel_size'],) if ndim == 1 and isinstance(
      settings['kernel_size'], int) else settings['kernel_size'])
  as_tuple = lambda v: (v,) * ndim if isinstance(v, int) else tuple(v)
  groups = settings.get('feature_group_count', 1)
  rows = patch_rows(np.asarray(x), kernel_size, as_tuple(settings.get('strides', 1)),
                    settings['padding'], as_tuple(settings.get('kernel_dilation', 1)),
                    groups)
  # The reference reproduces the layer's output, so the settings were read right.
  kernel = np.asarray(variables['params']['kernel'], np.float64)
  weights = kernel.reshape(-1, groups, kernel.shape[-1] // groups)
  expected_out = np.concatenate(
      [rows[g] @ weights[:, g] for g in range(groups)], axis=-1)
  np.testing.assert_allclose(
      np.asarray(out).reshape(-1, kernel.shape[-1]),
      expected_out + np.asarray(variables['params']['bias']), atol=1e-4)
  moment = np.einsum('gNi,gNj->gij', rows, rows) / rows.shape[1]
  got = stats_lib.to_moment(stats[()])
  assert float(got.count) == rows.shape[1]
  np.testing.assert_allclose(np.asarray(got.moment).reshape(moment.shape), moment,
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('settings', CONV_CASES[:6], ids=str)
def test_conv_settings_match_conv_stats(settings):
  x = _normal((2, 7, 6, 4))
  model = nn.Sequential([nn.Conv(6, **settings), nn.relu, nn.Dense(2)])
  variables = _init(model, x)
  _, stats = _run(model, variables, x)
  expected = _conv_stats(
      x, settings['kernel_size'], settings.get('strides', 1), settings['padding'],
      settings.get('kernel_dilation', 1),
      feature_group_count=settings.get('feature_group_count', 1))
  _assert_stats(stats[('layers_0',)], expected)
  # and the statistic fits the kernel as tract reads it
  kernel = variables['params']['layers_0']['kernel']
  assert stats[('layers_0',)].num_features == np.prod(kernel.shape[:-1])
  assert stats[('layers_0',)].groups == settings.get('feature_group_count', 1)


def test_conv_woodbury_form_and_uint8_input():
  x = jnp.arange(2 * 3 * 3 * 8, dtype=jnp.uint8).reshape(2, 3, 3, 8)
  conv = nn.Conv(4, (3, 3), padding='VALID')
  variables = _init(conv, x)
  _, stats = _run(conv, variables, x)
  assert stats[()].is_woodbury  # N = 2 patches < n = 72
  _assert_stats(stats[()], _conv_stats(x.astype(jnp.float32), (3, 3), padding='VALID'))


@pytest.mark.parametrize('axis', [-1, (-2, -1), (1,), (-1, 1)])
def test_dense_general_rows_reproduce_output(axis):
  x = _normal((2, 3, 4, 5))
  layer = nn.DenseGeneral(6, axis=axis)
  variables = _init(layer, x)
  out, stats = _run(layer, variables, x)
  axes = tuple(sorted(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)))
  rows = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
  rows = rows.reshape(-1, int(np.prod([x.shape[a] for a in axes])))
  kernel = variables['params']['kernel']
  np.testing.assert_allclose(
      (rows @ kernel.reshape(rows.shape[1], -1)).ravel(),
      (out - variables['params']['bias']).ravel(), atol=1e-5)
  _assert_stats(stats[()], tract_optax.stats_from_rows(rows))


# ----------------------------------------------------------------------------
# apply semantics, transforms


class BNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3), name='stem')(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn')(x)
    return nn.Dense(2, name='head')(nn.relu(x).mean((1, 2)))


@pytest.mark.parametrize('mutable', [['batch_stats'], 'batch_stats', True])
def test_mutable_batch_stats_returns_exactly_apply_output(mutable):
  model = BNNet()
  x = _normal((4, 5, 5, 3))
  variables = _init(model, x)
  assert set(variables) == {'params', 'batch_stats'}
  expected = jax.jit(lambda v, x: model.apply(v, x, mutable=mutable))(variables, x)
  output, stats = _run(model, variables, x, mutable=mutable)
  assert jax.tree.structure(output) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, output, expected)
  assert tract_linen.COLLECTION not in output[1]
  _assert_stats(stats[('stem',)], _conv_stats(x, (3, 3), padding='SAME'))
  # keyword arguments of the method pass through
  out_eval, _ = _run(model, variables, x, train=False)
  expected_eval = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  np.testing.assert_array_equal(out_eval, expected_eval)


def test_init_leaves_no_extra_collections():
  model, x = BNNet(), _normal((2, 5, 5, 3))
  init = lambda x: model.init(jax.random.key(0), x)
  assert set(jax.eval_shape(init, x)) == {'params', 'batch_stats'}
  (_, updates), _ = _run(model, _init(model, x), x, mutable=True)
  assert set(updates) == {'params', 'batch_stats'}
  assert set(jax.eval_shape(init, x)) == {'params', 'batch_stats'}


def test_under_jit_equals_eager(net):
  model, variables, x = net
  run = lambda v, x: _run(model, v, x, layers=['head'])
  (out, stats), (out_jit, stats_jit) = run(variables, x), jax.jit(run)(variables, x)
  np.testing.assert_allclose(out, out_jit, atol=1e-6)
  _assert_stats(stats_jit[('head',)], stats[('head',)])


def test_value_and_grad_with_aux_gives_plain_gradient(net):
  model, variables, x = net

  def loss_fn(params):
    out, stats = tract_linen.apply_with_stats(model, {'params': params}, x)
    return jnp.sum(out ** 2), stats

  (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      variables['params'])
  plain = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 2)))(
      variables['params'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, plain)
  _assert_stats(stats[('backbone', 'stem')],
                _conv_stats(x, (3, 3), padding='SAME'))


class RematNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.remat(nn.Conv)(4, (3, 3), strides=2, name='stem')(x)
    x = nn.remat(Stem)(name='block')(x)  # first layer inside a remat'ed parent
    return nn.Dense(2, name='head')(x.mean((1, 2)))


def test_remat_layer_and_remat_parent():
  model = RematNet()
  x = _normal((2, 8, 8, 3))
  variables = _init(model, x)

  def loss_fn(params):
    out, stats = tract_linen.apply_with_stats(
        model, {'params': params}, x, layers=['stem', 'block/stem'])
    return jnp.sum(out), stats

  grads, stats = jax.jit(jax.grad(loss_fn, has_aux=True))(variables['params'])
  assert set(stats) == {('stem',), ('block', 'stem')}
  _assert_stats(stats[('stem',)],
                _conv_stats(x, (3, 3), 2, padding='SAME'))
  _, inter = model.apply(variables, x, capture_intermediates=True)
  block_in = inter['intermediates']['stem']['__call__'][0]
  _assert_stats(stats[('block', 'stem')],
                _conv_stats(block_in, (3, 3), 2, padding='SAME'))


class Cell(nn.Module):
  features: int

  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(self.features, name='dense')(carry)), None


class ScanNet(nn.Module):
  features: int
  variable_axes: dict
  broadcast: bool = True

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(Cell, variable_axes=self.variable_axes,
                   variable_broadcast='params' if self.broadcast else False,
                   split_rngs={'params': not self.broadcast}, length=4)
    carry, _ = scan(self.features, name='cells')(x, None)
    return carry


@pytest.mark.parametrize('features,rows_per_step', [(3, 2), (16, 2)])
def test_scan_with_shared_kernel_is_exact(features, rows_per_step):
  model = ScanNet(features, {tract_linen.COLLECTION: 0})
  x = _normal((rows_per_step, features))
  variables = _init(model, x)
  _, stats = _run(model, variables, x, layers=['cells/dense'])
  assert list(stats) == [('cells', 'dense')]
  params = {'params': variables['params']['cells']['dense']}
  inputs, carry = [], x
  for _ in range(4):
    inputs.append(carry)
    carry = jnp.tanh(nn.Dense(features).apply(params, carry))
  expected = tract_optax.stats_from_rows(jnp.concatenate(inputs))
  # 3 features: 8 rows -> moment; 16 features: 8 rows < 16 -> Woodbury rows
  assert stats[('cells', 'dense')].is_woodbury == (features == 16)
  _assert_stats(stats[('cells', 'dense')], expected)


def test_scan_without_collection_raises():
  model = ScanNet(3, {})
  x = _normal((2, 3))
  variables = _init(model, x)
  with pytest.raises(ValueError, match=r"'cells/dense' runs inside a lifted transform"
                     r".*variable_axes=\{'tract_stats': 0"):
    _run(model, variables, x, layers=['cells/dense'])


def test_scan_with_per_iteration_kernels_raises():
  model = ScanNet(3, {'params': 0, tract_linen.COLLECTION: 0}, broadcast=False)
  x = _normal((2, 3))
  variables = _init(model, x)
  assert variables['params']['cells']['dense']['kernel'].shape == (4, 3, 3)
  with pytest.raises(ValueError, match=r"'cells/dense' runs inside scan/vmap with one "
                     r"kernel per iteration \(kernel \(4, 3, 3\), each iteration sees "
                     r"\(3, 3\)\)"):
    _run(model, variables, x, layers=['cells/dense'])


class VmapNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.vmap(nn.Dense, in_axes=0, out_axes=0,
                    variable_axes={'params': None, tract_linen.COLLECTION: 0},
                    split_rngs={'params': False})
    return dense(4, name='embed')(x)


def test_vmap_with_shared_kernel_is_exact():
  model = VmapNet()
  x = _normal((5, 3, 2))  # vmapped over 5, 3 rows of 2 features each
  variables = _init(model, x)
  _, stats = _run(model, variables, x)
  _assert_stats(stats[('embed',)], _dense_stats(x))


class Twice(nn.Module):
  @nn.compact
  def __call__(self, a, b):
    shared = nn.Dense(3, name='shared')
    return shared(a) + shared(b).mean(0)


def test_layer_called_twice_combines_all_rows():
  model = Twice()
  a, b = _normal((6, 4)), _normal((2, 4), seed=1)
  variables = _init(model, a, b)
  _, stats = _run(model, variables, a, b)
  _assert_stats(stats[('shared',)], _dense_stats(jnp.concatenate([a, b])))


class Scanned(nn.Module):
  """The stem called inside nn.scan (its kernel broadcast), then a head."""

  @nn.compact
  def __call__(self, x):
    stem = nn.Dense(4, name='stem')

    def body(layer, carry, xs):
      return carry, layer(xs)

    scan = nn.scan(
      body,
      variable_broadcast='params',
      variable_axes={tract_linen.COLLECTION: 0},
      split_rngs={'params': False},
    )
    return nn.Dense(2, name='head')(scan(stem, None, jnp.stack([x, x]))[1].mean(0))


@pytest.mark.parametrize(
  ('model', 'inputs', 'rows'),
  [
    (Twice(), lambda a, b: (a, b), lambda a, b: jnp.concatenate([a, b])),
    (Scanned(), lambda a, b: (a,), lambda a, b: jnp.concatenate([a, a])),
  ],
  ids=['twice', 'scanned'],
)
def test_apply_tract_of_a_layer_called_again_later_uses_all_its_rows(model, inputs, rows):
  """The statistics pass ends after a layer's first call: a later call is caught in
  the main pass and both run in full; inside a lifted scan it runs in full at once."""
  a, b = _normal((6, 4)), _normal((2, 4), seed=1)
  params = _init(model, *inputs(a, b))['params']
  name = 'shared' if 'shared' in params else 'stem'

  def loss(p, apply):
    return jnp.sum(jnp.tanh(apply({'params': p}, *inputs(a, b))) ** 2)

  grads = jax.jit(jax.grad(loss, argnums=0), static_argnums=1)(
    params, lambda v, *x: tract_linen.apply_tract(model, v, *x, lam=LAM)
  )
  plain = jax.grad(loss)(params, model.apply)
  expected = tract_solve(rows(a, b), plain[name]['kernel'], LAM)
  np.testing.assert_allclose(grads[name]['kernel'], expected, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(grads[name]['bias'], plain[name]['bias'], rtol=1e-5, atol=1e-7)


@tract_optax.mark_linear_kernel
class ScaledDense(nn.Dense):
  def __call__(self, inputs):
    return super().__call__(2.0 * inputs)


def test_subclass_calling_super_records_the_kernels_input():
  model = ScaledDense(3)
  x = _normal((8, 4))
  variables = _init(model, x)
  _, stats = _run(model, variables, x)
  _assert_stats(stats[()], _dense_stats(2.0 * x))


class KeywordInput(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='dense')(inputs=x)


def test_input_passed_by_keyword():
  model, x = KeywordInput(), _normal((8, 4))
  _, stats = _run(model, _init(model, x), x)
  _assert_stats(stats[('dense',)], _dense_stats(x))


class OddDense(nn.Dense):
  @nn.compact
  def __call__(self, *, features_in):  # no `inputs`, and no super().__call__
    kernel = self.param('kernel', nn.initializers.ones, (features_in.shape[-1], 3))
    return features_in @ kernel


# ----------------------------------------------------------------------------
# Errors


def test_layer_input_not_found_raises():
  layer = OddDense(3)
  variables = {'params': {'kernel': jnp.ones((4, 3))}}
  with pytest.raises(TypeError, match=r"Cannot find the input of layer '<root>': "
                     r'call it with the input as its first argument'):
    tract_linen.apply_with_stats(layer, variables, features_in=_normal((2, 4)))


def test_named_layer_never_called_raises(net):
  model, variables, x = net
  with pytest.raises(ValueError, match=r"'backbone/nope' were never called.*"
                     r"Conv/Dense layers called: 'backbone/stem', 'backbone/proj', "
                     r"'head'"):
    _run(model, variables, x, layers=['head', 'backbone/nope'])


def test_named_module_that_is_no_layer_raises(net):
  model, variables, x = net
  with pytest.raises(ValueError, match=r"'backbone' is a nn.Backbone: it is not a "
                     r"Dense or Conv layer.*layers=\[\.\.\.\]"):
    _run(model, variables, x, layers=['backbone'])


def test_no_layer_called_raises():
  model = nn.Sequential([nn.relu, nn.LayerNorm()])
  x = _normal((2, 3))
  variables = _init(model, x)
  with pytest.raises(ValueError, match='No Conv/Dense layer was called in the forward pass'):
    _run(model, variables, x)


@pytest.mark.parametrize('layer,shape,message', [
    (nn.ConvLocal(2, (3, 3)), (1, 5, 5, 2), r'nn.ConvLocal: its kernel is not shared'),
    (nn.ConvTranspose(2, (3, 3)), (1, 5, 5, 2),
     r'nn.ConvTranspose: its kernel does not map input rows'),
    (nn.Einsum((4, 3), 'ab,cb->ac'), (2, 3), r'nn.Einsum: its kernel does not map'),  # output first
    (nn.Conv(2, (3, 3), input_dilation=2, padding=1), (1, 5, 5, 2),
     r'input_dilation=2 \(a transposed convolution\) is not supported'),
    (nn.Conv(2, (1, 1), mask=jnp.ones((1, 1, 2, 2))), (1, 5, 5, 2),
     r'a masked kernel \(mask=\.\.\.\) is not supported'),
    (nn.DenseGeneral((2, 3)), (4, 5),
     r'nn.DenseGeneral: its kernel has 2 output feature axes'),
    (nn.DenseGeneral(2, batch_dims=(0,)), (4, 5),
     r'batch axes \(0,\) give one kernel per batch entry'),
])
def test_unsupported_first_layer_raises(layer, shape, message):
  x = jnp.ones(shape)
  variables = _init(layer, x)
  with pytest.raises(ValueError, match=message + r'.*TrAct supports'):
    _run(layer, variables, x)


def test_ambiguous_and_empty_layers_raise(net):
  model, variables, x = net
  with pytest.raises(TypeError, match=r"layers=\('backbone', 'stem'\) is ambiguous.*"
                     r"\[\('backbone', 'stem'\)\]"):
    _run(model, variables, x, layers=('backbone', 'stem'))
  with pytest.raises(ValueError, match='layers must name at least one module path'):
    _run(model, variables, x, layers=[])


def test_layer_input_unbound_error_has_root_path():
  with pytest.raises(ValueError, match=r"'<root>' is a nn.ConvTranspose"):
    tract_linen.layer_input_stats(nn.ConvTranspose(2, (3,)), jnp.ones((1, 4, 2)))


# ----------------------------------------------------------------------------
# TractTrainState


class BNTrainState(tract_linen.TractTrainState):
  batch_stats: Any


def test_train_steps_equal_by_hand_computation():
  model = BNNet()
  x, y = _normal((4, 5, 5, 3)), _normal((4, 2), seed=2)
  variables = _init(model, x)
  lam, lr, momentum = 0.1, 0.1, 0.9
  tx = optax.chain(tract_optax.tract(lam), optax.sgd(lr, momentum=momentum))
  state = BNTrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      batch_stats=variables['batch_stats'])

  @jax.jit
  def train_step(state):
    def loss_fn(params):
      (out, updates), stats = tract_linen.apply_with_stats(
          model, {'params': params, 'batch_stats': state.batch_stats}, x,
          mutable=['batch_stats'])
      return jnp.mean((out - y) ** 2), (updates['batch_stats'], stats)
    grads, (batch_stats, stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, tract_stats=stats,
                                 batch_stats=batch_stats)

  @jax.jit
  def by_hand(params, batch_stats, trace):
    def loss_fn(params):
      out, updates = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                 mutable=['batch_stats'])
      return jnp.mean((out - y) ** 2), updates['batch_stats']
    grads, batch_stats = jax.grad(loss_fn, has_aux=True)(params)
    plain = grads['stem']['kernel']
    stem_stats = tract_optax.conv_stats(x, (3, 3), padding='SAME')  # stem input: x
    kernel = tract_optax.precondition(plain, stem_stats, lam)
    grads = {**grads, 'stem': {**grads['stem'], 'kernel': kernel}}
    trace = jax.tree.map(lambda t, g: momentum * t + g, trace, grads)
    params = jax.tree.map(lambda p, t: p - lr * t, params, trace)
    return params, batch_stats, trace, plain, kernel

  params, batch_stats = variables['params'], variables['batch_stats']
  trace = jax.tree.map(jnp.zeros_like, params)
  for _ in range(2):
    state = train_step(state)
    params, batch_stats, trace, plain, kernel = by_hand(params, batch_stats, trace)
    assert not np.allclose(plain, kernel, atol=1e-3)  # TrAct changed the step
  assert int(state.step) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               state.params, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               state.batch_stats, batch_stats)


def test_apply_gradients_without_stats_matches_flax_train_state():
  params = {'w': jnp.arange(3.0)}
  grads = {'w': jnp.ones(3)}
  tx = optax.adam(0.1)
  ours = tract_linen.TractTrainState.create(apply_fn=None, params=params, tx=tx)
  flax_state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  ours, flax_state = ours.apply_gradients(grads=grads), flax_state.apply_gradients(grads=grads)
  assert int(ours.step) == int(flax_state.step) == 1
  np.testing.assert_array_equal(ours.params['w'], flax_state.params['w'])


def test_apply_gradients_without_stats_for_tract_raises():
  params = {'stem': {'kernel': jnp.ones((2, 2))}}
  state = tract_linen.TractTrainState.create(
      apply_fn=None, params=params, tx=tract_optax.tract(0.1))
  with pytest.raises(TypeError, match='received no tract_stats'):
    state.apply_gradients(grads=params)


def test_a_call_without_variables_names_them():
  # The Hugging Face calling style, apply_tract(state.apply_fn, **batch), leaves out the
  # variables: a message that shows where they go, not Python's bare TypeError.
  model = nn.Dense(2)
  x = jnp.ones((4, 3))
  for function in (tract_linen.apply_tract, tract_linen.apply_with_stats):
    with pytest.raises(TypeError, match=r"takes the variables as its second argument, as apply "
                       r"does: .*\(module_or_apply_fn, \{'params': params\}, \*inputs, "
                       r'\*\*kwargs\)'):
      function(model.apply, inputs=x)


def test_a_linen_einsum_that_maps_rows_is_exact():
  layer = nn.Einsum((5, 3), 'bti,io->bto')
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 6, 5)), jnp.float32)
  params = layer.init(jax.random.key(0), x)['params']
  rows = np.asarray(x, np.float64).reshape(-1, 5)

  def loss(p, route):
    out = tract_linen.apply_tract(layer, {'params': p}, x, lam=0.1) if route else layer.apply(
      {'params': p}, x
    )
    return jnp.sum(jnp.sin(out))

  plain = np.asarray(jax.grad(loss)(params, False)['kernel'])
  got = jax.grad(loss)(params, True)['kernel']
  a = rows
  expected = np.linalg.solve(a.T @ a / a.shape[0] + 0.1 * np.eye(5), plain)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)
