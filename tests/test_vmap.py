"""``jax.vmap`` and forward-mode differentiation through the gradient route.

A batched statistic (computed inside a vmap over examples) is refused; an
unbatched one with batched kernels (an ensemble on shared data) is exact;
a named vmap axis with ``axis_name`` all-reduces the statistic; forward mode
names TrAct and the way out. Each result is checked against numpy float64.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tract_optax
from tests import reference

LAM = 0.1


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _conv(x, kernel):  # x (B, H, W, C), kernel (3, 3, C, O), padding 'SAME'
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def _example_loss(kernel, x, stats=None, **kwargs):
  """A small conv model's loss on ``x`` (one example or a batch)."""
  x = x if x.ndim == 4 else x[None]
  stats = tract_optax.conv_stats(x, (3, 3)) if stats is None else stats
  wrapped = tract_optax.tract_kernel(kernel, stats, lam=LAM, **kwargs)
  return jnp.sum(jnp.tanh(_conv(x, wrapped)).mean((1, 2)) ** 2)


def _plain_loss(kernel, x):
  return jnp.sum(jnp.tanh(_conv(x[None] if x.ndim == 3 else x, kernel)).mean((1, 2)) ** 2)


def _batch_tract(kernel, x):
  """The whole batch's TrAct gradient, float64: explicit patches + solve."""
  plain = sum(jax.grad(_plain_loss)(kernel, x[i]) for i in range(x.shape[0]))
  rows = reference.patch_rows(x, (3, 3), (1, 1), 'SAME', (1, 1))[0]
  return reference.tract_solve(rows, np.asarray(plain).reshape(rows.shape[1], -1), LAM).reshape(
    kernel.shape
  )


KERNEL = _normal((3, 3, 2, 4), seed=1) * 0.3
X = _normal((4, 6, 6, 2), seed=2)


@pytest.mark.parametrize('form', ['vmap_of_grad', 'grad_of_vmap', 'jit_vmap', 'vmap_jit'])
def test_per_example_gradients_with_per_example_statistics_are_refused(form):
  per_example = jax.grad(_example_loss)
  run = {
    'vmap_of_grad': lambda: jax.vmap(per_example, (None, 0))(KERNEL, X),
    'grad_of_vmap': lambda: jax.grad(lambda k: jax.vmap(_example_loss, (None, 0))(k, X).sum())(
      KERNEL
    ),
    'jit_vmap': lambda: jax.jit(jax.vmap(per_example, (None, 0)))(KERNEL, X),
    'vmap_jit': lambda: jax.vmap(jax.jit(per_example), (None, 0))(KERNEL, X),
  }[form]
  with pytest.raises(
    ValueError,
    match=r'runs inside jax\.vmap with a statistic that differs '
    r'from lane to lane.*Compute the statistic of the whole batch outside '
    r"the vmap.*axis_name='batch'.*per_lane_stats=True",
  ):
    run()


def test_whole_batch_statistic_outside_the_vmap_gives_the_batch_tract_gradient():
  stats = tract_optax.conv_stats(X, (3, 3))
  grads = jax.vmap(jax.grad(_example_loss), (None, 0, None))(KERNEL, X, stats)
  assert reference.rel_err(grads.sum(0), _batch_tract(KERNEL, X)) < 2e-5


def test_named_vmap_with_axis_name_follows_the_advice_and_is_exact():
  with pytest.raises(ValueError, match=r"axis_name='b'"):
    jax.vmap(jax.grad(_example_loss), (None, 0), axis_name='b')(KERNEL, X)
  grads = jax.vmap(
    lambda k, x: jax.grad(_example_loss)(k, x, axis_name='b'), (None, 0), axis_name='b'
  )(KERNEL, X)
  assert reference.rel_err(grads.sum(0), _batch_tract(KERNEL, X)) < 2e-5


def test_ensemble_on_shared_data_is_exact():
  kernels = jnp.stack([KERNEL, 0.5 * KERNEL + 0.1, -KERNEL])
  grads = jax.jit(jax.vmap(jax.grad(_example_loss), (0, None)))(kernels, X)
  for i in range(3):
    assert reference.rel_err(grads[i], _batch_tract(kernels[i], X)) < 2e-5


def test_independent_models_on_independent_data_opt_in():
  kernels = jnp.stack([KERNEL, -KERNEL])
  data = jnp.stack([X, 2.0 * X[::-1] + 0.5])
  grads = jax.vmap(lambda k, x: jax.grad(_example_loss)(k, x, per_lane_stats=True))(kernels, data)
  for i in range(2):
    assert reference.rel_err(grads[i], _batch_tract(kernels[i], data[i])) < 2e-5


def test_equinox_per_example_idiom_with_tract_kernel_inside_is_refused():
  conv = eqx.nn.Conv2d(2, 3, 3, padding=1, key=jax.random.key(0))

  def per_example(layer, x):  # x: one example (C, H, W)
    stats = tract_optax.conv_stats(jnp.moveaxis(x, 0, -1), (3, 3), padding=1)
    weight = tract_optax.tract_kernel(layer.weight, stats, channels_first=True)
    return jnp.sum(eqx.tree_at(lambda c: c.weight, layer, weight)(x) ** 2)

  with pytest.raises(ValueError, match='per_lane_stats=True'):
    eqx.filter_grad(
      lambda layer: jax.vmap(per_example, (None, 0))(layer, jnp.moveaxis(X, -1, 1)).sum()
    )(conv)


# ----------------------------------------------------------------------------
# Forward mode


@pytest.mark.parametrize('form', ['jvp', 'jit_jvp', 'jacfwd'])
def test_forward_mode_names_tract_and_the_way_out(form):
  def loss(k):
    return _example_loss(k, X)

  run = {
    'jvp': lambda: jax.jvp(loss, (KERNEL,), (KERNEL,)),
    'jit_jvp': lambda: jax.jit(lambda k: jax.jvp(loss, (k,), (k,)))(KERNEL),
    'jacfwd': lambda: jax.jacfwd(loss)(KERNEL),
  }[form]
  with pytest.raises(
    TypeError,
    match=r'tract_kernel: forward-mode differentiation.*not '
    r'defined.*differentiate the plain model.*P H v',
  ):
    run()


def test_forward_over_reverse_gives_the_preconditioned_hessian_vector_product():
  """What the docs say: jvp of grad through the route is P H v, not H v."""
  x = X.reshape(-1, 2)[:40]
  kernel = _normal((2, 3), seed=3)
  direction = _normal((2, 3), seed=4)
  stats = tract_optax.dense_stats(x)

  def tract_loss(w):
    return jnp.sum(jnp.tanh(x @ tract_optax.tract_kernel(w, stats)) ** 2)

  def plain_loss(w):
    return jnp.sum(jnp.tanh(x @ w) ** 2)

  _, got = jax.jvp(jax.grad(tract_loss), (kernel,), (direction,))
  _, hv = jax.jvp(jax.grad(plain_loss), (kernel,), (direction,))
  rows = np.asarray(x, np.float64)
  assert reference.rel_err(got, reference.tract_solve(rows, hv, LAM)) < 1e-4
  assert reference.rel_err(got, hv) > 0.1


# ----------------------------------------------------------------------------
# Layout: the caller says it where the shape cannot


def test_square_dense_kernel_needs_the_layout():
  x = _normal((32, 8), seed=5)
  stats = tract_optax.dense_stats(x)
  weight = _normal((8, 8), seed=6)
  with pytest.raises(
    ValueError,
    match=r'shape \(8, 8\) fits the statistic \(n = 8\) in both '
    r'layouts.*channels_first=True for PyTorch / Equinox.*'
    r'channels_first=False for Flax',
  ):
    tract_optax.tract_kernel(weight, stats)
  cotangent = _normal((32, 8), seed=7)
  rows = np.asarray(x, np.float64)
  for channels_first in (False, True):

    def loss(w, channels_first=channels_first):
      wrapped = tract_optax.tract_kernel(w, stats, channels_first=channels_first)
      return jnp.sum((x @ (wrapped.T if channels_first else wrapped)) * cotangent)

    got = jax.grad(loss)(weight)
    plain = rows.T @ np.asarray(cotangent, np.float64)  # (in, out)
    expected = reference.tract_solve(rows, plain, LAM)
    assert reference.rel_err(got, expected.T if channels_first else expected) < 2e-5


def test_unambiguous_channels_first_is_inferred_and_a_wrong_layout_refused():
  stats = tract_optax.conv_stats(X, (3, 3))  # n = 18
  flax_kernel = KERNEL  # (3, 3, 2, 4)
  torch_kernel = jnp.transpose(KERNEL, (3, 2, 0, 1))  # (4, 2, 3, 3)

  def loss(k, cf):
    layout = 'OIHW' if k.shape[0] == 4 else 'HWIO'
    out = jax.lax.conv_general_dilated(
      X,
      tract_optax.tract_kernel(k, stats, channels_first=cf),
      (1, 1),
      'SAME',
      dimension_numbers=('NHWC', layout, 'NHWC'),
    )
    return jnp.sum(jnp.tanh(out) ** 2)

  inferred = jax.grad(loss)(torch_kernel, None)
  explicit = jax.grad(loss)(torch_kernel, True)
  np.testing.assert_array_equal(inferred, explicit)
  flax_grad = jax.grad(loss)(flax_kernel, None)
  assert reference.rel_err(jnp.transpose(inferred, (2, 3, 1, 0)), flax_grad) < 1e-5
  with pytest.raises(
    ValueError,
    match=r'does not fit the kernel of shape \(4, 2, 3, 3\) in '
    r'layout \(\*window, in / groups, out\).*pass channels_first=True',
  ):
    tract_optax.tract_kernel(torch_kernel, stats, channels_first=False)
  with pytest.raises(ValueError, match=r'fits the kernel of shape \(5, 2, 3, 3\) in neither'):
    tract_optax.tract_kernel(jnp.ones((5, 2, 3, 3)), tract_optax.conv_stats(X, (2, 2)))


# ----------------------------------------------------------------------------
# Flax glue: an ensemble of members on their own data, per_lane_stats forwarded


def _ensemble_case():
  members, batch = 3, 8
  xs = _normal((members, batch, 3), seed=1)
  targets = _normal((members, batch, 2), seed=2)
  return xs, targets


def _member_tract_grads(plain_kernel_grads, xs):
  """Each member's plain kernel gradient preconditioned with its own data (float64)."""
  return np.stack(
    [reference.tract_solve(x, g, LAM) for g, x in zip(plain_kernel_grads, xs, strict=True)]
  )


def test_linen_apply_tract_takes_per_lane_stats_for_an_ensemble():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  from tract_optax import linen as tract_linen  # pylint: disable=import-outside-toplevel

  model = nn.Dense(2)
  xs, targets = _ensemble_case()
  params = jax.vmap(lambda k: model.init(k, xs[0])['params'])(
    jax.random.split(jax.random.key(0), xs.shape[0])
  )

  def loss(p, x, y, **kwargs):
    out = tract_linen.apply_tract(model, {'params': p}, x, lam=LAM, **kwargs)
    return jnp.mean((out - y) ** 2)

  grads = jax.vmap(jax.grad(lambda p, x, y: loss(p, x, y, per_lane_stats=True)))(
    params, xs, targets
  )
  plain = jax.vmap(jax.grad(lambda p, x, y: jnp.mean((model.apply({'params': p}, x) - y) ** 2)))(
    params, xs, targets
  )
  expected = _member_tract_grads(plain['kernel'], xs)
  np.testing.assert_allclose(grads['kernel'], expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads['bias'], plain['bias'], rtol=1e-6)
  with pytest.raises(ValueError, match='per_lane_stats=True'):
    jax.vmap(jax.grad(loss))(params, xs, targets)


def test_nnx_apply_tract_takes_per_lane_stats_for_an_ensemble():
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from tract_optax import nnx as tract_nnx  # pylint: disable=import-outside-toplevel

  xs, targets = _ensemble_case()
  graphdef, state = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  states = jax.tree_util.tree_map(lambda v: jnp.stack([v, 2 * v, -v]), state)

  def loss(s, x, y, **kwargs):
    out = tract_nnx.apply_tract(nnx.merge(graphdef, s), x, lam=LAM, **kwargs)
    return jnp.mean((out - y) ** 2)

  grads = jax.vmap(jax.grad(lambda s, x, y: loss(s, x, y, per_lane_stats=True)))(
    states, xs, targets
  )
  plain = jax.vmap(jax.grad(lambda s, x, y: jnp.mean((nnx.merge(graphdef, s)(x) - y) ** 2)))(
    states, xs, targets
  )
  expected = _member_tract_grads(plain['kernel'][...], xs)
  np.testing.assert_allclose(grads['kernel'][...], expected, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match='per_lane_stats=True'):
    jax.vmap(jax.grad(loss))(states, xs, targets)
