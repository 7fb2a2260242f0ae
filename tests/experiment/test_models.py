"""Tests of tract_experiment.models: every model trains one TrAct step on a tiny batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tract_optax
from tract_optax import linen as tract_linen
from tract_experiment import models as models_lib
from tract_optax._src.paths import normalize_path

# (model, image shape, first layer, n = features per first-layer input row)
CASES = [
    ('cnn', (28, 28, 1), ('stem',), 9),
    ('resnet18', (16, 16, 3), ('stem',), 27),
    ('vit', (16, 16, 3), ('patch_embed',), 48),
]


def _batch(shape, size=4, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(size,) + shape).astype(np.float32)
  labels = rng.integers(0, 10, size).astype(np.int32)
  return images, labels


@pytest.mark.parametrize('name, shape, first_layer, n', CASES)
def test_tract_train_step(name, shape, first_layer, n):
  """Init, one TrAct SGD step and an eval-mode forward pass, in one compilation."""
  model = models_lib.create_model(name, num_classes=10)
  images, labels = _batch(shape)
  variables = jax.jit(lambda key, x: model.init(key, x, train=False))(jax.random.key(0), images)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  assert models_lib.FIRST_LAYER[name] == first_layer
  tx = optax.chain(tract_optax.tract(0.1), optax.sgd(0.1))
  plain_tx = optax.sgd(0.1)

  @jax.jit
  def step(params, batch_stats, images, labels):
    def loss_fn(params):
      (logits, updates), stats = tract_linen.apply_with_stats(
          model, {'params': params, 'batch_stats': batch_stats}, images, train=True,
          mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (updates, stats)

    (loss, (updates, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    tract_updates, _ = tx.update(grads, tx.init(params), params, tract_stats=stats)
    plain_updates, _ = plain_tx.update(grads, plain_tx.init(params), params)
    new_params = optax.apply_updates(params, tract_updates)
    eval_logits = model.apply({'params': new_params, 'batch_stats': updates['batch_stats']
                               if 'batch_stats' in updates else batch_stats},
                              images, train=False)
    return loss, new_params, updates, stats, tract_updates, plain_updates, eval_logits

  loss, new_params, updates, stats, tract_updates, plain_updates, eval_logits = step(
      params, batch_stats, images, labels)
  assert np.isfinite(float(loss))
  assert eval_logits.shape == (4, 10) and np.all(np.isfinite(eval_logits))
  assert [normalize_path(path) for path in stats] == [first_layer]
  (layer_stats,) = stats.values()
  assert layer_stats.num_features == n
  # Only the first layer's kernel update differs from plain SGD.
  first = lambda tree: tree[first_layer[0]]['kernel']  # noqa: E731
  assert not np.allclose(first(tract_updates), first(plain_updates))
  np.testing.assert_allclose(tract_updates['head']['kernel'], plain_updates['head']['kernel'])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new_params)
  assert changed[first_layer[0]]['kernel'] and changed['head']['kernel']
  if name != 'vit':  # BatchNorm running averages move in training mode
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), batch_stats,
                         updates['batch_stats'])
    assert all(jax.tree.leaves(moved))


@pytest.mark.parametrize('name', sorted(models_lib.MODELS))
def test_output_shapes_for_any_channels(name):
  model = models_lib.create_model(name, num_classes=7)
  shape = jax.ShapeDtypeStruct((3, 8, 8, 2), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(1), x), shape)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, shape)
  assert logits.shape == (3, 7)
  first = models_lib.FIRST_LAYER[name][0]
  assert variables['params'][first]['kernel'].shape[-2] == 2  # input channels from the data


def test_cnn_is_small_and_resnet18_is_resnet18():
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  shape = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  init = lambda model: jax.eval_shape(  # noqa: E731
      lambda x: model.init(jax.random.key(0), x), shape)['params']
  assert count(init(models_lib.create_model('cnn', 10))) < 200_000
  # CIFAR ResNet-18 with 10 classes has about 11.2 M parameters.
  resnet = count(init(models_lib.create_model('resnet18', 10)))
  assert 11.0e6 < resnet < 11.4e6
  vit = init(models_lib.create_model('vit', 10))
  assert vit['patch_embed']['kernel'].shape == (4, 4, 3, 64)
  assert len([k for k in vit if k.startswith('block')]) == 4


def test_create_model_unknown_name():
  with pytest.raises(ValueError, match=r"Unknown model 'vgg'; choose one of \['cnn', "):
    models_lib.create_model('vgg', 10)


def test_create_model_overrides():
  model = models_lib.create_model('cnn', 10, stage_widths=(8, 8), blocks_per_stage=(1, 1),
                                  stage_strides=(1, 2))
  assert model.stage_widths == (8, 8)
