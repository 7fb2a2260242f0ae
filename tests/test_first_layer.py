"""Which layer is a first layer, and which layers TrAct may precondition.

Automatic selection picks the one Conv/Dense whose input depends on no
parameter, when it is also the first called, or refuses with the candidates;
subclasses that may not use their kernel linearly are refused unless marked.
Linen and NNX alike.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tract_optax
from tract_optax import linen as tract_linen
from tract_optax import nnx as tract_nnx
from tract_optax._src import first_layer
from tract_optax._src import stats as stats_lib


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _linen(model, *args, **kwargs):
  variables = model.init(jax.random.key(0), *args)
  return jax.jit(lambda v, *a: tract_linen.apply_with_stats(model, v, *a, **kwargs))(
    variables, *args
  )


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
    freqs = jnp.concatenate(
      [jnp.sin(t[:, None] * jnp.arange(4)), jnp.cos(t[:, None] * jnp.arange(4))], -1
    )
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
  # The label embedding is called first, but the stem reads the image: the
  # suggestion names the stem (it used to name the first candidate called).
  with pytest.raises(
    ValueError,
    match=r'Several Conv/Dense layers take input computed '
    r"from data alone: 'label_embed' \(nn.Dense, input float32\[2,4\]\), "
    r"'stem' \(nn.Conv, input float32\[2,6,6,3\]\).*The first of them that "
    r"reads the model's largest input \(args\[0\], float32\[2,6,6,3\]\) is "
    r"'stem': if it is the image stem, pass layers=\['stem'\]\.",
  ):
    _linen(ConditionedCNN(), image, label)
  _, stats = _linen(ConditionedCNN(), image, label, layers=['stem'])
  assert list(stats) == [('stem',)]


def test_linen_time_embedding_is_a_second_candidate():
  with pytest.raises(
    ValueError,
    match=r"'stem' \(nn.Conv, input float32\[2,6,6,3\]\), "
    r"'time' \(nn.Dense, input float32\[2,8\]\).*pass layers=\['stem'\]",
  ):
    _linen(TimeEmbedding(), _normal((2, 6, 6, 3)), jnp.arange(2.0))


def test_linen_parameter_dependent_stem_input_is_refused():
  with pytest.raises(
    ValueError,
    match=r'Every Conv/Dense layer called takes an input '
    r"that depends on parameters, so none is a first layer.*: 'stem' "
    r"\(nn.Conv, input float32\[2,6,6,3\]\), 'head' .*To precondition a "
    r'layer anyway, name it with layers=\[\.\.\.\]',
  ):
    _linen(LearnedNormalization(), _normal((2, 6, 6, 3)))


def test_linen_first_called_layer_reading_parameters_is_refused():
  with pytest.raises(
    ValueError,
    match=r'The first Conv/Dense layer called, '
    r"'token_proj', takes an input that depends on parameters.*"
    r"only layer with data-only input is 'stem'.*The other 2 Conv/Dense "
    r"layers called take parameter-dependent input \('token_proj', 'head'\)"
    r".*pass layers=\['stem'\]",
  ):
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


@pytest.mark.parametrize('layer_cls,method', [(StdConv, 'param'), (ScaledInputConv, '__call__')])
@pytest.mark.parametrize('explicit', [False, True])
def test_linen_reparameterised_subclasses_are_refused(layer_cls, method, explicit):
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name='head')(layer_cls(4, (3, 3), name='stem')(x).mean((1, 2)))

  kwargs = {'layers': ['stem']} if explicit else {}
  with pytest.raises(
    ValueError,
    match=rf"'stem' is a nn.{layer_cls.__name__}: its class "
    rf'{layer_cls.__name__} overrides {method}\(\) of Conv.*linear in the '
    r'stored kernel.*@tract_optax.mark_linear_kernel',
  ):
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
  with pytest.raises(
    ValueError,
    match=r'Several Conv/Linear layers take input '
    r"computed from data alone: 'stem' \(nnx.Conv, input float32\[2,6,6,3\]\), "
    r"'label_embed' \(nnx.Linear, input float32\[2,4\]\).*"
    r"pass layers=\['stem'\]",
  ):
    tract_nnx.apply_with_stats(model, image, label)
  _, stats = tract_nnx.apply_with_stats(model, image, label, layers=['stem'])
  assert list(stats) == [('stem',)]
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
  assert type(model.stem) is nnx.Conv


def test_nnx_parameter_dependent_input_is_refused_without_touching_batch_stats():
  model = NNXNormalized(nnx.Rngs(0))
  before = nnx.state(model, nnx.BatchStat)
  with pytest.raises(
    ValueError,
    match=r'Every Conv/Linear layer called takes an input '
    r'that depends on parameters',
  ):
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
  with pytest.raises(
    ValueError,
    match=r'is a nnx.NNXStdConv: its class NNXStdConv '
    r'overrides __call__\(\) of Conv',
  ):
    tract_nnx.apply_with_stats(layer, x)
  marked = tract_optax.mark_linear_kernel(type('Marked', (nnx.Conv,), {}))
  _, stats = tract_nnx.apply_with_stats(marked(3, 4, (3, 3), rngs=nnx.Rngs(0)), x)
  assert stats[()].moment.shape == (27, 27)


# ----------------------------------------------------------------------------
# Conv geometry for the manual route


@pytest.mark.parametrize(
  'make',
  [
    lambda: nn.Conv(4, (3, 3)),
    lambda: nn.Conv(4, (7, 7), strides=2, padding=[(3, 3), (3, 3)]),
    lambda: nn.Conv(4, (3, 3), kernel_dilation=2, feature_group_count=3, padding='CIRCULAR'),
    lambda: nnx.Conv(3, 6, (5, 5), strides=2, padding='VALID', rngs=nnx.Rngs(0)),
  ],
)
def test_conv_settings_give_the_statistic_the_capture_computes(make):
  layer = make()
  x = _normal((2, 9, 9, 3))
  settings = tract_optax.conv_settings(layer)
  manual = tract_optax.conv_stats(x, **settings)
  if isinstance(layer, nn.Module):
    captured = tract_linen.layer_input_stats(layer, x)
  else:
    captured = tract_nnx.layer_input_stats(layer, x)
  np.testing.assert_allclose(
    stats_lib.to_moment(manual).moment, stats_lib.to_moment(captured).moment, rtol=1e-5, atol=1e-6
  )


def test_conv_stats_default_padding_is_flax_conv_default():
  x = _normal((2, 6, 6, 3))
  default_conv = nn.Conv(4, (3, 3))
  assert tract_optax.conv_settings(default_conv)['padding'] == 'SAME'
  np.testing.assert_allclose(
    tract_optax.conv_stats(x, (3, 3)).moment,
    tract_linen.layer_input_stats(default_conv, x).moment,
    rtol=1e-6,
  )


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
  np.testing.assert_allclose(stats[()].moment, tract_optax.dense_stats(x / 255.0).moment, rtol=1e-5)
  grads = nnx.grad(lambda m: jnp.sum(tract_nnx.apply_tract(m, x) ** 2))(layer)
  plain = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  expected = tract_optax.precondition(
    plain['kernel'].value, tract_optax.dense_stats(x / 255.0), 0.1
  )
  np.testing.assert_allclose(grads['kernel'].value, expected, rtol=2e-5, atol=1e-6)
  assert type(layer) is marked


# ----------------------------------------------------------------------------
# The refusal's suggestion: the layer that reads the image (issue 16, item 4c)


def _same_patch_rows(images):
  """float64 rows of every 3x3 'SAME' patch, features in Flax order (kh, kw, c)."""
  padded = np.pad(np.float64(images), ((0, 0), (1, 1), (1, 1), (0, 0)))
  batch, height, width, _ = images.shape
  rows = [
    padded[:, i : i + 3, j : j + 3, :].reshape(batch, -1)
    for i in range(height)
    for j in range(width)
  ]
  return np.stack(rows, 1).reshape(batch * height * width, -1)


def _tract_solve(rows, grad, lam=0.1):
  rows, grad = np.float64(rows), np.float64(grad)
  moment = rows.T @ rows / len(rows)
  return np.linalg.solve(moment + lam * np.eye(len(moment)), grad.reshape(len(moment), -1)).reshape(
    grad.shape
  )


def _relative(value, expected):
  return float(np.max(np.abs(np.float64(value) - expected)) / np.max(np.abs(expected)))


def _sinusoid(t):
  return jnp.concatenate(
    [jnp.sin(t[:, None] * jnp.arange(1.0, 5.0)), jnp.cos(t[:, None] * jnp.arange(1.0, 5.0))], -1
  )


class TinyUNet(nn.Module):
  """Diffusion style: the time-step MLP runs first, then the image stem and
  many blocks conditioned on the time embedding."""

  blocks: int = 6

  @nn.compact
  def __call__(self, image, t):
    temb = nn.Dense(8, name='time_0')(_sinusoid(t))
    temb = nn.Dense(8, name='time_1')(nn.silu(temb))
    h = nn.Conv(8, (3, 3), name='stem')(image)
    for i in range(self.blocks):
      h = h + nn.Conv(8, (3, 3), name=f'block_{i}')(nn.silu(h)) + temb[:, None, None, :]
    return nn.Conv(3, (3, 3), name='out')(h)


def test_linen_unet_refusal_suggests_the_stem_not_the_time_mlp_and_summarises():
  image, t = _normal((2, 8, 8, 3)), jnp.array([0.1, 0.7])
  model = TinyUNet()
  variables = model.init(jax.random.key(0), image, t)
  with pytest.raises(ValueError) as info:
    tract_linen.apply_with_stats(model, variables, image, t)
  message = str(info.value).split('\n')[0]
  assert message.startswith(
    "Several Conv/Dense layers take input computed from data alone: 'time_0' (nn.Dense, "
    "input float32[2,8]), 'stem' (nn.Conv, input float32[2,8,8,3])"
  ), message
  assert (
    'The other 8 Conv/Dense layers called take parameter-dependent input '
    "('time_1', 'block_0', 'block_1', ...)."
  ) in message, message
  assert message.endswith(
    "The first of them that reads the model's largest input (args[0], float32[2,8,8,3]) "
    "is 'stem': if it is the image stem, pass layers=['stem']. "
    'See docs/first_layer.md#found-by-definition.'
  ), message
  assert 'block_5' not in message and "layers=['time_0']" not in message
  assert len(message) < 700, len(message)
  # Following the advice preconditions the stem with the image's statistic.
  _, stats = tract_linen.apply_with_stats(model, variables, image, t, layers=['stem'])
  rows = _same_patch_rows(image)
  np.testing.assert_allclose(
    stats[('stem',)].moment, rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6
  )


class NNXTinyUNet(nnx.Module):
  def __init__(self, rngs):
    self.time = nnx.Linear(8, 8, rngs=rngs)
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.blocks = nnx.List([nnx.Conv(8, 8, (3, 3), rngs=rngs) for _ in range(4)])

  def __call__(self, t, *, image):
    temb = self.time(_sinusoid(t))
    h = self.stem(image)
    for block in self.blocks:
      h = h + block(nnx.silu(h)) + temb[:, None, None, :]
    return h


def test_nnx_unet_refusal_suggests_the_layer_reading_the_image_keyword():
  model = NNXTinyUNet(nnx.Rngs(0))
  with pytest.raises(ValueError) as info:
    tract_nnx.apply_tract(model, jnp.array([0.1, 0.7]), image=_normal((2, 8, 8, 3)))
  message = str(info.value)
  assert "'time' (nnx.Linear, input float32[2,8]), 'stem' (nnx.Conv, input " in message
  assert (
    'The other 4 Conv/Linear layers called take parameter-dependent input '
    "('blocks/0', 'blocks/1', 'blocks/2', ...)"
  ) in message, message
  assert (
    "reads the model's largest input (kwargs['image'], float32[2,8,8,3]) is 'stem': "
    "if it is the image stem, pass layers=['stem']."
  ) in message, message


class TwoScaledInputs(nn.Module):
  """Two data-only Dense layers on 2-D inputs; the image stem reads a scaled image."""

  @nn.compact
  def __call__(self, image, label, t):
    scale = self.param('scale', nn.initializers.ones, (3,))
    h = nn.Conv(4, (3, 3), name='stem')(image * scale).mean((1, 2))
    return h + nn.Dense(4, name='label_embed')(label) + nn.Dense(4, name='time')(_sinusoid(t))


def test_refusal_says_when_no_candidate_reads_the_largest_input():
  image, label, t = _normal((2, 6, 6, 3)), jax.nn.one_hot(jnp.arange(2), 4), jnp.ones(2)
  with pytest.raises(
    ValueError,
    match=r"Several Conv/Dense layers .*'label_embed' .*'time' .*"
    r"None of them reads the model's largest input \(args\[0\], "
    r'float32\[2,6,6,3\]\); name the image stem explicitly',
  ):
    _linen(TwoScaledInputs(), image, label, t)


def test_refusal_without_an_array_argument_of_three_dimensions():
  class TwoVectors(nn.Module):
    @nn.compact
    def __call__(self, a, b):
      return nn.Dense(2, name='a_embed')(a) + nn.Dense(2, name='b_embed')(b)

  with pytest.raises(
    ValueError,
    match=r"'a_embed' .*'b_embed' .*no array argument of 3 or "
    r'more dimensions to suggest one by',
  ):
    _linen(TwoVectors(), _normal((4, 3)), _normal((4, 5), seed=1))


# ----------------------------------------------------------------------------
# Eager models with data-dependent Python branches (item 8)


class BranchingModel(nn.Module):
  """Rescales raw pixels in an eager-only Python branch (plain apply runs it)."""

  @nn.compact
  def __call__(self, image):
    if float(jnp.max(image)) > 100:
      image = image / 255.0
    return nn.Dense(2, name='head')(nn.Conv(4, (3, 3), name='stem')(image).mean((1, 2)))


class NNXBranchingModel(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, image):
    if float(jnp.max(image)) > 100:
      image = image / 255.0
    return self.head(self.stem(image).mean((1, 2)))


_ABSTRACT_PROBE = (
  r'Automatic first-layer selection \(layers=None\) traces the model abstractly, '
  r'and the model turns an array into a Python value.*'
  r"Name the layer with layers=\[\.\.\.\] \(e\.g\. layers=\['stem'\]\) to skip the probe"
)


def test_linen_eager_data_dependent_branch_names_the_abstract_probe_and_layers():
  image = jnp.abs(_normal((2, 6, 6, 3))) * 100.0 + 50.0  # raw pixels: the branch is taken
  model = BranchingModel()
  variables = model.init(jax.random.key(0), image)
  with pytest.raises(TypeError, match=_ABSTRACT_PROBE) as info:
    tract_linen.apply_with_stats(model, variables, image)
  assert isinstance(info.value.__cause__, jax.errors.ConcretizationTypeError)

  def loss(params, **kwargs):
    out = tract_linen.apply_tract(model, {'params': params}, image, **kwargs)
    return jnp.sum(out**2)

  plain = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, image) ** 2))(variables['params'])
  expected = _tract_solve(_same_patch_rows(np.asarray(image) / 255.0), plain['stem']['kernel'])
  grads = jax.grad(functools.partial(loss, layers=['stem']))(variables['params'])
  assert _relative(grads['stem']['kernel'], expected) < 1e-4
  # Under jax.grad the choice is read off the (eager) pass itself: no probe.
  first_layer.clear_cache()
  grads = jax.grad(loss)(variables['params'])
  assert _relative(grads['stem']['kernel'], expected) < 1e-4


def test_nnx_eager_data_dependent_branch_names_the_abstract_probe_and_layers():
  image = jnp.abs(_normal((2, 6, 6, 3))) * 100.0 + 50.0
  model = NNXBranchingModel(nnx.Rngs(0))
  first_layer.clear_cache()
  with pytest.raises(TypeError, match=_ABSTRACT_PROBE):
    tract_nnx.apply_with_stats(model, image)
  grads = nnx.grad(lambda m: jnp.sum(tract_nnx.apply_tract(m, image, layers=['stem']) ** 2))(model)
  plain = nnx.grad(lambda m: jnp.sum(m(image) ** 2))(model)
  expected = _tract_solve(_same_patch_rows(np.asarray(image) / 255.0), plain['stem']['kernel'][...])
  assert _relative(grads['stem']['kernel'][...], expected) < 1e-4
  # Under nnx.grad the choice is read off the (eager) pass itself: no probe.
  grads = nnx.grad(lambda m: jnp.sum(tract_nnx.apply_tract(m, image) ** 2))(model)
  assert _relative(grads['stem']['kernel'][...], expected) < 1e-4


# ----------------------------------------------------------------------------
# Automatic selection through scan (item 16)


class ScanCell(nn.Module):
  @nn.compact
  def __call__(self, h, x):
    h = jnp.tanh(nn.Dense(4, name='inp')(x) + nn.Dense(4, name='rec')(h))
    return h, h


class ScanRNN(nn.Module):
  @nn.compact
  def __call__(self, xs):  # (T, B, F)
    scan = nn.scan(
      ScanCell,
      variable_broadcast='params',
      split_rngs={'params': False},
      variable_axes={tract_linen.COLLECTION: 0},
      in_axes=0,
      out_axes=0,
    )
    h, _ = scan(name='cell')(jnp.zeros((xs.shape[1], 4)), xs)
    return nn.Dense(2, name='head')(h)


def test_linen_automatic_selection_through_nn_scan():
  """nn.scan traces its body once more to check loop invariants, and throws
  that trace away: its calls must not make the verdict unknown."""
  xs = _normal((5, 3, 6))
  model = ScanRNN()
  variables = model.init(jax.random.key(0), xs)
  _, stats = _linen(model, xs)
  assert list(stats) == [('cell', 'inp')]
  rows = np.float64(xs).reshape(-1, 6)  # every step's rows together
  np.testing.assert_allclose(
    stats[('cell', 'inp')].moment, rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6
  )

  def loss(params, apply):
    return jnp.sum(apply({'params': params}) ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  grads = grad(variables['params'], lambda v: tract_linen.apply_tract(model, v, xs))
  plain = grad(variables['params'], lambda v: model.apply(v, xs))
  expected = _tract_solve(rows, plain['cell']['inp']['kernel'])
  assert _relative(grads['cell']['inp']['kernel'], expected) < 1e-4
  np.testing.assert_allclose(
    grads['cell']['rec']['kernel'], plain['cell']['rec']['kernel'], rtol=1e-5, atol=1e-7
  )


class NNXScanRNN(nnx.Module):
  def __init__(self, rngs):
    self.inp = nnx.Linear(6, 4, rngs=rngs)
    self.rec = nnx.Linear(4, 4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, xs):
    axes = nnx.StateAxes({tract_nnx.TractInputStats: 0, ...: nnx.Carry})

    @nnx.scan(in_axes=(axes, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def step(model, h, x):
      h = jnp.tanh(model.inp(x) + model.rec(h))
      return h, h

    h, _ = step(self, jnp.zeros((xs.shape[1], 4)), xs)
    return self.head(h)


def test_nnx_automatic_selection_through_nnx_scan():
  xs = _normal((5, 3, 6))
  model = NNXScanRNN(nnx.Rngs(0))
  _, stats = tract_nnx.apply_with_stats(model, xs)
  assert list(stats) == [('inp',)]
  rows = np.float64(xs).reshape(-1, 6)
  np.testing.assert_allclose(
    stats[('inp',)].moment, rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6
  )


# ----------------------------------------------------------------------------
# The model traced once: the probe's choice is cached by structure and shapes


def _counting_linen(runs, stem_first=True):
  class Net(nn.Module):
    """Two square layers in a row; the flag says which one is called first."""

    first_is_stem: bool = True

    @nn.compact
    def __call__(self, x):
      runs.append('call')
      stem, other = nn.Dense(4, name='stem'), nn.Dense(4, name='other')
      first, second = (stem, other) if self.first_is_stem else (other, stem)
      out = nn.Dense(2, name='head')(second(nn.relu(first(x))))
      runs.append('end')  # the pass ran to the end of the model
      return out

  return Net(first_is_stem=stem_first)


def _runs_in_trace(runs, fn, *args):
  """(model calls, model calls that ran to the end) in one new trace of ``fn``."""
  runs.clear()
  jax.make_jaxpr(fn)(*args)  # a new function each time: a new trace
  return runs.count('call'), runs.count('end')


def test_linen_model_runs_per_trace():
  first_layer.clear_cache()
  runs = []
  model = _counting_linen(runs)
  x = _normal((8, 4))
  params = model.init(jax.random.key(0), x)['params']

  def with_stats(p, x):
    return tract_linen.apply_with_stats(model, {'params': p}, x)

  def tract(p, x):
    return tract_linen.apply_tract(model, {'params': p}, x, lam=0.1)

  # the probe (abstract) and the pass; then the pass alone, the choice cached
  assert _runs_in_trace(runs, lambda p, x: with_stats(p, x), params, x) == (2, 2)
  assert _runs_in_trace(runs, lambda p, x: with_stats(p, x), params, x) == (1, 1)
  # the gradient route: the statistics pass ends at the stem, then the main pass
  assert _runs_in_trace(runs, lambda p, x: tract(p, x), params, x) == (2, 1)
  # another batch shape is another key: probed again, then cached
  assert _runs_in_trace(runs, lambda p, x: with_stats(p, x), params, x[:4]) == (2, 2)
  assert _runs_in_trace(runs, lambda p, x: with_stats(p, x), params, x[:4]) == (1, 1)
  first_layer.clear_cache()
  assert _runs_in_trace(runs, lambda p, x: tract(p, x), params, x) == (3, 2)

  def named(p, x):  # layers=: no probe at all
    return tract_linen.apply_tract(model, {'params': p}, x, layers=['stem'])

  assert _runs_in_trace(runs, named, params, x) == (2, 1)


def test_linen_cached_choice_follows_the_module_fields():
  """Equal structure and shapes, other settings: each gets its own verdict."""
  first_layer.clear_cache()
  runs = []
  x = _normal((8, 4))
  net = type(_counting_linen(runs))  # one class: the key differs by the field alone
  variables = net().init(jax.random.key(0), x)  # the same params for both settings
  for stem_first, expected in [(True, 'stem'), (False, 'other'), (True, 'stem')]:
    model = net(first_is_stem=stem_first)
    _, stats = tract_linen.apply_with_stats(model, variables, x)
    assert list(stats) == [(expected,)]


def test_nnx_model_runs_per_trace():
  first_layer.clear_cache()
  runs = []

  class Net(nnx.Module):
    def __init__(self):
      self.stem = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(1))

    def __call__(self, x):
      runs.append('call')
      out = self.head(nnx.relu(self.stem(x)))
      runs.append('end')
      return out

  model = Net()
  x = _normal((8, 3))
  graphdef, state = nnx.split(model)

  def with_stats(state, x):
    return tract_nnx.apply_with_stats(nnx.merge(graphdef, state), x)[1]

  def tract(state, x):
    return tract_nnx.apply_tract(nnx.merge(graphdef, state), x, lam=0.1)

  assert _runs_in_trace(runs, lambda s, x: with_stats(s, x), state, x) == (2, 2)
  assert _runs_in_trace(runs, lambda s, x: with_stats(s, x), state, x) == (1, 1)
  # the gradient route: the statistics pass (on a copy) ends at the stem
  assert _runs_in_trace(runs, lambda s, x: tract(s, x), state, x) == (2, 1)
  first_layer.clear_cache()
  assert _runs_in_trace(runs, lambda s, x: tract(s, x), state, x) == (3, 2)
  # the gradient is still TrAct's: the cached choice is the stem
  grads = nnx.grad(lambda m: jnp.sum(tract_nnx.apply_tract(m, x, lam=0.1) ** 2))(model)
  plain = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
  expected = tract_optax.precondition(plain['stem']['kernel'][...], tract_optax.dense_stats(x), 0.1)
  np.testing.assert_allclose(grads['stem']['kernel'][...], expected, rtol=2e-5, atol=1e-6)


def test_a_module_that_cannot_be_hashed_is_probed_every_time():
  first_layer.clear_cache()
  runs = []

  class Listed(nn.Module):
    sizes: list  # a list field: the module cannot be hashed, nor its choice cached

    @nn.compact
    def __call__(self, x):
      runs.append('call')
      for index, size in enumerate(self.sizes):
        x = nn.relu(nn.Dense(size, name=f'dense_{index}')(x))
      runs.append('end')
      return x

  model = Listed(sizes=[4, 2])
  x = _normal((8, 3))
  params = model.init(jax.random.key(0), x)['params']
  for _ in range(2):
    assert _runs_in_trace(
      runs, lambda p, x: tract_linen.apply_with_stats(model, {'params': p}, x)[1], params, x
    ) == (2, 2)
  _, stats = tract_linen.apply_with_stats(model, {'params': params}, x)
  assert list(stats) == [('dense_0',)]


class CustomStem(nn.Module):
  """A stem of the user's own: self.param and lax.conv, then a Flax Conv."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param('stem_kernel', nn.initializers.lecun_normal(), (3, 3, 3, 4))
    x = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return nn.Dense(2, name='head')(nn.Conv(4, (3, 3), name='conv')(x).mean((1, 2)))


def test_a_custom_stem_is_named_as_unseen_not_a_conv_after_it_as_the_stem():
  with pytest.raises(ValueError) as refused:
    _linen(CustomStem(), _normal((2, 6, 6, 3)))
  message = str(refused.value)
  assert 'A stem of your own (self.param with lax.conv) is not seen' in message
  assert 'tract_optax.conv / dense' in message
  assert "reads the model's largest input" not in message  # the conv reads the stem's output


# ----------------------------------------------------------------------------
# The choice read off the differentiated pass itself (no probe trace)


def _counting_grad_loss(model, route, **kwargs):
  def loss(params, x):
    variables = {'params': params}
    if route == 'stats':
      out, stats = tract_linen.apply_with_stats(model, variables, x, **kwargs)
      return jnp.sum(out**2) + sum(jnp.sum(s.moment) for s in stats.values())
    return jnp.sum(tract_linen.apply_tract(model, variables, x, lam=0.1, **kwargs) ** 2)

  return loss


@pytest.mark.parametrize('route', ['stats', 'tract'])
def test_linen_differentiated_pass_chooses_without_the_probe(route):
  first_layer.clear_cache()
  runs = []
  model = _counting_linen(runs)
  x = _normal((8, 4))
  params = model.init(jax.random.key(0), x)['params']
  loss = _counting_grad_loss(model, route)
  expected_runs = (1, 1) if route == 'stats' else (2, 1)  # tract: the statistics pass stops early
  assert _runs_in_trace(runs, jax.grad(loss), params, x) == expected_runs
  assert _runs_in_trace(runs, jax.grad(loss), params, x) == expected_runs  # cached
  if route == 'tract':
    grads = jax.grad(loss)(params, x)
    plain = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 2))(params)
    expected = tract_optax.precondition(plain['stem']['kernel'], tract_optax.dense_stats(x), 0.1)
    np.testing.assert_allclose(grads['stem']['kernel'], expected, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(grads['other']['kernel'], plain['other']['kernel'])


@pytest.mark.parametrize('route', ['stats', 'tract'])
def test_linen_pass_differentiated_in_part_asks_the_probe(route):
  """A gradient in some parameters only, in the input too, or one that
  differentiates the pass only after it ran (``jax.checkpoint``) tells
  nothing: the probe runs first (an extra model run), the choice the same."""
  runs = []
  model = _counting_linen(runs)
  x = _normal((8, 4))
  params = model.init(jax.random.key(0), x)['params']
  loss = _counting_grad_loss(model, route)

  def head_only(head, other, x):
    return loss({**other, 'head': head}, x)

  others = {k: v for k, v in params.items() if k != 'head'}
  extra = 1  # the probe's abstract run, to the end of the model
  full = (1, 1) if route == 'stats' else (2, 1)
  for fn, args in [
    (jax.grad(head_only), (params['head'], others, x)),
    (jax.grad(loss, argnums=(0, 1)), (params, x)),
    (loss, (params, x)),  # no gradient at all
    (jax.grad(jax.checkpoint(loss)), (params, x)),  # differentiated after the pass
  ]:
    first_layer.clear_cache()
    assert _runs_in_trace(runs, fn, *args) == (full[0] + extra, full[1] + extra)
  _, stats = tract_linen.apply_with_stats(model, {'params': params}, x)
  assert list(stats) == [('stem',)]


@pytest.mark.parametrize(
  'model,inputs',
  [
    (ConditionedCNN(), lambda: (_normal((2, 6, 6, 3)), jax.nn.one_hot(jnp.arange(2), 4))),
    (TimeEmbedding(), lambda: (_normal((2, 6, 6, 3)), jnp.arange(2.0))),
    (LearnedNormalization(), lambda: (_normal((2, 6, 6, 3)),)),
    (TokenFirst(), lambda: (_normal((2, 6, 6, 3)), jnp.zeros((2, 5), jnp.int32))),
  ],
  ids=['label-first', 'time-embedding', 'learned-scale', 'token-first'],
)
@pytest.mark.parametrize('route', ['stats', 'tract'])
def test_linen_refusals_under_grad_are_the_probes(model, inputs, route):
  """Where the pass cannot accept, the probe words the refusal: the message
  under jax.grad is the one without a gradient."""
  args = inputs()
  params = model.init(jax.random.key(0), *args)['params']
  first_layer.clear_cache()
  with pytest.raises(ValueError) as without_grad:
    tract_linen.apply_with_stats(model, {'params': params}, *args)

  def loss(p):
    if route == 'stats':
      return jnp.sum(tract_linen.apply_with_stats(model, {'params': p}, *args)[0])
    return jnp.sum(tract_linen.apply_tract(model, {'params': p}, *args, lam=0.1))

  first_layer.clear_cache()
  with pytest.raises(ValueError) as under_grad:
    jax.jit(jax.grad(loss))(params)
  assert str(under_grad.value) == str(without_grad.value)


def test_linen_error_of_the_provisional_pass_is_raised_after_the_probe_accepts():
  """The first layer called is the stem, but a subclass the glue refuses: the
  pass's own refusal is raised (the probe accepts the layer)."""

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name='head')(StdConv(4, (3, 3), name='stem')(x).mean((1, 2)))

  x = _normal((2, 6, 6, 3))
  params = Model().init(jax.random.key(0), x)['params']
  first_layer.clear_cache()
  loss = _counting_grad_loss(Model(), 'tract')
  with pytest.raises(ValueError, match=r"'stem' is a nn.StdConv: its class StdConv overrides"):
    jax.grad(loss)(params, x)


@pytest.mark.parametrize('route', ['stats', 'tract'])
def test_nnx_differentiated_pass_chooses_without_the_probe(route):
  runs = []

  class Net(nnx.Module):
    def __init__(self):
      self.stem = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      self.other = nnx.Linear(4, 4, rngs=nnx.Rngs(1))
      self.bn = nnx.BatchNorm(4, rngs=nnx.Rngs(2))
      self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(3))

    def __call__(self, x):
      runs.append('call')
      out = self.head(self.bn(self.other(nnx.relu(self.stem(x)))))
      runs.append('end')
      return out

  x = _normal((8, 3))

  def loss(model, x):
    if route == 'stats':
      out, stats = tract_nnx.apply_with_stats(model, x)
      return jnp.sum(out**2) + sum(jnp.sum(s.moment) for s in stats.values())
    return jnp.sum(tract_nnx.apply_tract(model, x, lam=0.1) ** 2)

  expected_runs = (1, 1) if route == 'stats' else (2, 1)
  for cached in (False, True):
    model = Net()
    graphdef, state = nnx.split(model)
    if not cached:
      first_layer.clear_cache()
    grad = nnx.grad(loss)
    assert _runs_in_trace(runs, lambda s, x: grad(nnx.merge(graphdef, s), x), state, x) == (
      expected_runs
    )
  # the same choice as named explicitly: gradient and BatchNorm state alike
  first_layer.clear_cache()
  chosen, named = Net(), Net()
  if route == 'stats':

    def loss_and_stats(model, x):
      out, stats = tract_nnx.apply_with_stats(model, x)
      return jnp.sum(out**2), stats

    _, stats = nnx.grad(loss_and_stats, has_aux=True)(chosen, x)
    assert list(stats) == [('stem',)]
    return
  grads = nnx.grad(loss)(chosen, x)
  expected = nnx.grad(
    lambda m, x: jnp.sum(tract_nnx.apply_tract(m, x, lam=0.1, layers=['stem']) ** 2)
  )(named, x)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(grads), nnx.state(expected))
  jax.tree.map(
    np.testing.assert_array_equal, nnx.state(chosen, nnx.BatchStat), nnx.state(named, nnx.BatchStat)
  )


def test_linen_pass_and_probe_that_disagree_are_refused_not_run_twice():
  """A model whose call order changes from call to call: the pass took one
  layer, the probe (the next call) finds another; refused, with the fix."""
  calls = []

  class Alternating(nn.Module):
    @nn.compact
    def __call__(self, x):
      calls.append(None)
      scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
      a, b = nn.Dense(4, name='a'), nn.Dense(4, name='b')
      if len(calls) <= 2:  # the two passes: 'a' first, reading a learned scale
        return a(x * scale) + b(x)
      return b(x) + a(x * scale)  # later calls (the probe): 'b' first, on data

  model = Alternating()
  x = _normal((8, 3))
  params = model.init(jax.random.key(0), x)['params']
  calls.clear()
  first_layer.clear_cache()
  loss = _counting_grad_loss(model, 'tract')
  with pytest.raises(ValueError, match=r"called, 'a', is not the one the probe finds, 'b'"):
    jax.grad(loss)(params, x)
  assert len(calls) == 3  # statistics pass, main pass, probe: no second main pass


def test_linen_nn_scan_first_layer_read_off_the_pass(monkeypatch):
  """Through nn.scan (its markers' rules run as the scan is differentiated)
  the pass alone decides: the probe is never asked."""
  xs = _normal((5, 3, 6))
  model = ScanRNN()
  variables = model.init(jax.random.key(0), xs)

  def no_probe(*args, **kwargs):
    raise AssertionError('the probe ran')

  monkeypatch.setattr(first_layer.DependencyProbe, 'select', no_probe)
  first_layer.clear_cache()

  def loss(params, apply):
    return jnp.sum(apply({'params': params}) ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  grads = grad(variables['params'], lambda v: tract_linen.apply_tract(model, v, xs))
  plain = grad(variables['params'], lambda v: model.apply(v, xs))
  rows = np.float64(xs).reshape(-1, 6)
  expected = _tract_solve(rows, plain['cell']['inp']['kernel'])
  assert _relative(grads['cell']['inp']['kernel'], expected) < 1e-4
  np.testing.assert_allclose(
    grads['cell']['rec']['kernel'], plain['cell']['rec']['kernel'], rtol=1e-5, atol=1e-7
  )


def test_nnx_scan_first_layer_read_off_the_pass(monkeypatch):
  xs = _normal((5, 3, 6))
  model = NNXScanRNN(nnx.Rngs(0))

  def no_probe(*args, **kwargs):
    raise AssertionError('the probe ran')

  monkeypatch.setattr(first_layer.DependencyProbe, 'select', no_probe)
  first_layer.clear_cache()

  def loss_and_stats(m):
    out, stats = tract_nnx.apply_with_stats(m, xs)
    return jnp.sum(out**2), stats

  _, stats = nnx.grad(loss_and_stats, has_aux=True)(model)
  assert list(stats) == [('inp',)]
  rows = np.float64(xs).reshape(-1, 6)
  np.testing.assert_allclose(
    stats[('inp',)].moment, rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6
  )
