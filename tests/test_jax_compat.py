"""The one place tract_optax reads JAX internals: bound axis names.

Every reader in ``jax_compat.AXIS_NAME_READERS`` is checked against the
installed JAX, so a JAX release that moves one fails here, not for users. If
all of them fail, TrAct warns once (naming axis_name/local_stats) instead of
failing every call.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

import tract_optax
from tract_optax._src import axes
from tract_optax._src import jax_compat


def _names_seen(fn_of_reader, reader):
  seen = []

  def probe(x):
    seen.append(reader())
    return x

  fn_of_reader(probe)
  return seen[-1]


def _shard_map():
  if hasattr(jax, 'shard_map'):
    return jax.shard_map
  from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top
  return shard_map


_PLACES = {
    'top level': (lambda probe: probe(jnp.ones(2)), set()),
    'jit': (lambda probe: jax.jit(probe)(jnp.ones(2)), set()),
    'vmap': (lambda probe: jax.vmap(probe, axis_name='i')(jnp.ones(2)), {'i'}),
    'unnamed vmap': (lambda probe: jax.vmap(probe)(jnp.ones(2)), set()),
    'nested vmap': (lambda probe: jax.vmap(jax.vmap(probe, axis_name='j'), axis_name='i')(
        jnp.ones((2, 2))), {'i', 'j'}),
    'pmap': (lambda probe: jax.pmap(probe, axis_name='p')(jnp.ones((1, 2))), {'p'}),
    'shard_map': (lambda probe: jax.jit(_shard_map()(
        probe, mesh=Mesh(np.array(jax.devices()[:1]), ('x',)), in_specs=PartitionSpec('x'),
        out_specs=PartitionSpec('x')))(jnp.ones(2)), {'x'}),
}


@pytest.mark.parametrize('place', list(_PLACES))
def test_every_reader_the_installed_jax_has_reads_the_right_names(place):
  # Readers are tried newest first; an older JAX may lack the newer spelling, but at
  # least one must work, and every one that exists must agree with the truth.
  run, expected = _PLACES[place]
  present = [(name, make()) for name, make in jax_compat.AXIS_NAME_READERS]
  present = [(name, reader) for name, reader in present if reader is not None]
  assert present, f'no axis-name reader works with jax {jax.__version__}'
  for name, reader in present:
    assert set(_names_seen(run, reader)) == expected, name


@pytest.mark.parametrize('place', list(_PLACES))
def test_bound_axis_names(place):
  run, expected = _PLACES[place]
  names = _names_seen(run, jax_compat.bound_axis_names)
  assert isinstance(names, tuple) and set(names) == expected


def test_the_pmap_check_still_refuses_a_bound_axis_without_axis_name():
  tx = tract_optax.tract(0.1)
  grads = {'stem': {'kernel': jnp.ones((3, 2))}}

  def update(x):
    return tx.update(grads, tx.init(grads), tract_stats={'stem': tract_optax.dense_stats(x)})[0]

  with pytest.raises(ValueError, match=r"tract runs inside the named axis \['i'\].*"
                     r"tract\(..., axis_name='i'\).*local_stats=True"):
    jax.vmap(update, axis_name='i')(jnp.ones((2, 8, 3)))


def _broken():
  raise AttributeError('moved')


@pytest.fixture
def jax_without_axis_names(monkeypatch):
  """A JAX where one reader is gone and the other raises."""
  monkeypatch.setattr(jax_compat, 'AXIS_NAME_READERS',
                      (('gone', lambda: None), ('raises', lambda: _broken)))


def test_cannot_tell_is_none(jax_without_axis_names):
  del jax_without_axis_names
  assert jax_compat.bound_axis_names() is None


def test_cannot_tell_warns_and_tract_still_works(jax_without_axis_names):
  del jax_without_axis_names
  rows = np.random.default_rng(0).standard_normal((12, 3)).astype(np.float32)
  stats = tract_optax.dense_stats(rows)
  grads = {'stem': {'kernel': jnp.ones((3, 2))}}
  tx = tract_optax.tract(0.1)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    out, _ = tx.update(grads, tx.init(grads), tract_stats={'stem': stats})
    tx.update(grads, tx.init(grads), tract_stats={'stem': stats})
    jax.grad(lambda k: jnp.sum(tract_optax.tract_kernel(k, stats, lam=0.1)))(jnp.ones((3, 2)))
  hits = [w for w in caught if issubclass(w.category, axes.AxisDetectionWarning)]
  assert len(hits) == 3  # each call that cannot tell says so; nothing is kept to count
  assert re.search(r'no way to see whether TrAct runs inside pmap/shard_map.*axis_name=\.\.\. '
                   r'\(the axes that split the batch\), or local_stats=True', str(hits[0].message))
  expected = np.linalg.solve(rows.T.astype(np.float64) @ rows / 12 + 0.1 * np.eye(3),
                             np.ones((3, 2)))
  np.testing.assert_allclose(out['stem']['kernel'], expected, rtol=1e-5)
  with warnings.catch_warnings():
    warnings.simplefilter('error', axes.AxisDetectionWarning)
    # naming the choice never warns
    explicit = tract_optax.tract(0.1, local_stats=True)
    explicit.update(grads, explicit.init(grads), tract_stats={'stem': stats})


@jax.custom_vjp
def _marked(x):
  return x


def _marked_forward(x):
  return x, None


def _marked_backward(_, cotangent):
  return (2.0 * cotangent,)


_marked.defvjp(_marked_forward, _marked_backward)


def _backward_seen(transform):
  seen = []

  def loss(x):
    y = _marked(x)
    seen.append(jax_compat.custom_vjp_backward(y))
    return jnp.sum(y)

  transform(loss)(jnp.ones((2, 3)))
  return seen[-1]


@pytest.mark.parametrize('transform', [
  jax.grad,
  lambda f: jax.jit(jax.grad(f)),
  lambda f: jax.grad(jax.jit(f)),
  lambda f: jax.vmap(jax.grad(f)),
  lambda f: jax.grad(lambda x: jnp.sum(jax.vmap(f)(x))),
], ids=['grad', 'jit(grad)', 'grad(jit)', 'vmap(grad)', 'grad(vmap)'])
def test_custom_vjp_backward_finds_the_backward_function(transform):
  assert _backward_seen(transform) is _marked_backward


def test_custom_vjp_backward_is_none_for_other_values():
  seen = []

  def loss(x):
    seen.append(jax_compat.custom_vjp_backward(2.0 * x))
    return jnp.sum(x)

  jax.grad(loss)(jnp.ones(3))
  assert seen == [None]
  assert jax_compat.custom_vjp_backward(jnp.ones(3)) is None


def test_forward_mode_tracer_is_told_from_reverse_mode():
  seen = []

  def f(x):
    seen.append(jax_compat.is_forward_mode_tracer(x))
    return jnp.sum(x**2)

  jax.jvp(f, (jnp.ones(2),), (jnp.ones(2),))
  jax.grad(f)(jnp.ones(2))
  jax.jit(f)(jnp.ones(2))
  assert seen == [True, False, False]


def test_varying_axes_are_read_and_added_under_shard_map():
  from jax.sharding import Mesh, PartitionSpec  # pylint: disable=import-outside-toplevel

  mesh = Mesh(np.array(jax.devices()[:1]), ('d',))
  seen = {}

  def body(x):
    zero = jnp.zeros(())  # varies over nothing
    seen['x'], seen['zero'] = jax_compat.varying_axes(x), jax_compat.varying_axes(zero)
    seen['marked'] = jax_compat.varying_axes(jax_compat.varying_over(zero, ('d',)))
    return x

  shard_map = getattr(jax, 'shard_map', None) or jax.experimental.shard_map.shard_map
  shard_map(body, mesh=mesh, in_specs=PartitionSpec('d'), out_specs=PartitionSpec('d'))(
    jnp.ones(4)
  )
  assert seen['x'] == frozenset({'d'}) and seen['zero'] == frozenset()
  assert seen['marked'] == frozenset({'d'})
  assert jax_compat.varying_axes(jnp.ones(2)) == frozenset()


def test_inconclusive_dimension_is_the_error_symbolic_shapes_raise():
  (b,) = jax.export.symbolic_shape('b')
  with pytest.raises(jax_compat.INCONCLUSIVE_DIMENSION):
    bool(b > 3)
