"""tract_optax.equinox: Equinox layers, geometry and layout read off the layer.

Every case is checked against an explicit float64 patch matrix built with
Equinox's own padding conventions (padding 0 by default, 'SAME' /
'SAME_LOWER' split, tuples, non-zero padding modes); the patch matrix is
first checked to reproduce the Equinox layer's own output.
"""

import importlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tract_optax
from tests import reference
from tract_optax import equinox as tract_eqx

LAM = 0.1


def _normal(shape, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def _pads(padding, spatial, kernel, stride, dilation):
  """Equinox's (low, high) padding per spatial axis, from its definition."""
  if padding in ('SAME', 'SAME_LOWER'):
    pairs = [reference.same_pads(n, k, s, d)
             for n, k, s, d in zip(spatial, kernel, stride, dilation, strict=True)]
    # 'SAME' puts the odd extra pixel high, 'SAME_LOWER' low
    return [p if padding == 'SAME' else p[::-1] for p in pairs]
  if padding == 'VALID':
    return [(0, 0)] * len(spatial)
  if isinstance(padding, int):
    return [(padding, padding)] * len(spatial)
  return [tuple(p) if isinstance(p, tuple) else (p, p) for p in padding]


_NUMPY_MODES = {'ZEROS': 'constant', 'REFLECT': 'reflect', 'REPLICATE': 'edge',
                'CIRCULAR': 'wrap'}

CONV_CASES = {
    # name: (spatial dims, c_in, c_out, kernel, kwargs, input spatial shape)
    'conv2d_default_padding_0': (2, 3, 4, 3, {}, (7, 6)),
    'conv2d_same_stride2': (2, 2, 5, 4, dict(padding='SAME', stride=2), (7, 8)),
    'conv2d_same_lower': (2, 2, 3, 4, dict(padding='SAME_LOWER'), (6, 5)),
    'conv2d_tuple_pads_dilation_groups': (
        2, 4, 6, 3, dict(padding=((1, 2), (0, 1)), dilation=(2, 1), groups=2), (8, 7)),
    'conv1d_reflect': (1, 2, 3, 3, dict(padding=2, padding_mode='REFLECT'), (9,)),
    'conv3d_circular_stride': (
        3, 1, 2, 2, dict(padding=(1, 0, 1), stride=(2, 1, 1), padding_mode='CIRCULAR'),
        (4, 3, 3)),
}


def _explicit_rows(layer, x):
  """``(groups, N, n)`` float64 patch rows (Flax order) of an Equinox conv."""
  spatial = x.shape[2:]
  pads = _pads(layer.padding, spatial, layer.kernel_size, layer.stride, layer.dilation)
  channels_last = np.moveaxis(np.asarray(x, np.float64), 1, -1)
  rows = reference.explicit_patches(
      channels_last, layer.kernel_size, layer.stride, pads, layer.dilation,
      layer.groups, pad_mode=_NUMPY_MODES[layer.padding_mode])
  return rows[None] if layer.groups == 1 else rows


def _to_flax(weight):
  """Equinox (out, in / groups, *window) -> Flax (*window, in / groups, out)."""
  weight = np.asarray(weight, np.float64)
  return np.transpose(weight, tuple(range(2, weight.ndim)) + (1, 0))


def _from_flax(kernel):
  return np.transpose(kernel, (kernel.ndim - 1, kernel.ndim - 2) + tuple(range(kernel.ndim - 2)))


def _grouped_solve(rows, flax_grad):
  """Per-group float64 TrAct solve of a Flax-layout gradient."""
  groups = rows.shape[0]
  n = rows.shape[-1]
  grad = flax_grad.reshape(n, groups, -1)
  solved = np.stack([reference.tract_solve(rows[g], grad[:, g], LAM)
                     for g in range(groups)], axis=1)
  return solved.reshape(flax_grad.shape)


@pytest.mark.parametrize('case', sorted(CONV_CASES))
def test_conv_stats_output_and_gradient_match_explicit_patches(case):
  spatial_dims, c_in, c_out, kernel, kwargs, shape = CONV_CASES[case]
  layer = eqx.nn.Conv(spatial_dims, c_in, c_out, kernel, key=jax.random.key(0), **kwargs)
  x = _normal((3, c_in) + shape)
  rows = _explicit_rows(layer, x)
  # the reference rows are Equinox's: they reproduce the layer's output
  plain_out = jax.vmap(layer)(x)
  flax_kernel = _to_flax(layer.weight).reshape(rows.shape[-1], layer.groups, -1)
  by_rows = np.concatenate([rows[g] @ flax_kernel[:, g] for g in range(layer.groups)], -1)
  want_out = np.moveaxis(by_rows.reshape((3,) + plain_out.shape[2:] + (c_out,)), -1, 1)
  bias = np.asarray(layer.bias).reshape((-1,) + (1,) * spatial_dims)
  np.testing.assert_allclose(plain_out, want_out + bias, rtol=1e-4, atol=1e-4)

  stats = tract_eqx.layer_stats(layer, x)
  assert float(stats.count) == rows.shape[1]
  moment = np.einsum('gNi,gNj->gij', rows, rows) / rows.shape[1]
  got_moment = np.asarray(stats.moment).reshape(moment.shape)
  assert reference.rel_err(got_moment, moment) < 1e-5

  cotangent = _normal(plain_out.shape, seed=5)
  route = eqx.filter_grad(
      lambda layer_: jnp.sum(tract_eqx.apply_tract(layer_, x, lam=LAM) * cotangent))(layer)
  plain = eqx.filter_grad(lambda layer_: jnp.sum(jax.vmap(layer_)(x) * cotangent))(layer)
  np.testing.assert_array_equal(tract_eqx.apply_tract(layer, x), plain_out)
  expected = _from_flax(_grouped_solve(rows, _to_flax(plain.weight)))
  assert reference.rel_err(route.weight, expected) < 2e-5
  np.testing.assert_allclose(route.bias, plain.bias, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('in_features,out_features', [(8, 8), ('scalar', 3), (5, 'scalar')])
def test_linear_any_leading_axes_against_numpy(in_features, out_features):
  layer = eqx.nn.Linear(in_features, out_features, key=jax.random.key(1))
  n_in = 1 if in_features == 'scalar' else in_features
  shape = (2, 5) if in_features == 'scalar' else (2, 5, n_in)  # batch x tokens
  x = _normal(shape, seed=2)
  out = tract_eqx.apply_tract(layer, x)
  flat = x.reshape(10, -1) if in_features != 'scalar' else x.reshape(10)
  np.testing.assert_array_equal(out.reshape((10,) + out.shape[2:]), jax.vmap(layer)(flat))
  cotangent = _normal(out.shape, seed=3)
  route = eqx.filter_grad(
      lambda layer_: jnp.sum(tract_eqx.apply_tract(layer_, x, lam=LAM) * cotangent))(layer)
  rows = np.asarray(x, np.float64).reshape(10, n_in)
  plain_weight = np.asarray(cotangent, np.float64).reshape(10, -1).T @ rows  # (out, in)
  expected = reference.tract_solve(rows, plain_weight.T, LAM).T
  assert reference.rel_err(route.weight, expected) < 2e-5


class EqxCNN(eqx.Module):
  """Equinox's MNIST-style CNN: one example (C, H, W), padding 0."""

  stem: eqx.nn.Conv2d
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.stem = eqx.nn.Conv2d(1, 3, 3, key=k1)
    self.head = eqx.nn.Linear(3, 4, key=k2)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.stem(x)).mean((1, 2)))


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_equinox_cnn_trained_one_step_with_optax_matches_the_optax_route():
  """``tract_layer`` swapped in before ``jax.vmap(model)``, plain ``optax.adam``;
  against ``tract`` first in a chain fed ``layer_stats``, in Flax layout."""
  model = EqxCNN(jax.random.key(0))
  x = _normal((6, 1, 8, 8), seed=1)
  labels = jnp.asarray(np.random.default_rng(2).integers(0, 4, 6))
  route_tx = optax.adam(1e-2)
  optax_tx = optax.chain(tract_optax.tract(LAM), optax.adam(1e-2))

  @eqx.filter_jit
  def route_step(model, opt_state):
    def loss(model):
      model = eqx.tree_at(lambda m: m.stem, model, tract_eqx.tract_layer(model.stem, x, lam=LAM))
      return _xent(jax.vmap(model)(x), labels)
    grads = eqx.filter_grad(loss)(model)
    updates, opt_state = route_tx.update(grads, opt_state)
    return eqx.apply_updates(model, updates), grads

  route_model, route_grads = route_step(model, route_tx.init(eqx.filter(model, eqx.is_array)))

  plain = eqx.filter_grad(lambda m: _xent(jax.vmap(m)(x), labels))(model)
  stats = tract_eqx.layer_stats(model.stem, x)
  rows = _explicit_rows(model.stem, x)[0]
  # the gradient route against float64 numpy on the explicit patches
  expected = _from_flax(reference.tract_solve(rows, _to_flax(plain.stem.weight), LAM))
  assert reference.rel_err(route_grads.stem.weight, expected) < 2e-5
  # the Optax route on the same tree, stem kernel in Flax layout
  tree = {'stem': {'kernel': jnp.asarray(_to_flax(plain.stem.weight), jnp.float32),
                   'bias': plain.stem.bias},
          'head': {'kernel': plain.head.weight.T, 'bias': plain.head.bias}}
  updates, _ = optax_tx.update(tree, optax_tx.init(tree), tract_stats={'stem': stats})
  new_stem = model.stem.weight + jnp.asarray(_from_flax(np.asarray(updates['stem']['kernel'])))
  np.testing.assert_allclose(route_model.stem.weight, new_stem, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(route_model.head.weight,
                             model.head.weight + updates['head']['kernel'].T,
                             rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(route_model.stem.weight - model.stem.weight))) > 1e-3


def test_per_example_model_with_the_statistic_inside_the_vmap_is_refused():
  """Equinox's idiom with the wrapping inside ``__call__``: one example's
  statistic per lane, refused with the way out."""

  class PerExample(EqxCNN):
    def __call__(self, x):
      stem = tract_eqx.tract_layer(self.stem, x)  # x is ONE example here
      return self.head(jax.nn.relu(stem(x)).mean((1, 2)))

  model = PerExample(jax.random.key(0))
  x = _normal((4, 1, 8, 8))
  labels = jnp.zeros(4, jnp.int32)
  with pytest.raises(ValueError, match=r'inside jax\.vmap with a statistic that differs.*'
                     r'tract_optax\.equinox\.apply_tract\(layer, x\) on the batch.*'
                     r'per_lane_stats=True'):
    eqx.filter_grad(lambda m: _xent(jax.vmap(m)(x), labels))(model)


def test_refusals_name_the_fix():
  x = _normal((2, 3, 8, 8))
  with pytest.raises(TypeError, match=r'takes an eqx\.nn\.Linear or eqx\.nn\.Conv.*got BatchNorm'):
    tract_eqx.layer_stats(eqx.nn.BatchNorm(3, 'batch', mode='batch'), x)

  class Standardised(eqx.nn.Conv2d):
    def __call__(self, x, *, key=None):
      standardised = eqx.tree_at(lambda c: c.weight, self, self.weight / jnp.std(self.weight))
      return eqx.nn.Conv2d.__call__(standardised, x)

  with pytest.raises(TypeError, match=r'Standardised subclasses eqx\.nn\.Conv but overrides __call__'):
    tract_eqx.apply_tract(Standardised(3, 4, 3, key=jax.random.key(0)), x)
  conv = eqx.nn.Conv2d(3, 4, 3, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r'takes channels-first inputs of shape \(\.\.\., 3, '
                     r'\*2 spatial\).*got shape \(2, 8, 8, 3\)'):
    tract_eqx.apply_tract(conv, jnp.moveaxis(x, 1, -1))
  with pytest.raises(ValueError, match=r'inputs of shape \(\.\.\., 5\)'):
    tract_eqx.layer_stats(eqx.nn.Linear(5, 2, key=jax.random.key(0)), jnp.ones((4, 3)))


def test_square_equinox_conv_needs_no_layout_argument_here():
  """``Conv2d(3, 3, 3)``: weight (3, 3, 3, 3) fits both layouts, which
  ``tract_kernel`` refuses without ``channels_first``; the helper knows it."""
  layer = eqx.nn.Conv2d(3, 3, 3, key=jax.random.key(0))
  x = _normal((2, 3, 6, 6), seed=4)
  stats = tract_eqx.layer_stats(layer, x)
  with pytest.raises(ValueError, match='in both layouts'):
    tract_optax.tract_kernel(layer.weight, stats)
  route = eqx.filter_grad(lambda layer_: jnp.sum(tract_eqx.apply_tract(layer_, x) ** 2))(layer)
  plain = eqx.filter_grad(lambda layer_: jnp.sum(jax.vmap(layer_)(x) ** 2))(layer)
  rows = _explicit_rows(layer, x)[0]
  expected = _from_flax(reference.tract_solve(rows, _to_flax(plain.weight), LAM))
  assert reference.rel_err(route.weight, expected) < 2e-5


def test_import_without_equinox_names_the_install(monkeypatch):
  original = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'equinox' else original(name, *a))
  monkeypatch.delitem(sys.modules, 'tract_optax.equinox')
  with pytest.raises(ImportError, match='pip install equinox'):
    importlib.import_module('tract_optax.equinox')
  monkeypatch.setitem(sys.modules, 'tract_optax.equinox', tract_eqx)


def test_import_tract_optax_imports_neither_equinox_nor_the_helpers():
  code = ('import sys, tract_optax; '
          "print('equinox' in sys.modules, 'tract_optax.equinox' in sys.modules)")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True, timeout=120)
  assert out.stdout.split() == ['False', 'False']


# ----------------------------------------------------------------------------
# TractLayer: the statistic from the input the layer receives


@pytest.mark.parametrize('case', ['conv2d_tuple_pads_dilation_groups', 'conv1d_reflect',
                                  'conv2d_same_stride2'])
def test_tract_layer_module_under_per_example_vmap_with_axis_name(case):
  spatial_dims, c_in, c_out, kernel, kwargs, shape = CONV_CASES[case]
  layer = eqx.nn.Conv(spatial_dims, c_in, c_out, kernel, key=jax.random.key(0), **kwargs)
  x = _normal((3, c_in) + shape)
  wrapped = tract_eqx.TractLayer(layer, lam=LAM, axis_name='batch')
  plain_out = jax.vmap(layer)(x)
  np.testing.assert_allclose(jax.vmap(wrapped, axis_name='batch')(x), plain_out, atol=1e-6)
  cotangent = _normal(plain_out.shape, seed=5)
  route = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m, axis_name='batch')(x) * cotangent))(
      wrapped)
  plain = eqx.filter_grad(lambda layer_: jnp.sum(jax.vmap(layer_)(x) * cotangent))(layer)
  expected = _from_flax(_grouped_solve(_explicit_rows(layer, x), _to_flax(plain.weight)))
  assert reference.rel_err(route.layer.weight, expected) < 2e-5
  np.testing.assert_allclose(route.layer.bias, plain.bias, rtol=1e-5, atol=1e-6)


def test_tract_layer_module_reads_the_rows_the_model_rearranged():
  """A patch-embedding Linear fed patches in (ph pw c) order, vmapped over
  examples and tokens: the statistic is of the rows the Linear receives,
  whatever order the model built (the 95x trap of issue 21)."""

  class Patchify(eqx.Module):
    embed: eqx.Module

    def __call__(self, image):  # (C, H, W) -> (tokens, ph * pw * c)
      c, h, w = image.shape
      patches = image.reshape(c, h // 4, 4, w // 4, 4).transpose(1, 3, 2, 4, 0)
      return jax.vmap(self.embed, axis_name='tokens')(patches.reshape(-1, 4 * 4 * c))

  linear = eqx.nn.Linear(48, 5, key=jax.random.key(0))
  model = Patchify(tract_eqx.TractLayer(linear, lam=LAM, axis_name=('batch', 'tokens')))
  x = _normal((2, 3, 8, 8), seed=1)
  cotangent = _normal((2, 4, 5), seed=2)
  grads = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m, axis_name='batch')(x) * cotangent))(
      model)
  rows = np.asarray(x, np.float64).reshape(2, 3, 2, 4, 2, 4).transpose(0, 2, 4, 3, 5, 1)
  rows = rows.reshape(8, 48)
  plain = np.asarray(cotangent, np.float64).reshape(8, 5).T @ rows  # (out, in)
  expected = reference.tract_solve(rows, plain.T, LAM).T
  assert reference.rel_err(grads.embed.layer.weight, expected) < 2e-5


def test_tract_layer_module_without_axis_name_under_vmap_is_refused():
  stem = tract_eqx.TractLayer(eqx.nn.Linear(3, 2, key=jax.random.key(0)))
  with pytest.raises(ValueError, match='per_lane_stats=True'):
    eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(jnp.ones((4, 3)))))(stem)


def test_wrapping_twice_is_refused():
  linear = eqx.nn.Linear(3, 2, key=jax.random.key(0))
  x = _normal((8, 3))
  with pytest.raises(TypeError, match='already a TractLayer'):
    tract_eqx.TractLayer(tract_eqx.TractLayer(linear))
  with pytest.raises(ValueError, match='already TrAct-wrapped'):
    eqx.filter_grad(lambda s: jnp.sum(jax.vmap(
        tract_eqx.tract_layer(tract_eqx.tract_layer(s, x), x))(x)))(linear)
  with pytest.raises(ValueError, match='already TrAct-wrapped'):
    eqx.filter_jit(eqx.filter_grad(lambda s: jnp.sum(tract_eqx.apply_tract(
        tract_eqx.tract_layer(s, x), x))))(linear)


def test_a_weight_norm_wrapper_is_refused_with_advice_for_a_plain_stem():
  import tract_optax.equinox as tract_eqx  # pylint: disable=import-outside-toplevel

  wrapped = eqx.nn.WeightNorm(eqx.nn.Linear(4, 3, key=jax.random.key(0)))
  for make in (lambda: tract_eqx.TractLayer(wrapped), lambda: tract_eqx.layer_stats(wrapped, jnp.ones((8, 4)))):
    with pytest.raises(TypeError, match=r'WeightNorm computes the weight its Linear multiplies '
                       r'from the stored one.*Use a plain layer as the stem'):
      make()
