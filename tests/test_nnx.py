"""Tests of tract_optax.nnx: statistics captured from NNX forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tract_optax
from tract_optax import nnx as tract_nnx
from tract_optax._src import nnx as nnx_impl
from tract_optax._src import stats as stats_lib
from tests.reference import patch_rows, tract_solve

ATOL = 1e-5

#: Container of a submodule list: ``nnx.List`` (Flax 0.12+), a plain list before.
ModuleList = getattr(nnx, 'List', list)


HAS_CAPTURE = hasattr(nnx, 'capture')
needs_capture = pytest.mark.skipif(
  not HAS_CAPTURE,
  reason='nnx.capture is new in Flax 0.12.6; older Flax only has the sow/pop fallback route',
)


@pytest.fixture(params=[pytest.param('capture', marks=needs_capture), 'pop'])
def route(request, monkeypatch):
  """Runs a test with nnx.capture and with the sow/pop fallback."""
  monkeypatch.setattr(nnx_impl, 'USE_CAPTURE', request.param == 'capture')
  return request.param


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _build(make, seed=0):
  """``make(rngs)`` with values from numpy (no PRNG compiles); BN var > 0."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    value = rng.uniform(0.2, 1.0, leaf.shape)
    if "'var'" not in jax.tree_util.keystr(path):
      value = value * rng.choice([-1.0, 1.0], leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _assert_stats(actual, expected, atol=ATOL):
  assert actual.is_woodbury == expected.is_woodbury
  assert float(actual.count) == float(expected.count)
  data = (lambda s: s.rows) if expected.is_woodbury else (lambda s: s.moment)
  np.testing.assert_allclose(data(actual), data(expected), atol=atol, rtol=1e-5)


@jax.jit
def _dense_stats(x):
  return tract_optax.dense_stats(x)


def _conv_stats(x, *args, **kwargs):
  return jax.jit(lambda x: tract_optax.conv_stats(x, *args, **kwargs))(x)


def _run(model, *args, **kwargs):
  """apply_with_stats under nnx.jit (one compile instead of many eager ones)."""
  return nnx.jit(lambda m, *a: tract_nnx.apply_with_stats(m, *a, **kwargs))(model, *args)


def _structure(model):
  """Graph and state structure of a model, to check nothing is left behind.

  The state is listed as (path, variable type, shape): Flax before 0.12
  compares Variables by identity, so the State itself cannot be compared.
  """
  graphdef, state = nnx.split(model)
  variables = jax.tree_util.tree_leaves_with_path(
    state, is_leaf=lambda leaf: isinstance(leaf, nnx.Variable)
  )
  return (
    str(graphdef),
    [
      (jax.tree_util.keystr(path), type(variable), jnp.shape(variable[...]))
      for path, variable in variables
    ],
    type(model.backbone.stem),
  )


class Backbone(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(2, 4, (3, 3), strides=2, rngs=rngs)
    self.layers = ModuleList([nnx.Linear(4, 5, rngs=rngs), nnx.Linear(5, 5, rngs=rngs)])

  def __call__(self, x):
    h = nnx.relu(self.stem(x)).mean((1, 2))
    for layer in self.layers:
      h = nnx.relu(layer(h))
    return h


class Net(nnx.Module):
  def __init__(self, rngs):
    self.backbone = Backbone(rngs)
    self.bn = nnx.BatchNorm(5, rngs=rngs)
    self.head = nnx.Linear(5, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.bn(self.backbone(x)))


@pytest.fixture
def net():
  return _build(Net), _normal((3, 6, 6, 2))


# ----------------------------------------------------------------------------
# Selection


def test_auto_selects_first_conv_eagerly(net, route):
  model, x = net
  before = _structure(model)
  out, stats = tract_nnx.apply_with_stats(model, x)
  assert list(stats) == [('backbone', 'stem')]
  _assert_stats(stats[('backbone', 'stem')], _conv_stats(x, (3, 3), 2, 'SAME'))
  assert _structure(model) == before


@pytest.mark.parametrize(
  'layers',
  [
    [('backbone', 'layers', 0)],
    ['backbone/layers/0'],
    'backbone/layers/0',
    [['backbone', 'layers', '0']],
  ],
)
def test_named_nested_layer_matches_its_independent_input(net, layers, route):
  model, x = net
  _, stats = _run(model, x, layers=layers)
  assert list(stats) == [('backbone', 'layers', 0)]  # the path as in nnx.state
  layer_in = nnx.relu(model.backbone.stem(x)).mean((1, 2))
  _assert_stats(stats[('backbone', 'layers', 0)], _dense_stats(layer_in))


def test_paths_match_the_kernels_in_gradients(net):
  model, x = net
  layers = [('backbone', 'stem'), ('backbone', 'layers', 1), ('head',)]
  loss_fn = lambda m, x: jnp.sum(m(x) ** 2)
  _, grads, stats = nnx.jit(
    lambda m, x: tract_nnx.value_and_grad_with_stats(loss_fn, m, x, layers=layers)
  )(model, x)
  assert set(stats) == set(layers)
  for path in layers:
    node = grads
    for name in path:
      node = node[name]
    assert 'kernel' in node
  # and tract finds them: preconditioning all three works
  tx = tract_optax.tract(0.1)
  jax.jit(lambda g, s: tx.update(g, tx.init(None), tract_stats=s))(
    nnx.state(grads, nnx.Param), stats
  )


def test_root_module_is_a_layer(route):
  model = _build(lambda rngs: nnx.Linear(5, 3, rngs=rngs))
  x = _normal((16, 5))
  _, stats = tract_nnx.apply_with_stats(model, x)
  assert list(stats) == [()]
  _assert_stats(stats[()], _dense_stats(x))


# ----------------------------------------------------------------------------
# Layer settings read from the module


CONV_CASES = [
  dict(kernel_size=(3, 3), strides=2, padding='SAME'),
  dict(kernel_size=(2, 3), strides=(2, 1), padding='CIRCULAR', kernel_dilation=(1, 2)),
  dict(kernel_size=(3, 3), padding='REFLECT', feature_group_count=2),
  dict(kernel_size=(3, 2), strides=2, padding=((2, 0), 1)),
  dict(kernel_size=(4,), padding='CAUSAL', kernel_dilation=2),
]


@pytest.mark.parametrize('settings', CONV_CASES, ids=str)
def test_conv_settings_match_numpy_patch_matrix(settings):
  ndim = len(settings['kernel_size'])
  x = _normal((2,) + (7, 6)[:ndim] + (4,))
  conv = _build(lambda rngs: nnx.Conv(4, 6, rngs=rngs, **settings))
  out, stats = _run(conv, x)
  as_tuple = lambda v: (v,) * ndim if isinstance(v, int) else tuple(v)
  groups = settings.get('feature_group_count', 1)
  rows = patch_rows(
    np.asarray(x),
    settings['kernel_size'],
    as_tuple(settings.get('strides', 1)),
    settings['padding'],
    as_tuple(settings.get('kernel_dilation', 1)),
    groups,
  )
  kernel = np.asarray(conv.kernel[...], np.float64)
  weights = kernel.reshape(-1, groups, kernel.shape[-1] // groups)
  expected_out = np.concatenate([rows[g] @ weights[:, g] for g in range(groups)], -1)
  np.testing.assert_allclose(
    np.asarray(out).reshape(-1, kernel.shape[-1]),
    expected_out + np.asarray(conv.bias[...]),
    atol=1e-4,
  )
  got = stats_lib.to_moment(stats[()])
  moment = np.einsum('gNi,gNj->gij', rows, rows) / rows.shape[1]
  assert float(got.count) == rows.shape[1]
  np.testing.assert_allclose(
    np.asarray(got.moment).reshape(moment.shape), moment, atol=1e-5, rtol=1e-5
  )


@pytest.mark.parametrize('axis', [-1, (-2, -1), (-1, 1)])
def test_linear_general_rows_reproduce_output(axis):
  x = _normal((2, 3, 4, 5))
  axes = tuple(sorted(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)))
  layer = _build(
    lambda rngs: nnx.LinearGeneral(tuple(x.shape[a] for a in axes), 6, axis=axis, rngs=rngs)
  )
  out, stats = _run(layer, x)
  rows = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
  rows = rows.reshape(-1, int(np.prod([x.shape[a] for a in axes])))
  np.testing.assert_allclose(
    (rows @ layer.kernel[...].reshape(rows.shape[1], -1)).ravel(),
    (out - layer.bias[...]).ravel(),
    atol=1e-5,
  )
  _assert_stats(stats[()], tract_optax.stats_from_rows(rows))


# ----------------------------------------------------------------------------
# Transforms, repeated calls, no leftovers


def test_jit_value_and_grad_and_optimizer_step_by_hand(net):
  model, x = net
  y = _normal((3, 2), seed=1)
  lam, lr, momentum = 0.1, 0.1, 0.9
  reference = nnx.clone(model)
  tx = optax.chain(tract_optax.tract(lam), optax.sgd(lr, momentum=momentum))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = _structure(model)

  def loss_fn(model, x, y):
    out = model(x)
    return jnp.mean((out - y) ** 2), out

  @nnx.jit
  def train_step(model, optimizer, x, y):
    (loss, out), grads, stats = tract_nnx.value_and_grad_with_stats(
      loss_fn, model, x, y, has_aux=True
    )
    optimizer.update(model, grads, tract_stats=stats)
    return loss, out, stats

  loss, out, stats = train_step(model, optimizer, x, y)
  assert list(stats) == [('backbone', 'stem')]
  assert _structure(model) == before

  # by hand: plain gradient, TrAct solve on the stem kernel, SGD (first step)
  @nnx.jit
  def by_hand(reference, x, y):
    (loss, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(reference, x, y)
    params, grads = nnx.state(reference, nnx.Param), nnx.state(grads, nnx.Param)
    plain = grads['backbone']['stem']['kernel'][...]
    stem_stats = tract_optax.conv_stats(x, (3, 3), 2, 'SAME')  # the stem's input: x
    grads['backbone']['stem']['kernel'][...] = tract_optax.precondition(plain, stem_stats, lam)
    expected = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    return loss, out, expected, plain, grads['backbone']['stem']['kernel'][...]

  ref_loss, ref_out, expected, plain, tract_kernel = by_hand(reference, x, y)
  assert not np.allclose(tract_kernel, plain, atol=1e-3)  # TrAct changed the step
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(out, ref_out, atol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), nnx.state(model, nnx.Param), expected
  )
  # BatchNorm running statistics were updated as in a plain step
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
    nnx.state(model, nnx.BatchStat),
    nnx.state(reference, nnx.BatchStat),
  )


def test_no_leftovers_after_errors(net, route):
  model, x = net
  before = _structure(model)
  forward = tract_nnx.capture_stats(lambda m, x: m.backbone.stem(x), layers=['head'])
  with pytest.raises(ValueError, match='never called'):
    forward(model, x)

  def fails_after_the_stem(m, x):
    m.backbone.stem(x)
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    tract_nnx.capture_stats(fails_after_the_stem)(model, x)
  assert _structure(model) == before
  modules = (
    nnx.iter_modules(model) if hasattr(nnx, 'iter_modules') else (model.iter_modules())
  )  # Flax before 0.12
  for _, module in modules:
    assert not hasattr(module, '__captures__')
    assert not hasattr(module, 'tract_input_stats')


class Remat(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.remat(lambda stem, x: stem(x))(self.stem, x)
    return self.head(h.mean((1, 2)))


def test_remat_inside_the_model(route):
  model, x = _build(Remat), _normal((2, 5, 5, 3))
  before = str(nnx.graphdef(model))
  loss_fn = lambda m, x, scale=1.0: scale * jnp.sum(m(x))
  _, grads, stats = nnx.jit(
    lambda m, x: tract_nnx.value_and_grad_with_stats(loss_fn, m, x, scale=2.0)
  )(model, x)  # keyword arguments reach loss_fn
  _assert_stats(stats[('stem',)], _conv_stats(x, (3, 3), padding='SAME'))
  plain = nnx.jit(nnx.grad(lambda m, x: loss_fn(m, x, scale=2.0)))(model, x)
  jax.tree.map(
    np.testing.assert_array_equal, nnx.state(grads, nnx.Param), nnx.state(plain, nnx.Param)
  )
  assert str(nnx.graphdef(model)) == before


STATS_AXIS = nnx.StateAxes({tract_nnx.TractInputStats: 0, ...: None})


class VmapNet(nnx.Module):
  def __init__(self, rngs, axes=STATS_AXIS):
    self.embed = nnx.Linear(2, 4, rngs=rngs)
    self.axes = axes

  def __call__(self, x):
    return nnx.vmap(lambda embed, x: embed(x), in_axes=(self.axes, 0))(self.embed, x)


class ScanNet(nnx.Module):
  """One shared cell applied 4 times by nnx.scan."""

  def __init__(self, rngs, features=3, axes=STATS_AXIS):
    self.cell = nnx.Linear(features, features, rngs=rngs)
    self.axes = axes

  def __call__(self, x):
    @nnx.scan(in_axes=(self.axes, nnx.Carry), out_axes=nnx.Carry, length=4)
    def body(cell, carry):
      return jnp.tanh(cell(carry))

    return body(self.cell, x)


def test_vmap_with_shared_kernel_is_exact(route):
  model, x = _build(VmapNet), _normal((5, 3, 2))
  _, stats = _run(model, x)
  _assert_stats(stats[('embed',)], _dense_stats(x))


@pytest.mark.parametrize('features', [3, 16])
def test_scan_with_shared_kernel_is_exact(route, features):
  model = _build(lambda rngs: ScanNet(rngs, features))
  x = _normal((2, features))
  _, stats = _run(model, x, layers=['cell'])  # its carried input depends on params
  inputs, carry = [], x
  for _ in range(4):
    inputs.append(carry)
    carry = jnp.tanh(model.cell(carry))
  assert stats[('cell',)].is_woodbury == (features == 16)  # 8 rows < 16 features
  _assert_stats(stats[('cell',)], tract_optax.stats_from_rows(jnp.concatenate(inputs)))


def test_scan_with_per_iteration_kernels_raises():
  class Stacked(nnx.Module):
    def __init__(self, rngs):
      self.cells = nnx.vmap(lambda r: nnx.Linear(3, 3, rngs=r))(rngs.fork(split=4))

    def __call__(self, x):
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def body(cell, carry):
        return cell(carry)

      return body(self.cells, x)

  model = _build(Stacked)
  with pytest.raises(
    ValueError,
    match=r"'cells' runs inside scan/vmap with one kernel "
    r'per iteration \(kernel \(4, 3, 3\), each iteration sees \(3, 3\)\)',
  ):
    _run(model, _normal((2, 3)), layers=['cells'])


@pytest.mark.parametrize('net_cls', [VmapNet, ScanNet])
def test_transform_without_stats_axis_raises_with_hint(route, net_cls):
  model = _build(lambda rngs: net_cls(rngs, axes=None))
  x = _normal((5, 3, 2) if net_cls is VmapNet else (2, 3))
  layers = ['embed'] if net_cls is VmapNet else ['cell']
  with pytest.raises(Exception) as info:
    tract_nnx.apply_with_stats(model, x, layers=layers)
  text = str(info.value) + ' '.join(getattr(info.value, '__notes__', []))
  assert 'nnx.StateAxes({tract_optax.nnx.TractInputStats: 0, ...: None})' in text


class Twice(nnx.Module):
  def __init__(self, rngs):
    self.shared = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, a, b):
    return self.shared(a) + self.shared(b).mean(0)


def test_layer_called_twice_combines_all_rows(route):
  model = _build(Twice)
  a, b = _normal((6, 4)), _normal((2, 4), seed=1)
  _, stats = _run(model, a, b)
  _assert_stats(stats[('shared',)], _dense_stats(jnp.concatenate([a, b])))


@needs_capture
def test_inside_an_outer_nnx_capture():
  class Sows(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
      self.sow(nnx.Intermediate, 'features', x)
      return self.lin(x)

  model, x = _build(Sows), _normal((4, 3))
  forward = lambda m, x: tract_nnx.apply_with_stats(m, x)
  (out, stats), intermediates = nnx.capture(forward, nnx.Intermediate)(model, x)
  np.testing.assert_array_equal(intermediates['features'].get_value()[0], x)
  _assert_stats(stats[('lin',)], _dense_stats(x))
  assert not hasattr(model.lin, 'tract_input_stats')


# ----------------------------------------------------------------------------
# Errors


def test_layer_input_not_found_raises():
  class Keywords(nnx.Module):  # a selected module called without an input
    def __init__(self, rngs):
      self.lin = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, *, features_in):
      return self.lin(features_in)

  model = _build(Keywords)
  with pytest.raises(
    TypeError,
    match=r"Cannot find the input of layer '<root>': "
    r'call it with the input as its first argument',
  ):
    tract_nnx.apply_with_stats(model, layers=[()], features_in=_normal((2, 4)))
  out, stats = tract_nnx.apply_with_stats(
    _build(lambda r: nnx.Linear(4, 3, rngs=r)), inputs=_normal((8, 4))
  )
  _assert_stats(stats[()], _dense_stats(_normal((8, 4))))


def test_marked_subclass_with_a_keyword_only_call_records_the_base_input():
  @tract_optax.mark_linear_kernel
  class OddLinear(nnx.Linear):
    def __call__(self, *, features_in):
      return super().__call__(features_in)

  model = _build(lambda rngs: OddLinear(4, 3, rngs=rngs))
  _, stats = tract_nnx.apply_with_stats(model, features_in=_normal((2, 4)))
  _assert_stats(stats[()], _dense_stats(_normal((2, 4))))


def test_named_layer_never_called_raises(net):
  model, x = net
  forward = tract_nnx.capture_stats(lambda m, x: m.backbone(x), layers=['head'])
  with pytest.raises(
    ValueError,
    match=r"'head' were never called.*Conv/Dense layers "
    r"called: 'backbone/stem', 'backbone/layers/0', 'backbone/layers/1'",
  ):
    forward(model, x)


def test_path_not_in_model_raises(net):
  model, x = net
  with pytest.raises(
    ValueError,
    match=r"no submodule at path 'backbone/nope'.*"
    r"'backbone/layers/0', 'backbone/layers/1', 'backbone/stem', 'head'",
  ):
    tract_nnx.apply_with_stats(model, x, layers=['backbone/nope'])


def test_named_module_that_is_no_layer_raises(net):
  model, x = net
  with pytest.raises(
    ValueError,
    match=r"'backbone' is a nnx.Backbone: it is not a "
    r'Linear or Conv layer',
  ):
    tract_nnx.apply_with_stats(model, x, layers=['backbone'])
  assert type(model.backbone) is Backbone


def test_no_layer_called_raises():
  model = _build(lambda rngs: nnx.Sequential(nnx.relu, nnx.LayerNorm(3, rngs=rngs)))
  with pytest.raises(ValueError, match='No Conv/Linear layer was called in the forward pass'):
    tract_nnx.apply_with_stats(model, _normal((2, 3)))


@pytest.mark.parametrize(
  'make,shape,message',
  [
    (
      lambda r: nnx.ConvTranspose(2, 2, (3, 3), rngs=r),
      (1, 5, 5, 2),
      r'nnx.ConvTranspose: its kernel does not map input rows',
    ),
    (
      lambda r: nnx.Einsum('ab,cb->ac', (4, 3), rngs=r),  # output letter first
      (2, 3),
      r'nnx.Einsum: its kernel does not map',
    ),
    (
      lambda r: nnx.Conv(2, 2, (3, 3), input_dilation=2, padding=1, rngs=r),
      (1, 5, 5, 2),
      r'input_dilation=2 \(a transposed convolution\) is not supported',
    ),
    (
      lambda r: nnx.Conv(2, 2, (1, 1), mask=jnp.ones((1, 1, 2, 2)), rngs=r),
      (1, 5, 5, 2),
      r'a masked kernel \(mask=\.\.\.\) is not supported',
    ),
    (
      lambda r: nnx.LinearGeneral(5, (2, 3), rngs=r),
      (4, 5),
      r'nnx.LinearGeneral: its kernel has 2 output feature axes',
    ),
    (
      lambda r: nnx.LinearGeneral(5, 2, batch_axis={0: 4}, rngs=r),
      (4, 5),
      r'batch axes \(0,\) give one kernel per batch entry',
    ),
  ],
)
def test_unsupported_first_layer_raises(make, shape, message):
  layer = make(nnx.Rngs(0))  # not _build: Flax 0.11 leaves an abstract mask
  with pytest.raises(ValueError, match=message + r'.*TrAct supports'):
    tract_nnx.apply_with_stats(layer, jnp.ones(shape))
  assert not hasattr(type(layer), '_tract_original_class')


def test_nested_capture_of_the_same_model_raises(net):
  model, x = net
  inner = lambda m, x: tract_nnx.apply_with_stats(m, x)
  with pytest.raises(RuntimeError, match='captures of the same model cannot be nested'):
    tract_nnx.capture_stats(inner)(model, x)
  assert type(model.backbone.stem) is nnx.Conv


def test_ambiguous_layers_raise(net):
  model, x = net
  with pytest.raises(TypeError, match=r"layers=\('backbone', 'stem'\) is ambiguous"):
    tract_nnx.apply_with_stats(model, x, layers=('backbone', 'stem'))


class SharedTwice(nnx.Module):
  """A shared layer called twice, state (batch statistics, dropout RNG) in between."""

  def __init__(self):
    self.shared = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    self.norm = nnx.BatchNorm(3, rngs=nnx.Rngs(1))
    self.drop = nnx.Dropout(0.5)

  def __call__(self, a, b, rngs):
    h = self.drop(self.norm(self.shared(a)), rngs=rngs)
    return jnp.sum(jnp.tanh(h) ** 2) + jnp.sum(self.shared(b).mean(0) ** 2)


def test_apply_tract_of_a_layer_called_again_later_runs_in_full_and_sets_state_back():
  """The statistics pass ends after the first call; the main pass meets the second,
  sets the model and the Rngs back, and both passes run in full: the kernel gets
  TrAct of all rows, and state advances exactly as in one plain call."""
  a, b = _normal((6, 4)), _normal((2, 4), seed=1)
  model, plain = SharedTwice(), SharedTwice()
  rngs, plain_rngs = nnx.Rngs(dropout=5), nnx.Rngs(dropout=5)
  grads = nnx.grad(lambda m, r: tract_nnx.apply_tract(m, a, b, r, lam=0.1))(model, rngs)
  plain_grads = nnx.grad(lambda m, r: m(a, b, r))(plain, plain_rngs)
  expected = tract_solve(jnp.concatenate([a, b]), plain_grads['shared']['kernel'][...], 0.1)
  np.testing.assert_allclose(grads['shared']['kernel'][...], expected, rtol=2e-5, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(plain))
  jax.tree.map(
    np.testing.assert_array_equal,
    nnx.state(rngs, nnx.RngCount),
    nnx.state(plain_rngs, nnx.RngCount),
  )  # advanced once, as by one plain call
  assert type(model.shared) is nnx.Linear


@pytest.mark.parametrize(
  'equation,kernel_shape,x_shape,contracted',
  [
    ('bi,io->bo', (5, 3), (8, 5), 1),
    ('bti,io->bto', (5, 3), (4, 6, 5), 1),
    ('...ij,ijo->...o', (2, 5, 3), (4, 3, 2, 5), 2),
  ],
)
def test_an_einsum_that_maps_rows_is_a_first_layer(equation, kernel_shape, x_shape, contracted):
  """nnx.Einsum with a row map: its statistic and TrAct gradient, exact (float64 solve)."""
  layer = _build(lambda r: nnx.Einsum(equation, kernel_shape, rngs=r))
  x = _normal(x_shape, seed=3)
  n = int(np.prod(kernel_shape[:contracted]))
  rows = np.asarray(x, np.float64).reshape(-1, n)
  _, stats = _run(layer, x)
  _assert_stats(stats[()], _dense_stats(jnp.asarray(rows, jnp.float32)))

  def loss(model):
    return jnp.sum(jnp.sin(tract_nnx.apply_tract(model, x, lam=0.1)))

  got = nnx.grad(loss)(layer)['kernel'][...]
  plain = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(layer)['kernel'][...]
  expected = tract_solve(rows, np.asarray(plain).reshape(n, -1), 0.1).reshape(kernel_shape)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)


def test_an_einsum_string_given_at_call_time_is_refused():
  class CallTimeEquation(nnx.Module):
    def __init__(self, rngs):
      self.stem = nnx.Einsum('bi,io->bo', (4, 3), rngs=rngs)

    def __call__(self, x):
      return self.stem(x, 'bi,io->bo')

  model = _build(CallTimeEquation)
  with pytest.raises(ValueError, match='an einsum_str given at call time is not read'):
    tract_nnx.apply_with_stats(model, jnp.ones((2, 4)), layers=['stem'])


class Aliased(nnx.Module):
  """A stem reachable under two names: the state lists it once ('alias' < 'stem')."""

  def __init__(self, rngs):
    self.stem = nnx.Linear(4, 3, rngs=rngs)
    self.alias = self.stem
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.stem(x)))


def test_a_shared_submodule_is_selected_by_any_of_its_names():
  model = _build(Aliased)
  x = _normal((8, 4), seed=5)
  by_name = {}
  for layers in (['stem'], ['alias'], None):
    _, stats = _run(model, x, layers=layers)
    (path,) = stats
    by_name[str(layers)] = stats[path]
    assert path in (('alias',), ('stem',))
  for stats in by_name.values():
    _assert_stats(stats, _dense_stats(x))

  def loss(m, layers):
    return jnp.sum(tract_nnx.apply_tract(m, x, lam=0.1, layers=layers) ** 2)

  stem_grad = nnx.grad(lambda m: loss(m, ['stem']))(model)
  auto_grad = nnx.grad(lambda m: loss(m, None))(model)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stem_grad, auto_grad)
