"""Which layer is a first layer, and which layers TrAct may precondition.

Automatic selection picks the one Conv/Dense whose input depends on no
parameter, when it is also the first called, or refuses with the candidates;
subclasses that may not use their kernel linearly are refused unless marked.
Linen and NNX alike.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tract_optax
from tract_optax import linen as tract_linen
from tract_optax import nnx as tract_nnx


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _linen(model, *args, **kwargs):
  variables = model.init(jax.random.key(0), *args)
  return jax.jit(lambda v, *a: tract_linen.apply_with_stats(model, v, *a, **kwargs))(
      variables, *args)


# ----------------------------------------------------------------------------
# Linen


class ConditionedCNN(nn.Module):
  """A label embedding Dense runs before the image stem (a conditional model)."""

  @nn.compact
  def __call__(self, image, label_onehot):
    condition = nn.Dense(8, name='label_embed')(label_onehot)
    h = nn.Conv(8, (3, 3), name='stem')(image)
    return nn.Dense(2, name='head')(h.mean((1, 2)) + condition)


class TimeEmbedding(nn.Module):
  """The stem is called first, but a time embedding also reads data only."""

  @nn.compact
  def __call__(self, image, t):
    h = nn.Conv(8, (3, 3), name='stem')(image)
    freqs = jnp.concatenate([jnp.sin(t[:, None] * jnp.arange(4)),
                             jnp.cos(t[:, None] * jnp.arange(4))], -1)
    return nn.Dense(2, name='head')(h.mean((1, 2)) + nn.Dense(8, name='time')(freqs))


class LearnedNormalization(nn.Module):
  """A parameter scales the input before the stem: no first layer."""

  @nn.compact
  def __call__(self, image):
    scale = self.param('scale', nn.initializers.ones, (image.shape[-1],))
    return nn.Dense(2, name='head')(nn.Conv(4, (3, 3), name='stem')(image * scale).mean((1, 2)))


class TokenFirst(nn.Module):
  """The first Dense called reads an nn.Embed output (parameters); the image
  stem comes second."""

  @nn.compact
  def __call__(self, image, tokens):
    t = nn.Dense(8, name='token_proj')(nn.Embed(10, 4, name='embed')(tokens).mean(1))
    return nn.Dense(2, name='head')(nn.Conv(8, (3, 3), name='stem')(image).mean((1, 2)) + t)


def test_linen_conditioning_dense_before_the_stem_is_refused_with_candidates():
  image, label = _normal((2, 6, 6, 3)), jax.nn.one_hot(jnp.arange(2), 4)
  with pytest.raises(ValueError, match=r"Several Conv/Dense layers take input computed "
                     r"from data alone: 'label_embed', 'stem'.*e.g. layers=\['label_embed'\]"):
    _linen(ConditionedCNN(), image, label)
  _, stats = _linen(ConditionedCNN(), image, label, layers=['stem'])
  assert list(stats) == [('stem',)]


def test_linen_time_embedding_is_a_second_candidate():
  with pytest.raises(ValueError, match=r"'stem', 'time'"):
    _linen(TimeEmbedding(), _normal((2, 6, 6, 3)), jnp.arange(2.0))


def test_linen_parameter_dependent_stem_input_is_refused():
  with pytest.raises(ValueError, match=r"Every Conv/Dense layer called takes an input "
                     r"that depends on parameters.*'stem' \(input depends on parameters\)"):
    _linen(LearnedNormalization(), _normal((2, 6, 6, 3)))


def test_linen_first_called_layer_reading_parameters_is_refused():
  with pytest.raises(ValueError, match=r"The first Conv/Dense layer called, "
                     r"'token_proj', takes an input that depends on parameters.*"
                     r"only layer with data-only input is 'stem'.*e.g. layers=\['stem'\]"):
    _linen(TokenFirst(), _normal((2, 6, 6, 3)), jnp.zeros((2, 5), jnp.int32))


def test_linen_uint8_images_are_data():
  image = jnp.asarray(np.random.default_rng(0).integers(0, 255, (2, 6, 6, 3)), jnp.uint8)
  model = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu, nn.Dense(2)])
  variables = model.init(jax.random.key(0), image.astype(jnp.float32))
  _, stats = tract_linen.apply_with_stats(model, variables, image)
  assert list(stats) == [('layers_0',)]


class StdConv(nn.Conv):
  """Weight standardisation through a ``param`` hook (BiT / ViT-hybrid)."""

  def param(self, name, *args, **kwargs):
    value = super().param(name, *args, **kwargs)
    if name == 'kernel':
      value = value - value.mean(axis=(0, 1, 2))
      value = value / (value.std(axis=(0, 1, 2)) + 1e-5)
    return value


class ScaledInputConv(nn.Conv):
  @nn.compact
  def __call__(self, x):
    return super().__call__(x / 2)


@pytest.mark.parametrize('layer_cls,method', [(StdConv, 'param'),
                                              (ScaledInputConv, '__call__')])
@pytest.mark.parametrize('explicit', [False, True])
def test_linen_reparameterised_subclasses_are_refused(layer_cls, method, explicit):
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name='head')(layer_cls(4, (3, 3), name='stem')(x).mean((1, 2)))

  kwargs = {'layers': ['stem']} if explicit else {}
  with pytest.raises(ValueError, match=rf"'stem' is a nn.{layer_cls.__name__}: its class "
                     rf"{layer_cls.__name__} overrides {method}\(\) of Conv.*linear in its "
                     r"stored kernel.*@tract_optax.mark_linear_kernel"):
    _linen(Model(), _normal((2, 6, 6, 3)), **kwargs)


def test_linen_marked_subclass_is_accepted():
  marked = tract_optax.mark_linear_kernel(type('Halved', (ScaledInputConv,), {}))
  x = _normal((2, 6, 6, 3))
  _, stats = _linen(marked(4, (3, 3)), x)
  expected = tract_optax.conv_stats(x / 2, (3, 3))
  np.testing.assert_allclose(stats[()].moment, expected.moment, rtol=1e-5, atol=1e-6)


def test_linen_custom_dot_general_is_refused():
  def scaled_dot(lhs, rhs, *args, **kwargs):
    return jax.lax.dot_general(lhs, jnp.round(rhs * 8) / 8, *args, **kwargs)

  with pytest.raises(ValueError, match=r'custom dot_general=.*quantization'):
    _linen(nn.Dense(3, dot_general=scaled_dot), _normal((4, 5)))


# ----------------------------------------------------------------------------
# NNX


class NNXConditioned(nnx.Module):
  def __init__(self, rngs):
    self.label_embed = nnx.Linear(4, 8, rngs=rngs)
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, image, label):
    return self.head(self.stem(image).mean((1, 2)) + self.label_embed(label))


class NNXNormalized(nnx.Module):
  def __init__(self, rngs):
    self.scale = nnx.Param(jnp.ones(3))
    self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, image):
    return self.bn(self.stem(image * self.scale.value))


def test_nnx_conditioning_linear_is_refused_and_model_untouched():
  model = NNXConditioned(nnx.Rngs(0))
  before = nnx.state(model)
  image, label = _normal((2, 6, 6, 3)), jax.nn.one_hot(jnp.arange(2), 4)
  with pytest.raises(ValueError, match=r"Several Conv/Linear layers take input "
                     r"computed from data alone: 'stem', 'label_embed'"):
    tract_nnx.apply_with_stats(model, image, label)
  _, stats = tract_nnx.apply_with_stats(model, image, label, layers=['stem'])
  assert list(stats) == [('stem',)]
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
  assert type(model.stem) is nnx.Conv


def test_nnx_parameter_dependent_input_is_refused_without_touching_batch_stats():
  model = NNXNormalized(nnx.Rngs(0))
  before = nnx.state(model, nnx.BatchStat)
  with pytest.raises(ValueError, match=r"Every Conv/Linear layer called takes an input "
                     r"that depends on parameters"):
    tract_nnx.apply_with_stats(model, _normal((2, 6, 6, 3)))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.BatchStat), before)


class NNXStdConv(nnx.Conv):
  def __call__(self, x):
    kernel = self.kernel.value
    self.kernel.value = (kernel - kernel.mean()) / (kernel.std() + 1e-5)
    try:
      return super().__call__(x)
    finally:
      self.kernel.value = kernel


def test_nnx_reparameterised_subclass_is_refused_and_marked_one_accepted():
  layer = NNXStdConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  x = _normal((2, 6, 6, 3))
  with pytest.raises(ValueError, match=r"is a nnx.NNXStdConv: its class NNXStdConv "
                     r"overrides __call__\(\) of Conv"):
    tract_nnx.apply_with_stats(layer, x)
  marked = tract_optax.mark_linear_kernel(type('Marked', (nnx.Conv,), {}))
  _, stats = tract_nnx.apply_with_stats(marked(3, 4, (3, 3), rngs=nnx.Rngs(0)), x)
  assert stats[()].moment.shape == (27, 27)


# ----------------------------------------------------------------------------
# Conv geometry for the manual route


@pytest.mark.parametrize('make', [
    lambda: nn.Conv(4, (3, 3)),
    lambda: nn.Conv(4, (7, 7), strides=2, padding=[(3, 3), (3, 3)]),
    lambda: nn.Conv(4, (3, 3), kernel_dilation=2, feature_group_count=3, padding='CIRCULAR'),
    lambda: nnx.Conv(3, 6, (5, 5), strides=2, padding='VALID', rngs=nnx.Rngs(0)),
])
def test_conv_settings_give_the_statistic_the_capture_computes(make):
  layer = make()
  x = _normal((2, 9, 9, 3))
  settings = tract_optax.conv_settings(layer)
  manual = tract_optax.conv_stats(x, **settings)
  if isinstance(layer, nn.Module):
    captured = tract_linen.layer_input_stats(layer, x)
  else:
    captured = tract_nnx.layer_input_stats(layer, x)
  np.testing.assert_allclose(tract_optax.stats.to_moment(manual).moment,
                             tract_optax.stats.to_moment(captured).moment,
                             rtol=1e-5, atol=1e-6)


def test_conv_stats_default_padding_is_flax_conv_default():
  x = _normal((2, 6, 6, 3))
  default_conv = nn.Conv(4, (3, 3))
  assert tract_optax.conv_settings(default_conv)['padding'] == 'SAME'
  np.testing.assert_allclose(tract_optax.conv_stats(x, (3, 3)).moment,
                             tract_linen.layer_input_stats(default_conv, x).moment,
                             rtol=1e-6)


def test_conv_settings_refuses_what_is_not_a_conv():
  with pytest.raises(ValueError, match='conv_settings needs a Flax Conv'):
    tract_optax.conv_settings(nn.Dense(3))


def test_a_mark_does_not_vouch_for_subclasses_that_override_more():
  marked = tract_optax.mark_linear_kernel(type('Halved', (ScaledInputConv,), {}))

  class StandardisedHalved(marked):
    def param(self, name, *args, **kwargs):
      value = super().param(name, *args, **kwargs)
      return value / (jnp.std(value) + 1e-5) if name == 'kernel' else value

  with pytest.raises(ValueError, match=r'its class StandardisedHalved overrides param\(\)'):
    _linen(StandardisedHalved(4, (3, 3)), _normal((2, 6, 6, 3)))


class NNXHalved(nnx.Linear):
  def __call__(self, x):
    return super().__call__(x / 255.0)


def test_nnx_marked_subclass_records_the_input_the_flax_layer_receives():
  """The statistic is that of ``x / 255``, what the kernel multiplies, and the
  gradient route preconditions with it (as Linen does)."""
  marked = tract_optax.mark_linear_kernel(type('MarkedHalved', (NNXHalved,), {}))
  layer = marked(3, 2, rngs=nnx.Rngs(0))
  x = _normal((16, 3)) * 255.0
  _, stats = tract_nnx.apply_with_stats(layer, x)
  np.testing.assert_allclose(stats[()].moment, tract_optax.dense_stats(x / 255.0).moment,
                             rtol=1e-5)
  grads = nnx.grad(lambda m: jnp.sum(tract_nnx.apply_tract(m, x) ** 2))(layer)
  plain = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  expected = tract_optax.precondition(plain['kernel'].value,
                                      tract_optax.dense_stats(x / 255.0), 0.1)
  np.testing.assert_allclose(grads['kernel'].value, expected, rtol=2e-5, atol=1e-6)
  assert type(layer) is marked
