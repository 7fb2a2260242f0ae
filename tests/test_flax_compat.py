"""The one place tract_optax reads Flax internals, checked against the installed Flax.

Each function of ``flax_compat`` is exercised on real Flax objects, so a Flax
release that moves an internal fails here, not for users. Run on flax 0.11.2
(the lower bound: no ``nnx.capture``) and 0.12.8.
"""

import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import DenyList
from flax.core import scope as flax_scope

from tract_optax._src import flax_compat

HAS_CAPTURE = hasattr(nnx, 'capture')
needs_capture = pytest.mark.skipif(not HAS_CAPTURE, reason='nnx.capture is new in Flax 0.12.6')


# Linen ------------------------------------------------------------------------


class _Identity(nn.Module):
  """A ``map_variables`` that leaves the kernel as it is (only the scope changes)."""

  @nn.compact
  def __call__(self, x):
    mapped = nn.map_variables(nn.Dense, 'params', lambda v: v, lambda v: v, init=True)
    return mapped(2, name='dense')(x)


class _Plain(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name='dense')(x)


class _Remat(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.remat(nn.Dense)(2, name='dense')(x)


def _seen_by_dense(model):
  """``(path, debug_path, map_variables_scope, inside_lifted)`` of each Dense call."""
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Dense) and context.method_name == '__call__':
      path = tuple(module.path)
      seen.append(
        (
          path,
          flax_compat.scope_debug_path(module.scope),
          flax_compat.map_variables_scope(module.scope),
          flax_compat.inside_lifted_transform(module.scope, path),
        )
      )
    return next_fun(*args, **kwargs)

  x = jnp.ones((1, 3))
  variables = model.init(jax.random.key(0), x)
  seen.clear()
  with nn.intercept_methods(interceptor):
    model.apply(variables, x)
  assert len(seen) == 1
  return seen[0]


def test_debug_path_of_a_plain_layer_is_its_path():
  path, debug_path, mapped, lifted = _seen_by_dense(_Plain())
  assert path == ('dense',)
  assert debug_path == ('dense',)
  assert mapped is None
  assert lifted is False


def test_debug_path_names_map_variables():
  path, debug_path, mapped, lifted = _seen_by_dense(_Identity())
  assert any(entry.startswith('map_variables(') for entry in debug_path), debug_path
  assert mapped == '/'.join(debug_path)
  assert lifted is True
  assert debug_path != path


def test_debug_path_names_other_lifted_transforms_without_map_variables():
  path, debug_path, mapped, lifted = _seen_by_dense(_Remat())
  assert debug_path != path
  assert mapped is None
  assert lifted is True


def test_without_a_debug_path_nothing_is_assumed():
  assert flax_compat.scope_debug_path(None) is None
  assert flax_compat.map_variables_scope(None) is None
  assert flax_compat.inside_lifted_transform(None, ('dense',)) is True


_FILTERS = [
  False,
  True,
  'batch_stats',
  'tract_stats',
  ['batch_stats', 'cache'],
  ('tract_stats',),
  DenyList('params'),
  DenyList(['params', 'tract_stats']),
  DenyList('tract_stats'),
]
_COLLECTIONS = ('params', 'batch_stats', 'cache', 'tract_stats', 'other')


def _admits(filter_like):
  return {name for name in _COLLECTIONS if flax_scope.in_filter(filter_like, name)}


@pytest.mark.parametrize('mutable', _FILTERS, ids=repr)
def test_union_filters_is_flax_s_and_the_fallback_agrees(mutable):
  merged = flax_compat.union_filters(mutable, 'tract_stats')
  assert merged == flax_scope.union_filters(mutable, 'tract_stats')
  assert _admits(merged) == _admits(mutable) | {'tract_stats'}
  fallback = flax_compat._union_filters_fallback(mutable, 'tract_stats')
  assert _admits(fallback) == _admits(merged)


def test_union_filters_fallback_covers_deny_lists_of_everything_and_nothing():
  assert _admits(flax_compat._union_filters_fallback(DenyList(True), 'c')) == set()
  assert flax_compat._union_filters_fallback(DenyList(True), 'tract_stats') == {'tract_stats'}
  assert flax_compat._union_filters_fallback(DenyList(False), 'tract_stats') is True


def test_union_filters_refuses_what_is_no_filter_as_flax_does():
  with pytest.raises(flax.errors.InvalidFilterError):
    flax_compat.union_filters(3, 'tract_stats')
  with pytest.raises(flax.errors.InvalidFilterError):
    flax_compat._union_filters_fallback(3, 'tract_stats')


def test_merged_filter_makes_the_collection_mutable_in_apply():
  class Sows(nn.Module):
    @nn.compact
    def __call__(self, x):
      self.sow('tract_stats', 'seen', x.sum())
      self.sow('intermediates', 'seen', x.sum())
      return x

  _, mutated = Sows().apply(
    {}, jnp.ones(2), mutable=flax_compat.union_filters(False, 'tract_stats')
  )
  assert set(mutated) == {'tract_stats'}


# NNX --------------------------------------------------------------------------


class _Stats(nnx.Intermediate):
  pass


class _Other(nnx.Intermediate):
  pass


def _model():
  return nnx.Sequential(
    nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(3, 1, rngs=nnx.Rngs(1))
  )


def _modules(model):
  return [module for _, module in flax_compat.iter_modules(model)]


def test_nnx_has_capture_follows_the_flax_release():
  major, minor, patch = (int(part) for part in flax.__version__.split('.')[:3])
  assert flax_compat.nnx_has_capture() == ((major, minor, patch) >= (0, 12, 6))


def test_outside_a_capture_nothing_is_sown():
  model = _model()
  layer = model.layers[0]
  assert not flax_compat.capture_active(layer)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # no deprecated Module.sow outside a capture
    assert flax_compat.sow_into_capture(layer, _Stats, 'seen', 1.0) is False
  assert not hasattr(layer, 'seen')


@needs_capture
def test_capture_is_seen_sown_into_and_its_leftovers_dropped():
  model = _model()
  layer = model.layers[0]
  graphdef = nnx.split(model)[0]
  seen = {}

  def forward(m):
    seen['active'] = flax_compat.capture_active(layer)
    seen['sown'] = flax_compat.sow_into_capture(layer, _Stats, 'seen', jnp.float32(1.5))
    seen['other type'] = flax_compat.sow_into_capture(layer, _Other, 'seen', jnp.float32(2.5))
    return m(jnp.ones((1, 2)))

  _, sown = nnx.capture(forward, _Stats)(model)
  assert seen == {'active': True, 'sown': True, 'other type': False}
  assert [float(leaf) for leaf in jax.tree.leaves(sown)] == [1.5]
  assert not any(flax_compat.capture_active(module) for module in _modules(model))

  def failing(m):
    del m
    raise RuntimeError('boom')

  with pytest.raises(RuntimeError, match='boom'):
    nnx.capture(failing, _Stats)(model)
  assert flax_compat.capture_active(layer)  # what drop_captures is for
  flax_compat.drop_captures(model)
  assert not any(flax_compat.capture_active(module) for module in _modules(model))
  assert nnx.split(model)[0] == graphdef


def test_popped_attribute_is_unregistered_and_the_graph_is_as_before():
  model = _model()
  layer = model.layers[0]
  graphdef, state = nnx.split(model)
  nodes_before = vars(layer)['_pytree__nodes']
  registered = flax_compat.registered_nodes(model)
  assert len(registered) == len(_modules(model))
  layer.seen = _Stats((jnp.float32(1.0),))
  assert 'seen' in vars(layer)['_pytree__nodes']  # registered when set
  popped = nnx.pop(model, _Stats)
  assert [float(leaf) for leaf in jax.tree.leaves(popped)] == [1.0]
  flax_compat.unregister_popped(registered, 'seen')
  assert 'seen' not in vars(layer)['_pytree__nodes']
  if isinstance(nodes_before, frozenset):  # Flax 0.11: the very set from before
    assert vars(layer)['_pytree__nodes'] is nodes_before
  graphdef_after, state_after = nnx.split(model)
  assert graphdef_after == graphdef
  assert jax.tree.structure(state_after) == jax.tree.structure(state)


def test_class_swap_survives_split_and_merge_and_swaps_back():
  layer = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  original = type(layer)
  graphdef, state = nnx.split(layer)
  hooked = type('Linear', (original,), {'__module__': original.__module__, 'hooked': True})
  flax_compat.swap_class(layer, hooked)
  assert type(layer) is hooked and layer.hooked
  assert flax_compat.is_graph_node(layer)
  hooked_def, hooked_state = nnx.split(layer)
  assert hooked_def != graphdef  # the type is in the GraphDef
  copy = nnx.merge(hooked_def, hooked_state)
  assert type(copy) is hooked  # copies keep the subclass
  np.testing.assert_array_equal(
    copy(jnp.ones((1, 2))), nnx.merge(graphdef, state)(jnp.ones((1, 2)))
  )
  flax_compat.swap_class(layer, original)
  assert type(layer) is original
  assert '__class__' not in vars(layer)
  assert '__class__' not in vars(layer)['_pytree__nodes']
  assert nnx.split(layer)[0] == graphdef


_NODES = {
  'module': lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
  'rngs': lambda: nnx.Rngs(0),
  'variable': lambda: nnx.Param(jnp.ones(2)),
  'array': lambda: jnp.ones(2),
  'float': lambda: 1.0,
  'list': lambda: [nnx.Rngs(0)],
  'dict': lambda: {'a': 1},
}


@pytest.mark.parametrize('kind', list(_NODES))
def test_is_graph_node_is_flax_s_and_the_fallback_agrees(kind):
  value = _NODES[kind]()
  flax_test = flax_compat._graph_node_test()
  assert flax_test is not None  # every supported Flax has it
  expected = kind in ('module', 'rngs', 'variable')
  assert flax_test(value) == expected
  assert flax_compat.is_graph_node(value) == expected
  assert isinstance(value, (nnx.Pytree, nnx.Variable)) == expected  # the fallback


def test_iter_modules_and_variable_values():
  model = _model()
  paths = [path for path, _ in flax_compat.iter_modules(model)]
  assert {(), ('layers', 0), ('layers', 2)} <= set(paths)  # 0.12 also lists its nnx.List
  kernel = model.layers[0].kernel
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # no deprecated spelling on either release
    raw_before = flax_compat.raw_variable_value(kernel)
    assert flax_compat.variable_value(kernel).shape == (2, 3)
    flax_compat.set_variable_value(kernel, jnp.zeros((2, 3)))
    np.testing.assert_array_equal(flax_compat.variable_value(kernel), 0.0)
    assert flax_compat.raw_variable_value(kernel) is not raw_before
  assert flax_compat.raw_variable_value(None) is None
