"""Flax wrappers around the first layer, half precision, and misuse messages.

Issue 16, items 1, 4e, 11 and 17: reparameterisation wrappers (spectral and
weight normalisation, ``map_variables`` for weight standardisation or masks)
hand the layer a function of its stored kernel, so both routes refuse them;
a half-precision layer's statistic is that of the input it multiplies; a
Hugging Face-style wrapper, a module's ``__call__`` and a restored optimizer
state without its ``TractState`` get messages that name the fix.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import tract_optax
from tests import reference
from tract_optax import linen as tract_linen
from tract_optax import nnx as tract_nnx

LAM = 0.1
FIX = r'Apply TrAct to a plain layer, or select another with layers=\[\.\.\.\]'


def _data(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _standardise(tree):
  """Weight standardisation of every kernel (the BiT / ``map_variables`` idiom)."""

  def one(path, leaf):
    if getattr(path[-1], 'key', None) != 'kernel':
      return leaf
    axes = tuple(range(leaf.ndim - 1))
    return (leaf - leaf.mean(axes)) / (leaf.std(axes) + 1e-5)

  return jax.tree_util.tree_map_with_path(one, tree)


def _causal_mask(tree):
  """A lower-triangular kernel mask (the causal-dense idiom)."""

  def one(path, leaf):
    if getattr(path[-1], 'key', None) != 'kernel':
      return leaf
    return leaf * jnp.tril(jnp.ones(leaf.shape))

  return jax.tree_util.tree_map_with_path(one, tree)


# ----------------------------------------------------------------------------
# Linen: the wrapped layer is the first layer; auto-selection finds it


def _linen_stem(kind):
  conv = kind.endswith('conv')
  layer = nn.Conv if conv else nn.Dense
  size = {'kernel_size': (3, 3)} if conv else {}
  if kind.startswith('standardised'):
    return nn.map_variables(layer, 'params', trans_in_fn=_standardise, init=True)(
      4, name='stem', **size
    ), "nn.map_variables \\(scope 'map_variables\\(stem\\)'\\)"
  if kind == 'masked_dense':
    return nn.map_variables(layer, 'params', trans_in_fn=_causal_mask, init=True)(
      4, name='stem'
    ), "nn.map_variables \\(scope 'map_variables\\(stem\\)'\\)"
  wrapper = nn.SpectralNorm if kind.startswith('spectral') else nn.WeightNorm
  return wrapper(layer(4, name='inner', **size), name='stem'), f"nn.{wrapper.__name__} 'stem'"


class LinenWrapped(nn.Module):
  kind: str

  @nn.compact
  def __call__(self, x):
    stem, _ = _linen_stem(self.kind)
    kwargs = {'update_stats': False} if self.kind.startswith('spectral') else {}
    h = nn.relu(stem(x, **kwargs))
    return nn.Dense(2, name='head')(h.reshape(h.shape[0], -1))


LINEN_KINDS = [
  'standardised_dense',
  'masked_dense',
  'spectral_dense',
  'weightnorm_dense',
  'standardised_conv',
  'spectral_conv',
  'weightnorm_conv',
]


def _linen_case(kind):
  shape = (4, 6, 6, 3) if kind.endswith('conv') else (8, 6)
  x = _data(shape)
  model = LinenWrapped(kind)
  return model, model.init(jax.random.key(1), x), x


@pytest.mark.parametrize('route', ['apply_with_stats', 'apply_tract'])
@pytest.mark.parametrize('kind', LINEN_KINDS)
def test_linen_wrapped_first_layer_is_refused(kind, route):
  model, variables, x = _linen_case(kind)
  _, wrapper = _linen_stem(kind)
  layer = 'stem' if kind in ('standardised_dense', 'masked_dense', 'standardised_conv') else 'inner'
  layer_type = 'nn.Conv' if kind.endswith('conv') else 'nn.Dense'

  def loss(params):
    return jnp.sum(tract_linen.apply_tract(model, {**variables, 'params': params}, x))

  def call():
    if route == 'apply_with_stats':
      return tract_linen.apply_with_stats(model, variables, x)
    return jax.grad(loss)(variables['params'])

  with pytest.raises(ValueError) as info:
    call()
  message = str(info.value)
  assert f"The layer '{layer}' is a {layer_type} wrapped by " in message
  assert re.search(wrapper, message), message
  assert re.search(FIX, message), message
  assert 'not linear in the stored kernel' in message
  assert 'variable_axes' not in message  # item 11: the real reason, not lifting advice


@pytest.mark.parametrize('kind', ['spectral_dense', 'weightnorm_conv'])
def test_linen_wrapped_layer_named_explicitly_is_refused(kind):
  model, variables, x = _linen_case(kind)
  with pytest.raises(ValueError, match=r"The layer 'inner' is a .* wrapped by nn\."):
    tract_linen.apply_with_stats(model, variables, x, layers=['inner'])


def test_linen_wrapped_layer_under_jit_is_refused():
  model, variables, x = _linen_case('standardised_dense')
  with pytest.raises(ValueError, match=r'wrapped by nn\.map_variables'):
    jax.jit(lambda v, x: tract_linen.apply_tract(model, v, x))(variables, x)


def test_linen_layer_input_stats_refuses_a_bound_wrapped_layer():
  model, variables, x = _linen_case('weightnorm_dense')
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and context.module.name == 'inner':
      seen.append(context.module.path)
      tract_linen.layer_input_stats(context.module, args[0])
    return next_fun(*args, **kwargs)

  with pytest.raises(ValueError, match=r"The layer 'inner' is a nn\.Dense wrapped by nn\.map_var"):
    with nn.intercept_methods(interceptor):
      model.apply(variables, x)
  assert seen == [('inner',)]


class IdentityMapped(nn.Module):
  """``map_variables`` that hands the kernel on untouched (e.g. metadata only)."""

  @nn.compact
  def __call__(self, x):
    stem = nn.map_variables(nn.Dense, 'params', lambda tree: tree, mutable=True)(4, name='stem')
    return nn.Dense(2, name='head')(nn.relu(stem(x)))


@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'jit'])
def test_linen_map_variables_that_keeps_the_kernel_is_exact(jit):
  x = _data((16, 6))
  model = IdentityMapped()
  variables = model.init(jax.random.key(0), x)

  def loss(params):
    return jnp.mean(tract_linen.apply_tract(model, {'params': params}, x, lam=LAM) ** 2)

  def grads(params):
    return jax.grad(loss)(params)

  got = (jax.jit(grads) if jit else grads)(variables['params'])
  plain = jax.grad(lambda p: jnp.mean(model.apply({'params': p}, x) ** 2))(variables['params'])
  rows = np.asarray(x, np.float64)
  expected = np.linalg.solve(
    rows.T @ rows / rows.shape[0] + LAM * np.eye(6), np.asarray(plain['stem']['kernel'], np.float64)
  )
  assert reference.rel_err(got['stem']['kernel'], expected) < 1e-5
  np.testing.assert_allclose(got['head']['kernel'], plain['head']['kernel'], rtol=1e-6)


# ----------------------------------------------------------------------------
# NNX: wrappers hold the layer as their layer_instance; in-place rewrites


class Standardised(nnx.Module):
  """A hand-written wrapper that rewrites the kernel it holds before each call."""

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x):
    kernel = self.layer.kernel[...]
    axes = tuple(range(kernel.ndim - 1))
    self.layer.kernel[...] = (kernel - kernel.mean(axes)) / (kernel.std(axes) + 1e-5)
    return self.layer(x)


# Flax 0.11.2 (the lower bound) has neither wrapper: its NNX has nothing to refuse there.
needs_nnx_wrappers = pytest.mark.skipif(
  not (hasattr(nnx, 'WeightNorm') and hasattr(nnx, 'SpectralNorm')),
  reason='nnx.WeightNorm / nnx.SpectralNorm are newer than this Flax',
)


class NNXWrapped(nnx.Module):
  def __init__(self, kind):
    rngs = nnx.Rngs(0)
    conv = kind.endswith('conv')
    layer = nnx.Conv(3, 4, (3, 3), rngs=rngs) if conv else nnx.Linear(6, 4, rngs=rngs)
    if kind.startswith('weightnorm'):
      self.stem = nnx.WeightNorm(layer, rngs=rngs)
    elif kind.startswith('spectral'):
      self.stem = nnx.SpectralNorm(layer, rngs=rngs)
    else:
      self.stem = Standardised(layer)
    self.head = nnx.Linear(4 * 36 if conv else 4, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.stem(x))
    return self.head(h.reshape(h.shape[0], -1))


NNX_KINDS = [
  'weightnorm_dense',
  'spectral_dense',
  'standardised_dense',
  'weightnorm_conv',
  'spectral_conv',
  'standardised_conv',
]


def _nnx_call(route, model, x):
  if route == 'apply_with_stats':
    return tract_nnx.apply_with_stats(model, x)
  if route == 'apply_tract':
    return nnx.grad(lambda m: jnp.sum(tract_nnx.apply_tract(m, x)))(model)
  return tract_nnx.value_and_grad_with_stats(lambda m, x: jnp.sum(m(x)), model, x)


def _leaves(model):
  return [np.array(leaf) for leaf in jax.tree_util.tree_leaves(nnx.state(model))]


@pytest.mark.parametrize('route', ['apply_with_stats', 'apply_tract', 'value_and_grad'])
@pytest.mark.parametrize('kind', NNX_KINDS)
@needs_nnx_wrappers
def test_nnx_wrapped_first_layer_is_refused(kind, route):
  model = NNXWrapped(kind)
  x = _data((4, 6, 6, 3) if kind.endswith('conv') else (8, 6))
  before = _leaves(model)
  layer_type = 'nnx.Conv' if kind.endswith('conv') else 'nnx.Linear'
  if kind.startswith('standardised'):
    where = f"'stem/layer' is a {layer_type} wrapped by a module that wrote a new kernel"
  else:
    wrapper = 'WeightNorm' if kind.startswith('weightnorm') else 'SpectralNorm'
    where = f"'stem/layer_instance' is a {layer_type} wrapped by nnx.{wrapper} 'stem'"
  with pytest.raises(ValueError) as info:
    _nnx_call(route, model, x)
  message = str(info.value)
  assert where in message, message
  assert re.search(FIX, message), message
  if not (kind.startswith('standardised') and route == 'apply_with_stats'):
    # refused before the pass (wrappers) or on copies: the model is untouched;
    # a hand-written wrapper on the model itself has run as a plain call would
    for got, want in zip(_leaves(model), before, strict=True):
      np.testing.assert_array_equal(got, want)


@needs_nnx_wrappers
def test_nnx_apply_tract_on_weightnorm_leaves_the_kernel_as_it_was():
  # before the fix: column norms [1.098, 1.001, 1.139, 0.864] after apply_tract,
  # where a plain call leaves [1, 1, 1, 1]; now refused with no change at all
  model = NNXWrapped('weightnorm_dense')
  kernel = np.array(model.stem.layer_instance.kernel[...])
  with pytest.raises(ValueError, match=r'nnx\.WeightNorm'):
    tract_nnx.apply_tract(model, _data((8, 6)))
  np.testing.assert_array_equal(model.stem.layer_instance.kernel[...], kernel)


@needs_nnx_wrappers
def test_nnx_wrapped_layer_named_explicitly_or_under_jit_is_refused():
  model = NNXWrapped('spectral_dense')
  x = _data((8, 6))
  with pytest.raises(ValueError, match=r"wrapped by nnx\.SpectralNorm 'stem'"):
    tract_nnx.apply_with_stats(model, x, layers=['stem/layer_instance'])
  hand_written = NNXWrapped('standardised_dense')
  with pytest.raises(ValueError, match='wrapped by a module that wrote a new kernel'):
    nnx.jit(lambda m, x: tract_nnx.apply_tract(m, x))(hand_written, x)


@needs_nnx_wrappers
def test_nnx_layer_beside_a_wrapper_is_still_exact():
  # the head (not held by the wrapper) may be selected; its statistic is exact
  model = NNXWrapped('weightnorm_dense')
  x = _data((8, 6))
  _, stats = tract_nnx.apply_with_stats(model, x, layers=['head'])
  hidden = np.asarray(nnx.relu(model.stem(x)), np.float64)
  np.testing.assert_allclose(stats[('head',)].moment, hidden.T @ hidden / 8, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Half precision: the statistic of the input the layer multiplies


def _rounded_moment(x, dtype, conv):
  rounded = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
  if conv:
    pads = [reference.same_pads(s, 3, 1, 1) for s in rounded.shape[1:3]]
    rounded = reference.explicit_patches(rounded, (3, 3), (1, 1), pads, (1, 1))
  return rounded.T @ rounded / rounded.shape[0]


class LinenHalf(nn.Module):
  dtype: jnp.dtype
  conv: bool

  @nn.compact
  def __call__(self, x):
    if self.conv:
      h = nn.Conv(4, (3, 3), dtype=self.dtype, name='stem')(x)
    else:
      h = nn.Dense(4, dtype=self.dtype, name='stem')(x)
    h = nn.relu(h).astype(jnp.float32)
    return nn.Dense(2, name='head')(h.reshape(h.shape[0], -1))


def _half_input(conv):
  # values whose float16/bfloat16 rounding moves the statistic measurably
  x = _data((4, 5, 5, 3) if conv else (64, 6), seed=3) * 3.0 + 1.0
  return x


@pytest.mark.parametrize(
  'conv', [pytest.param(False, id='dense'), pytest.param(True, id='conv', marks=pytest.mark.slow)]
)
@pytest.mark.parametrize('dtype', [jnp.float16, jnp.bfloat16], ids=['float16', 'bfloat16'])
def test_linen_half_precision_statistic_is_of_the_rounded_input(dtype, conv):
  x = _half_input(conv)
  model = LinenHalf(dtype, conv)
  variables = model.init(jax.random.key(0), x)
  moment = _rounded_moment(x, dtype, conv)
  # before the fix the statistic was of the float32 input: 6.8e-4 (float16) /
  # 4.5e-3 (bfloat16) off the rounded input's
  _, stats = tract_linen.apply_with_stats(model, variables, x)
  assert stats[('stem',)].moment.dtype == jnp.float32
  assert reference.rel_err(stats[('stem',)].moment, moment) < 1e-6

  def loss(params):
    return jnp.mean(tract_linen.apply_tract(model, {'params': params}, x, lam=LAM) ** 2)

  got = jax.grad(loss)(variables['params'])['stem']['kernel']
  plain = jax.grad(lambda p: jnp.mean(model.apply({'params': p}, x) ** 2))(variables['params'])
  grad = np.asarray(plain['stem']['kernel'], np.float64)
  expected = np.linalg.solve(moment + LAM * np.eye(moment.shape[0]), grad.reshape(len(moment), -1))
  assert reference.rel_err(np.asarray(got).reshape(expected.shape), expected) < 1e-5


class NNXHalf(nnx.Module):
  def __init__(self, dtype, conv):
    rngs = nnx.Rngs(0)
    self.conv = conv
    if conv:
      self.stem = nnx.Conv(3, 4, (3, 3), dtype=dtype, rngs=rngs)
      self.head = nnx.Linear(4 * 25, 2, rngs=rngs)
    else:
      self.stem = nnx.Linear(6, 4, dtype=dtype, rngs=rngs)
      self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.stem(x)).astype(jnp.float32)
    return self.head(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize('conv', [False, True], ids=['dense', 'conv'])
@pytest.mark.parametrize('dtype', [jnp.float16, jnp.bfloat16], ids=['float16', 'bfloat16'])
def test_nnx_half_precision_statistic_is_of_the_rounded_input(dtype, conv):
  x = _half_input(conv)
  model = NNXHalf(dtype, conv)
  moment = _rounded_moment(x, dtype, conv)
  _, stats = tract_nnx.apply_with_stats(model, x)
  assert reference.rel_err(stats[('stem',)].moment, moment) < 1e-6
  _, _, stats = tract_nnx.value_and_grad_with_stats(lambda m, x: jnp.mean(m(x) ** 2), model, x)
  assert reference.rel_err(stats[('stem',)].moment, moment) < 1e-6

  got = nnx.grad(lambda m: jnp.mean(tract_nnx.apply_tract(m, x, lam=LAM) ** 2))(model)
  plain = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
  grad = np.asarray(plain['stem']['kernel'][...], np.float64)
  expected = np.linalg.solve(moment + LAM * np.eye(moment.shape[0]), grad.reshape(len(moment), -1))
  got_kernel = np.asarray(got['stem']['kernel'][...]).reshape(expected.shape)
  assert reference.rel_err(got_kernel, expected) < 1e-5


def test_layer_input_stats_follows_the_layer_dtype():
  x = _half_input(False)
  for dtype in (jnp.float16, jnp.bfloat16):
    stats = tract_linen.layer_input_stats(nn.Dense(4, dtype=dtype), x)
    assert reference.rel_err(stats.moment, _rounded_moment(x, dtype, False)) < 1e-6
  exact = tract_linen.layer_input_stats(nn.Dense(4), x)  # dtype=None: never rounded
  rows = np.asarray(x, np.float64)
  assert reference.rel_err(exact.moment, rows.T @ rows / rows.shape[0]) < 1e-6


# ----------------------------------------------------------------------------
# Messages: wrappers of the model, a module's __call__, a restored state


class Net(nn.Module):
  @nn.compact
  def __call__(self, pixel_values):
    return nn.Dense(2)(nn.relu(nn.Dense(4)(pixel_values)))


class HubStyleModel:
  """A Hugging Face Flax-style wrapper: ``.module``, ``.params``, its own ``__call__``."""

  def __init__(self):
    self.module = Net()
    self.params = self.module.init(jax.random.key(0), jnp.ones((2, 3)))['params']

  def __call__(self, pixel_values, params=None):
    params = self.params if params is None else params
    return self.module.apply({'params': params}, pixel_values)


@pytest.mark.parametrize('route', [tract_linen.apply_tract, tract_linen.apply_with_stats])
def test_hub_style_wrapper_is_pointed_to_its_module(route):
  model, x = HubStyleModel(), jnp.ones((4, 3))
  name = route.__name__
  for given, shown in ((model.__call__, 'HubStyleModel.__call__'), (model, 'HubStyleModel')):
    with pytest.raises(TypeError) as info:
      route(given, {'params': model.params}, x)
    message = str(info.value)
    assert f'{name} needs the Linen module or its bound apply method' in message
    assert f'got {shown}, a wrapper that holds the Linen module Net as .module' in message
    assert f"Pass model.module and its parameters, e.g. {name}(model.module, {{'params'" in message
  # following the advice works
  out = route(model.module, {'params': model.params}, x)
  assert (out[0] if isinstance(out, tuple) else out).shape == (4, 2)


def test_a_module_call_method_is_pointed_to_the_module():
  model, x = Net(), jnp.ones((4, 3))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(
    TypeError,
    match=r'got its method __call__\. Pass the module itself '
    r'\(Net\(\.\.\.\)\) or its \.apply',
  ):
    tract_linen.apply_tract(model.__call__, variables, x)


def test_an_optimizer_state_restored_without_target_names_the_cause():
  params = {'stem': {'kernel': jnp.ones((3, 2))}}
  tx = optax.chain(tract_optax.tract(LAM), optax.sgd(0.1))
  state = tx.init(params)
  # what a checkpoint restored without a target tree gives (Orbax: named
  # tuples as dicts, tuples as lists)
  restored = [dict(state[0]._asdict()), list(state[1])]
  stats = {'stem': tract_optax.dense_stats(_data((8, 3)))}
  with pytest.raises(
    TypeError,
    match=r'received a state of type dict, not the TractState '
    r'that tract\(\.\.\.\)\.init returns.*restored without a '
    r'target tree.*target built from tx\.init\(params\)',
  ):
    tx.update(params, restored, tract_stats=stats)
  # restored with a target (the TractState), it works as before
  rebuilt = jax.tree_util.tree_unflatten(
    jax.tree_util.tree_structure(state), jax.tree_util.tree_leaves(restored)
  )
  updates, _ = tx.update(params, rebuilt, tract_stats=stats)
  rows = np.asarray(_data((8, 3)), np.float64)
  expected = -0.1 * np.linalg.solve(rows.T @ rows / 8 + LAM * np.eye(3), np.ones((3, 2)))
  assert reference.rel_err(updates['stem']['kernel'], expected) < 1e-5
