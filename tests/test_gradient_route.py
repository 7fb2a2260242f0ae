"""The gradient route: TrAct gradients straight out of ``jax.grad``.

Each test checks the route against an independent computation (explicit
patch rows and numpy's float64 solve) or against the Optax route (``tract``
first in a chain, fed the captured statistic), which is itself pinned to the
authors' code elsewhere.
"""

import functools
import warnings
from typing import Any

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import tract_optax
from tests import reference
from tract_optax import linen as tract_linen
from tract_optax import nnx as tract_nnx

LAM = 0.1
RTOL = 2e-5


def _normal(shape, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def _labels(batch, classes=3, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, classes, batch))


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def _close(got, want, rtol=RTOL):
  assert reference.rel_err(got, want) < rtol, reference.rel_err(got, want)


# ----------------------------------------------------------------------------
# Linen models: a CNN, a BatchNorm ResNet with a 7x7/2 stem, a ViT


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), name='stem')(x))
    return nn.Dense(3, name='head')(x.mean((1, 2)))


class ResNetStem(nn.Module):
  """ImageNet-style: 7x7/2 stem, BatchNorm, max-pool, one residual block."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                     name=name)
    x = nn.Conv(8, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                name='conv_init')(x)
    x = nn.relu(norm('bn_init')(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding='SAME')
    y = nn.relu(norm('bn1')(nn.Conv(8, (3, 3), use_bias=False, name='conv1')(x)))
    x = nn.relu(x + norm('bn2')(nn.Conv(8, (3, 3), use_bias=False, name='conv2')(y)))
    return nn.Dense(3, name='head')(x.mean((1, 2)))


class ViT(nn.Module):
  """Patch embedding (4x4/4 conv), class token, position embedding, attention."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (4, 4), (4, 4), padding='VALID', name='embedding')(x)
    x = x.reshape(x.shape[0], -1, 16)
    cls = self.param('cls', nn.initializers.normal(0.02), (1, 1, 16))
    x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
    x = x + self.param('pos', nn.initializers.normal(0.02), x.shape[1:])
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(
        nn.LayerNorm(name='ln')(x))
    return nn.Dense(3, name='head')(x[:, 0])


def _linen_case(name):
  if name == 'cnn':
    return CNN(), _normal((4, 8, 8, 2)), ('stem',), dict(kernel_size=(3, 3),
                                                         padding='SAME')
  if name == 'resnet':
    return ResNetStem(), _normal((2, 16, 16, 3)), ('conv_init',), dict(
        kernel_size=(7, 7), strides=2, padding=[(3, 3), (3, 3)])
  return ViT(), _normal((2, 16, 16, 3)), ('embedding',), dict(
      kernel_size=(4, 4), strides=4, padding='VALID')


@pytest.mark.parametrize('name', ['cnn', 'resnet', 'vit'])
def test_linen_gradient_route_equals_the_optax_route_and_float64(name):
  model, x, stem, geometry = _linen_case(name)
  labels = _labels(x.shape[0])
  variables = model.init(jax.random.key(0), x)
  mutable = ['batch_stats'] if 'batch_stats' in variables else False

  def apply(fn, params, **kwargs):
    out = fn(model, {**variables, 'params': params}, x, mutable=mutable, **kwargs)
    return out[0] if mutable else out

  @jax.jit
  def both(params):
    route = jax.grad(lambda p: _xent(apply(tract_linen.apply_tract, p, lam=LAM),
                                     labels))(params)

    def captured(p):
      out, stats = tract_linen.apply_with_stats(
          model, {**variables, 'params': p}, x, mutable=mutable)
      return _xent(out[0] if mutable else out, labels), stats

    plain, stats = jax.grad(captured, has_aux=True)(params)
    tx = tract_optax.tract(LAM)
    optax_route, _ = tx.update(plain, tx.init(params), tract_stats=stats)
    return route, optax_route, plain, stats

  route, optax_route, plain, stats = both(variables['params'])
  assert list(stats) == [stem]  # found by its data-only input
  jax.tree.map(lambda a, b: _close(a, b), route, optax_route)
  # the first layer's kernel against float64 numpy, everything else unchanged
  rows = reference.patch_rows(x, geometry['kernel_size'],
                              (geometry.get('strides', 1),) * 2,
                              geometry['padding'], (1, 1))[0]
  kernel_grad = np.asarray(plain[stem[0]]['kernel'])
  expected = reference.tract_solve(rows, kernel_grad.reshape(rows.shape[1], -1), LAM)
  _close(route[stem[0]]['kernel'], expected.reshape(kernel_grad.shape))
  for path, leaf in jax.tree_util.tree_flatten_with_path(route)[0]:
    if jax.tree_util.keystr(path) != f"['{stem[0]}']['kernel']":
      plain_leaf = plain
      for key in path:
        plain_leaf = plain_leaf[key.key]
      np.testing.assert_allclose(leaf, plain_leaf, rtol=1e-6, atol=1e-7)


def test_apply_tract_returns_exactly_what_apply_returns():
  model, x, _, _ = _linen_case('resnet')
  variables = model.init(jax.random.key(0), x)
  out, updates = tract_linen.apply_tract(model, variables, x, mutable=['batch_stats'])
  want, want_updates = model.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_array_equal(out, want)
  jax.tree.map(np.testing.assert_array_equal, updates, want_updates)
  eval_out = tract_linen.apply_tract(model.apply, variables, x, train=False)
  np.testing.assert_array_equal(eval_out, model.apply(variables, x, train=False))


def test_flax_train_state_unchanged_trains_with_the_gradient_route():
  """Flax's own TrainState and a plain optimizer: only the apply call changes."""
  model, x, _, _ = _linen_case('cnn')
  labels = _labels(x.shape[0])
  variables = model.init(jax.random.key(0), x)
  tx = optax.sgd(0.1, momentum=0.9)
  state = train_state.TrainState.create(apply_fn=model.apply,
                                        params=variables['params'], tx=tx)
  ours = tract_linen.TractTrainState.create(
      apply_fn=model.apply, params=variables['params'],
      tx=optax.chain(tract_optax.tract(LAM), tx))

  @jax.jit
  def step(state, ours):
    grads = jax.grad(lambda p: _xent(tract_linen.apply_tract(
        state.apply_fn, {'params': p}, x, lam=LAM), labels))(state.params)

    def loss(p):
      logits, stats = tract_linen.apply_with_stats(ours.apply_fn, {'params': p}, x)
      return _xent(logits, labels), stats

    plain, stats = jax.grad(loss, has_aux=True)(ours.params)
    return (state.apply_gradients(grads=grads),
            ours.apply_gradients(grads=plain, tract_stats=stats))

  for _ in range(3):
    state, ours = step(state, ours)
  jax.tree.map(lambda a, b: _close(a, b), state.params, ours.params)


def test_in_step_accumulation_with_scan_is_the_mean_of_micro_batch_tract_gradients():
  model, _, _, _ = _linen_case('cnn')
  x = _normal((8, 8, 8, 2), seed=3)
  labels = _labels(8)
  params = model.init(jax.random.key(0), x)['params']
  micro_x, micro_labels = x.reshape(4, 2, 8, 8, 2), labels.reshape(4, 2)

  def micro_grad(p, batch):
    xb, yb = batch
    return jax.grad(lambda p: _xent(tract_linen.apply_tract(
        model, {'params': p}, xb, lam=LAM), yb))(p)

  @jax.jit
  def accumulated(p):
    def body(total, batch):
      return jax.tree.map(jnp.add, total, micro_grad(p, batch)), None
    zeros = jax.tree.map(jnp.zeros_like, p)
    total, _ = jax.lax.scan(body, zeros, (micro_x, micro_labels))
    return jax.tree.map(lambda g: g / 4, total)

  got = accumulated(params)
  by_hand = []
  for i in range(4):
    plain = jax.grad(lambda p: _xent(model.apply({'params': p}, micro_x[i]),
                                     micro_labels[i]))(params)
    stats = tract_optax.conv_stats(micro_x[i], (3, 3))
    by_hand.append(tract_optax.precondition(plain['stem']['kernel'], stats, LAM))
  _close(got['stem']['kernel'], np.mean(np.stack(by_hand), axis=0))


def test_multisteps_with_an_unchanged_optimizer_equals_tract_outside_multisteps():
  model, _, _, _ = _linen_case('cnn')
  batches = [(_normal((2, 8, 8, 2), seed=10 + i), _labels(2, seed=20 + i))
             for i in range(4)]
  params = model.init(jax.random.key(0), batches[0][0])['params']
  inner = lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)
  route_tx = inner()
  optax_tx = optax.chain(tract_optax.tract(LAM), inner().gradient_transformation())

  @jax.jit
  def route_step(p, s, x, y):
    g = jax.grad(lambda p: _xent(tract_linen.apply_tract(model, {'params': p}, x), y))(p)
    u, s = route_tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  @jax.jit
  def optax_step(p, s, x, y):
    def loss(p):
      logits, stats = tract_linen.apply_with_stats(model, {'params': p}, x)
      return _xent(logits, y), stats
    g, stats = jax.grad(loss, has_aux=True)(p)
    u, s = optax_tx.update(g, s, p, tract_stats=stats)
    return optax.apply_updates(p, u), s

  p1, s1, p2, s2 = params, route_tx.init(params), params, optax_tx.init(params)
  for x, y in batches:
    p1, s1 = route_step(p1, s1, x, y)
    p2, s2 = optax_step(p2, s2, x, y)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p1, params)
  assert moved['stem']['kernel'] > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               p1, p2)


def test_weight_decay_in_the_loss_is_not_preconditioned_on_this_route():
  """The decay term never passes through the layer: its gradient 2 wd W is
  added after TrAct, as in the authors' code; the Optax route preconditions
  the whole kernel gradient, decay included."""
  model, x, _, _ = _linen_case('cnn')
  labels = _labels(x.shape[0])
  params = model.init(jax.random.key(0), x)['params']
  wd = 0.05
  decay = lambda p: wd * sum(jnp.sum(k ** 2) for k in jax.tree.leaves(p))

  route = jax.grad(lambda p: _xent(tract_linen.apply_tract(
      model, {'params': p}, x, lam=LAM), labels) + decay(p))(params)
  data_grad = jax.grad(lambda p: _xent(model.apply({'params': p}, x), labels))(params)
  stats = tract_optax.conv_stats(x, (3, 3))
  kernel = params['stem']['kernel']
  expected = tract_optax.precondition(data_grad['stem']['kernel'], stats, LAM) + 2 * wd * kernel
  _close(route['stem']['kernel'], expected)
  in_loss = tract_optax.precondition(data_grad['stem']['kernel'] + 2 * wd * kernel, stats, LAM)
  # The two arrangements differ by far more than rounding: (M + lam I)^-1
  # amplifies the decay term (by up to 1 / lam).
  assert reference.rel_err(in_loss, expected) > 0.05


def test_weight_decay_of_the_wrapped_kernel_is_preconditioned():
  """tract_kernel: a decay that reads the stored kernel passes by; one that reads the
  wrapped kernel flows through the custom VJP and is preconditioned with the data."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((32, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
  stats = tract_optax.dense_stats(x)
  wd = 1e-2

  def loss(k, decay_reads_wrapped):
    wrapped = tract_optax.tract_kernel(k, stats, lam=LAM)
    decayed = wrapped if decay_reads_wrapped else k
    return jnp.mean((x @ wrapped) ** 2) + wd * jnp.sum(decayed**2)

  data = jax.grad(lambda k: jnp.mean((x @ k) ** 2))(kernel)
  stored = tract_optax.precondition(data, stats, LAM) + 2 * wd * kernel
  wrapped = tract_optax.precondition(data + 2 * wd * kernel, stats, LAM)
  _close(jax.grad(loss)(kernel, False), stored)
  _close(jax.grad(loss)(kernel, True), wrapped)
  assert reference.rel_err(stored, wrapped) > 1e-2


class RematScan(nn.Module):
  """Remat'ed stem and a scan over shared blocks."""

  @nn.compact
  def __call__(self, x):
    x = nn.remat(nn.Conv)(6, (3, 3), name='stem')(x)

    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return nn.relu(nn.Dense(6, name='dense')(h)) + h, None

    h, _ = nn.scan(Block, variable_broadcast='params', split_rngs={'params': False},
                   length=3)(name='blocks')(x.mean((1, 2)), None)
    return nn.Dense(3, name='head')(h)


def test_remat_scan_bfloat16_and_a_traced_lambda():
  model = RematScan()
  x = _normal((4, 8, 8, 2))
  labels = _labels(4)
  params = model.init(jax.random.key(0), x)['params']

  @jax.jit
  def grads(p, lam, x):
    return jax.grad(lambda p: _xent(tract_linen.apply_tract(
        model, {'params': p}, x, lam=lam), labels))(p)

  plain = jax.grad(lambda p: _xent(model.apply({'params': p}, x), labels))(params)
  stats = tract_optax.conv_stats(x, (3, 3))
  for lam in (0.1, 0.4):  # one compilation, lambda traced
    got = grads(params, jnp.asarray(lam), x)
    _close(got['stem']['kernel'],
           tract_optax.precondition(plain['stem']['kernel'], stats, lam))
  assert grads._cache_size() == 1


def test_bfloat16_model_gets_a_float32_statistic_and_its_kernels_dtype():
  """A stem computing in bfloat16 (float32 params): the statistic and the
  solve run in float32, and the gradient matches the float32 model's to
  bfloat16 accuracy."""
  def make(dtype):
    return nn.Sequential([nn.Conv(6, (3, 3), dtype=dtype), nn.relu,
                          lambda h: h.mean((1, 2)), nn.Dense(3, dtype=dtype)])

  x, labels = _normal((4, 8, 8, 2)), _labels(4)
  params = make(jnp.float32).init(jax.random.key(0), x)['params']
  grads = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = make(dtype)
    grads[dtype] = jax.jit(jax.grad(lambda p: _xent(tract_linen.apply_tract(
        model, {'params': p}, x.astype(dtype), lam=LAM), labels)))(params)
  kernel = grads[jnp.bfloat16]['layers_0']['kernel']
  assert kernel.dtype == jnp.float32
  assert reference.rel_err(kernel, grads[jnp.float32]['layers_0']['kernel']) < 3e-2
  stats = jax.jit(lambda x: tract_linen.apply_with_stats(
      make(jnp.bfloat16), {'params': params}, x)[1])(x.astype(jnp.bfloat16))
  assert stats[('layers_0',)].moment.dtype == jnp.float32


def test_schedule_given_to_apply_tract_is_refused():
  model, x, _, _ = _linen_case('cnn')
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(TypeError, match=r'takes the value of lambda, not a schedule.*'
                     r'lam=schedule\(state.step\)'):
    tract_linen.apply_tract(model, variables, x, lam=optax.constant_schedule(0.1))
  with pytest.raises(ValueError, match='lam must be a finite number > 0'):
    tract_linen.apply_tract(model, variables, x, lam=0.0)


def test_apply_with_stats_accepts_a_bound_apply():
  model, x, _, _ = _linen_case('cnn')
  variables = model.init(jax.random.key(0), x)
  _, from_module = tract_linen.apply_with_stats(model, variables, x)
  _, from_apply = tract_linen.apply_with_stats(model.apply, variables, x)
  np.testing.assert_array_equal(from_module[('stem',)].moment,
                                from_apply[('stem',)].moment)
  with pytest.raises(TypeError, match='needs the Linen module or its bound apply'):
    tract_linen.apply_with_stats(lambda v, x: x, variables, x)


# ----------------------------------------------------------------------------
# TractTrainState subclasses, and the message of a missing statistic


def test_train_state_subclass_with_fields_without_defaults():
  """Flax's ImageNet example: ``class TrainState(TrainState): batch_stats: Any;
  dynamic_scale: DynamicScale`` (no defaults), here on TractTrainState."""

  class ImageNetState(tract_linen.TractTrainState):
    batch_stats: Any
    dynamic_scale: Any

  params = {'w': jnp.ones(2)}
  state = ImageNetState.create(apply_fn=None, params=params, tx=optax.sgd(0.1),
                               batch_stats={'mean': jnp.zeros(2)}, dynamic_scale=None)
  state = state.apply_gradients(grads={'w': jnp.ones(2)})
  np.testing.assert_allclose(state.params['w'], 0.9)

  class WithScale(tract_linen.TractTrainState):
    dynamic_scale: Any

  assert WithScale.create(apply_fn=None, params=params, tx=optax.sgd(0.1),
                          dynamic_scale=1.0).dynamic_scale == 1.0


def test_missing_statistic_names_both_ways_out():
  params = {'stem': {'kernel': jnp.ones((3, 2))}}
  state = train_state.TrainState.create(
      apply_fn=None, params=params, tx=optax.chain(tract_optax.tract(0.1), optax.sgd(0.1)))
  with pytest.raises(TypeError, match=r'received no tract_stats.*'
                     r'TractTrainState.*apply_tract'):
    state.apply_gradients(grads=params)


# ----------------------------------------------------------------------------
# NNX and Equinox


class NNXCNN(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(2, 6, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.bn(self.stem(x))).mean((1, 2)))


def test_nnx_gradient_route_equals_the_optax_route():
  labels = _labels(4)
  route_model, optax_model = NNXCNN(nnx.Rngs(0)), NNXCNN(nnx.Rngs(0))
  route_opt = nnx.Optimizer(route_model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
  optax_opt = nnx.Optimizer(
      optax_model, optax.chain(tract_optax.tract(LAM), optax.sgd(0.1, momentum=0.9)),
      wrt=nnx.Param)

  @nnx.jit
  def route_step(model, optimizer, x):
    grads = nnx.grad(lambda m: _xent(tract_nnx.apply_tract(m, x, lam=LAM), labels))(model)
    optimizer.update(model, grads)

  @nnx.jit
  def optax_step(model, optimizer, x):
    _, grads, stats = tract_nnx.value_and_grad_with_stats(
        lambda m, x: _xent(m(x), labels), model, x)
    optimizer.update(model, grads, tract_stats=stats)

  for seed in range(2):
    batch = _normal((4, 8, 8, 2), seed=seed)
    route_step(route_model, route_opt, batch)
    optax_step(optax_model, optax_opt, batch)
  jax.tree.map(lambda a, b: _close(a, b), nnx.state(route_model), nnx.state(optax_model))
  moved = float(jnp.max(jnp.abs(route_model.stem.kernel.value
                                - NNXCNN(nnx.Rngs(0)).stem.kernel.value)))
  assert moved > 1e-3
  # the model's state advanced once per step, as for a plain call
  assert int(route_opt.step.value) == 2


def test_nnx_apply_tract_leaves_the_model_as_a_plain_call_does():
  model, plain = NNXCNN(nnx.Rngs(0)), NNXCNN(nnx.Rngs(0))
  x = _normal((4, 8, 8, 2))
  out = tract_nnx.apply_tract(model, x)
  np.testing.assert_array_equal(out, plain(x))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(plain))
  assert type(model.stem) is nnx.Conv


class EqxCNN(eqx.Module):
  stem: eqx.nn.Conv2d
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.stem = eqx.nn.Conv2d(2, 6, 3, padding=1, key=k1)
    self.head = eqx.nn.Linear(6, 3, key=k2)

  def __call__(self, x):  # one example, channels first (C, H, W)
    return self.head(jax.nn.relu(self.stem(x)).mean((1, 2)))


def test_equinox_cnn_with_tract_kernel_equals_the_optax_route():
  """Framework-free core on Equinox: the stem's weight is swapped for
  ``tract_kernel(weight, stats, channels_first=True)`` before the vmap over
  examples, so its cotangent is the whole batch's."""
  model = EqxCNN(jax.random.key(0))
  x = _normal((4, 2, 8, 8))  # NCHW
  labels = _labels(4)

  def loss(model, x):
    return _xent(jax.vmap(model)(x), labels)

  @eqx.filter_jit
  def route_grads(model, x):
    def route_loss(model):
      stats = tract_optax.conv_stats(jnp.moveaxis(x, 1, -1), (3, 3), padding=1)
      weight = tract_optax.tract_kernel(model.stem.weight, stats, lam=LAM,
                                        channels_first=True)
      return loss(eqx.tree_at(lambda m: m.stem.weight, model, weight), x)
    return eqx.filter_grad(route_loss)(model)

  got = route_grads(model, x)
  plain = eqx.filter_grad(loss)(model, x)
  # the Optax route on the same gradient, in Flax layout (kh, kw, c_in, c_out)
  flax_grad = jnp.transpose(plain.stem.weight, (2, 3, 1, 0))
  stats = tract_optax.conv_stats(jnp.moveaxis(x, 1, -1), (3, 3), padding=1)
  tx = tract_optax.tract(LAM)
  updates, _ = tx.update({'stem': {'kernel': flax_grad}}, tx.init(None),
                         tract_stats={'stem': stats})
  expected = jnp.transpose(updates['stem']['kernel'], (3, 2, 0, 1))
  _close(got.stem.weight, expected)
  # unchanged up to float32 rounding (one jitted program, one eager)
  np.testing.assert_allclose(got.stem.bias, plain.stem.bias, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got.head.weight, plain.head.weight, rtol=1e-5, atol=1e-7)


def test_tract_kernel_checks_the_layout():
  stats = tract_optax.conv_stats(_normal((2, 8, 8, 2)), (3, 3))
  with pytest.raises(ValueError, match=r'does not fit the kernel of shape \(6, 2, 3, 3\).*'
                     r'channels_first=True'):
    tract_optax.tract_kernel(jnp.ones((6, 2, 3, 3)), stats, channels_first=False)
  # Equinox Conv2d(3, 3, 3): weight (3, 3, 3, 3) reads both ways: say it
  square = tract_optax.conv_stats(_normal((2, 8, 8, 3)), (3, 3))
  with pytest.raises(ValueError, match=r'in both layouts.*channels_first=True.*'
                     r'channels_first=False'):
    tract_optax.tract_kernel(jnp.ones((3, 3, 3, 3)), square)


def test_an_eager_grad_through_apply_tract_warns_on_an_ill_conditioned_stem():
  """Raw 0..255 pixels, a 7x7 stride-2 RGB stem, lam = 1e-3: the default
  ``check_condition=None`` warns when the backward pass runs eagerly."""
  model = nn.Sequential([nn.Conv(4, (7, 7), (2, 2), padding=[(3, 3), (3, 3)]),
                         lambda h: h.mean((1, 2))])
  pixels = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)), jnp.float32)
  params = model.init(jax.random.key(0), pixels)['params']

  def loss(p, **kwargs):
    return jnp.sum(tract_linen.apply_tract(model, {'params': p}, pixels, lam=1e-3,
                                           **kwargs) ** 2)

  with pytest.warns(tract_optax.ConditioningWarning, match=r'condition number.*raw 0\.\.255'):
    jax.grad(loss)(params)
  with warnings.catch_warnings():
    warnings.simplefilter('error', tract_optax.ConditioningWarning)
    jax.grad(functools.partial(loss, check_condition=False))(params)
    jax.jit(jax.grad(loss))(params)  # None: eager only
    standardised = (pixels - pixels.mean()) / pixels.std()
    jax.grad(lambda p: jnp.sum(tract_linen.apply_tract(
        model, {'params': p}, standardised, lam=0.1) ** 2))(params)


def _two_view_grads(model, params, views, labels):
  """Plain gradient of the two-view loss and each view's statistic."""
  def loss(p):
    total, all_stats = 0.0, []
    for view in views:
      logits, stats = tract_linen.apply_with_stats(model, {'params': p}, view)
      total += _xent(logits, labels)
      all_stats.append(stats[('stem',)])
    return total, all_stats
  return jax.grad(loss, has_aux=True)(params)


def test_two_views_one_call_on_the_concatenation_equals_the_optax_route():
  """Consistency training: two views of a batch in one loss. One apply_tract
  call on the concatenated views (or one kernel wrapped with the combined
  statistic, used by both calls) gives the Optax route's update; one call per
  view preconditions each view with its own statistic, which differs."""
  model, x, _, _ = _linen_case('cnn')
  views = (x, jnp.flip(x, axis=2) * 0.5 + 0.3)
  labels = _labels(x.shape[0])
  params = model.init(jax.random.key(0), x)['params']

  plain, stats = _two_view_grads(model, params, views, labels)
  tx = tract_optax.tract(LAM)
  optax_route, _ = tx.update(plain, tx.init(params),
                             tract_stats={'stem': tract_optax.combine_stats(stats)})

  def concatenated(p):
    logits = tract_linen.apply_tract(model, {'params': p}, jnp.concatenate(views), lam=LAM)
    return sum(_xent(part, labels) for part in jnp.split(logits, 2))

  def shared_kernel(p):
    both = tract_optax.conv_stats(jnp.concatenate(views), (3, 3))
    kernel = tract_optax.tract_kernel(p['stem']['kernel'], both, lam=LAM,
                                      channels_first=False)
    p = {**p, 'stem': {**p['stem'], 'kernel': kernel}}
    return sum(_xent(model.apply({'params': p}, view), labels) for view in views)

  def per_view(p):
    return sum(_xent(tract_linen.apply_tract(model, {'params': p}, view, lam=LAM), labels)
               for view in views)

  rows = np.concatenate([reference.patch_rows(v, (3, 3), (1, 1), 'SAME', (1, 1))[0]
                         for v in views])
  kernel_grad = np.asarray(plain['stem']['kernel'])
  expected = reference.tract_solve(rows, kernel_grad.reshape(rows.shape[1], -1), LAM)
  expected = expected.reshape(kernel_grad.shape)
  _close(optax_route['stem']['kernel'], expected)
  for form in (concatenated, shared_kernel):
    got = jax.jit(jax.grad(form))(params)
    _close(got['stem']['kernel'], optax_route['stem']['kernel'])
    _close(got['head']['kernel'], plain['head']['kernel'])
  separate = jax.jit(jax.grad(per_view))(params)
  assert reference.rel_err(separate['stem']['kernel'], expected) > 0.05


def test_a_view_used_twice_counts_twice_in_the_optax_route():
  """Views (v1, v2, v1): the Optax route's statistic holds every call's rows, v1 twice;
  one kernel wrapped with every call's statistic equals it, the distinct views do not."""
  model, x, _, _ = _linen_case('cnn')
  v1, v2 = x, jnp.flip(x, axis=2) * 0.5 + 0.3
  views = (v1, v2, v1)
  labels = _labels(x.shape[0])
  params = model.init(jax.random.key(0), x)['params']
  plain, stats = _two_view_grads(model, params, views, labels)
  tx = tract_optax.tract(LAM)
  optax_route, _ = tx.update(plain, tx.init(params),
                             tract_stats={'stem': tract_optax.combine_stats(stats)})

  def wrapped_once(p, calls):
    combined = tract_optax.conv_stats(jnp.concatenate(calls), (3, 3))
    kernel = tract_optax.tract_kernel(p['stem']['kernel'], combined, lam=LAM,
                                      channels_first=False)
    p = {**p, 'stem': {**p['stem'], 'kernel': kernel}}
    return sum(_xent(model.apply({'params': p}, view), labels) for view in views)

  every_call = jax.grad(wrapped_once)(params, views)['stem']['kernel']
  distinct = jax.grad(wrapped_once)(params, (v1, v2))['stem']['kernel']
  _close(every_call, optax_route['stem']['kernel'])
  assert reference.rel_err(distinct, optax_route['stem']['kernel']) > 0.05  # 0.15 here


class NNXDropout(nnx.Module):
  """Flax's NNX MNIST pattern: an ``nnx.Rngs`` passed as a call argument."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.dropout = nnx.Dropout(0.5)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x, rngs):
    return self.head(self.dropout(nnx.relu(self.conv1(x)), rngs=rngs).mean((1, 2)))


def test_nnx_rngs_argument_draws_as_a_plain_call_does():
  x = _normal((2, 8, 8, 1))
  model, plain = NNXDropout(nnx.Rngs(0)), NNXDropout(nnx.Rngs(0))
  rngs, plain_rngs = nnx.Rngs(1), nnx.Rngs(1)
  out = tract_nnx.apply_tract(model, x, rngs)
  np.testing.assert_array_equal(out, plain(x, plain_rngs))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(rngs, nnx.RngCount),
               nnx.state(plain_rngs, nnx.RngCount))  # advanced once, not twice
  # under nnx.grad, with automatic selection, and the Optax route alike
  grads = nnx.grad(lambda m, r: tract_nnx.apply_tract(m, x, r).sum())(model, nnx.Rngs(2))
  plain_grads = nnx.grad(lambda m, r: m(x, r).sum())(plain, nnx.Rngs(2))
  stats = tract_optax.conv_stats(x, (3, 3))
  _close(grads['conv1']['kernel'].value,
         tract_optax.precondition(plain_grads['conv1']['kernel'].value, stats, LAM))
  _, optax_grads, found = tract_nnx.value_and_grad_with_stats(
      lambda m, r: m(x, r).sum(), model, nnx.Rngs(2))
  assert list(found) == [('conv1',)]


# ----------------------------------------------------------------------------
# Lanes and wrapping, read off the trace


def _lane_loss(kernel, x, per_lane_stats):
  stats = tract_optax.dense_stats(x)
  wrapped = tract_optax.tract_kernel(kernel, stats, lam=LAM, per_lane_stats=per_lane_stats)
  return jnp.sum((x @ wrapped) ** 2)


def test_per_lane_stats_with_a_kernel_shared_by_the_lanes_is_refused():
  """grad of a vmap: the sum over lanes would be sum_ij P_j G_i (7.9 off TrAct)."""
  x = _normal((3, 8, 4), seed=2)
  kernel = _normal((4, 2), seed=3)
  loss = lambda k: jax.vmap(lambda xi: _lane_loss(k, xi, True))(x).sum()  # noqa: E731
  with pytest.raises(ValueError, match=r'per_lane_stats=True with a kernel shared by the '
                     r'lanes.*own kernel.*See docs/routes\.md#one-statistic-per-step'):
    jax.grad(loss)(kernel)
  with pytest.raises(ValueError, match='kernel shared by the lanes'):
    jax.jit(jax.grad(loss))(kernel)


def test_per_lane_stats_with_a_kernel_per_lane_is_exact():
  x = np.asarray(_normal((3, 8, 4), seed=2), np.float64)
  kernels = _normal((3, 4, 2), seed=3)
  grads = jax.vmap(jax.grad(lambda k, xi: _lane_loss(k, xi, True)))(kernels, jnp.asarray(x))
  for i in range(3):
    k = np.asarray(kernels[i], np.float64)
    plain = 2 * x[i].T @ (x[i] @ k)
    assert reference.rel_err(grads[i], reference.tract_solve(x[i], plain, LAM)) < RTOL


@pytest.mark.parametrize('where', ['eager', 'jit_of_grad', 'grad_of_jit'])
def test_a_kernel_wrapped_twice_is_refused_at_trace_time(where):
  """tract_kernel(tract_kernel(w)) preconditions twice (3.47 off TrAct)."""
  x = _normal((16, 3))
  stats = tract_optax.dense_stats(x)

  def loss(k):
    return jnp.sum(x @ tract_optax.tract_kernel(tract_optax.tract_kernel(k, stats), stats))

  run = {
      'eager': jax.grad(loss),
      'jit_of_grad': jax.jit(jax.grad(loss)),
      'grad_of_jit': jax.grad(jax.jit(loss)),
  }[where]
  with pytest.raises(ValueError, match=r'already TrAct-wrapped.*Wrap the stored kernel once'):
    run(_normal((3, 2), seed=1))


def test_two_kernels_each_wrapped_once_are_accepted():
  x = _normal((16, 3))
  stats = tract_optax.dense_stats(x)
  k = _normal((3, 3), seed=1)
  g = jax.grad(lambda k: jnp.sum(x @ tract_optax.tract_kernel(k, stats, channels_first=False)
                                 @ tract_optax.tract_kernel(k.T, stats, channels_first=False)))(k)
  xs, kk = np.asarray(x, np.float64), np.asarray(k, np.float64)
  ones = np.ones((16, 3))
  grad_a = xs.T @ ones @ kk  # dL/da with b = k.T
  grad_b = kk.T @ xs.T @ ones  # dL/db with a = k
  want = reference.tract_solve(xs, grad_a, LAM) + reference.tract_solve(xs, grad_b, LAM).T
  assert reference.rel_err(g, want) < RTOL


def test_a_kernel_wrapped_twice_under_vmap_is_refused():
  x = _normal((3, 16, 3))
  kernels = _normal((3, 3, 2), seed=1)

  def loss(k, xi):
    stats = tract_optax.dense_stats(xi)
    twice = tract_optax.tract_kernel(tract_optax.tract_kernel(k, stats, per_lane_stats=True),
                                     stats, per_lane_stats=True)
    return jnp.sum(xi @ twice)

  with pytest.raises(ValueError, match='already TrAct-wrapped'):
    jax.vmap(jax.grad(loss))(kernels, x)
  with pytest.raises(ValueError, match='already TrAct-wrapped'):
    jax.grad(lambda ks: jax.vmap(loss)(ks, x).sum())(kernels)
