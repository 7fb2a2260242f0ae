"""Every use of Flax internals in tract_optax, in one place.

The Linen and NNX glue (``tract_optax._src.linen``, ``tract_optax._src.nnx``)
need a few things public Flax does not offer, and a few public spellings that
changed between the supported releases. Each is read here and nowhere else,
each answers "cannot tell" (None / False) or falls back to public API rather
than raising when a Flax release moves it, and each is tested against the
installed Flax in ``tests/test_flax_compat.py`` (run on flax 0.11.2, the lower
bound, and 0.12.8), so a move fails a test before it reaches users.

Linen:

- ``scope_debug_path`` / ``map_variables_scope`` / ``inside_lifted_transform``:
  a scope's ``debug_path``, the module path with each lifted transform named
  in it (``'map_variables(dense)'``, ``'scan(blocks)'``), to refuse a kernel
  handed to its layer through ``nn.map_variables`` and to tell a layer run
  inside ``nn.scan`` / ``nn.remat`` apart.
- ``union_filters``: ``flax.core.scope.union_filters``, to add the statistics
  collection to the user's ``mutable=`` filter.

NNX:

- ``nnx_has_capture`` / ``capture_active`` / ``sow_into_capture`` /
  ``drop_captures``: ``nnx.capture`` (Flax 0.12.6 and later) keeps what it
  collects in a ``__captures__`` attribute of each module while it runs, and
  leaves it there when the captured function raises.
- ``registered_nodes`` / ``unregister_popped``: Flax before 0.12 registers a
  data attribute's name in the module's ``_pytree__nodes`` and ``nnx.pop``
  does not unregister it.
- ``swap_class``: the class of a live module is swapped for a subclass and
  back; NNX records a module's type in its GraphDef, so the subclass survives
  the copies NNX transforms make.
- ``is_graph_node``: ``nnx.graph.is_graph_node`` (``nnx.graphlib`` in 0.12).
- ``iter_modules``, ``variable_value``, ``set_variable_value``,
  ``raw_variable_value``: public spellings that differ between 0.11 and 0.12.

``flax.nnx`` is imported inside the NNX functions only, so Linen users do not
load it.
"""

from __future__ import annotations

import collections.abc
from typing import Any, Callable, Iterator, List, Optional, Tuple

from flax import errors as flax_errors
from flax.core import DenyList

# Linen ------------------------------------------------------------------------


def scope_debug_path(scope: object) -> Optional[Tuple[str, ...]]:
  """The ``debug_path`` of a Linen scope, or None if Flax does not say.

  ``Scope.debug_path`` is the module path with the lifted transforms it runs
  in named (``('map_variables(dense)',)``, ``('scan(blocks)', 'Dense_0')``);
  outside any lifted transform it equals the module path. Checked on flax
  0.11.2 and 0.12.8.

  Args:
    scope: a Linen module's ``scope`` (None for an unbound module).

  Returns:
    The entries as strings, or None when ``scope`` has none (unbound, or a
    Flax release that moved it).

  Example:
    >>> import flax.linen as nn, jax.numpy as jnp
    >>> class Probe(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     print(scope_debug_path(self.scope))
    ...     return x
    >>> _ = Probe().apply({}, jnp.ones(1))
    ()
  """
  debug_path = getattr(scope, 'debug_path', None)
  if debug_path is None:
    return None
  try:
    return tuple(str(entry) for entry in debug_path)
  except TypeError:  # not iterable: moved or changed
    return None


def map_variables_scope(scope: object) -> Optional[str]:
  """The scope's debug path joined by ``/`` if an ``nn.map_variables`` lies on it.

  ``map_variables`` hands the layer a function of its stored variables
  (``nn.SpectralNorm``, ``nn.WeightNorm``, weight standardisation, masks all
  go through it) and names itself ``'map_variables(...)'`` in the debug path.
  Checked on flax 0.11.2 and 0.12.8.

  Returns:
    e.g. ``'map_variables(dense)'``, or None when no ``map_variables`` is on
    the path or Flax does not say (see ``scope_debug_path``).
  """
  debug_path = scope_debug_path(scope) or ()
  if any(entry.startswith('map_variables(') for entry in debug_path):
    return '/'.join(debug_path)
  return None


def inside_lifted_transform(scope: object, path: Tuple[str, ...]) -> bool:
  """Whether the module at ``path`` runs inside a lifted transform (``nn.scan``, ...).

  A lifted transform names itself in the debug path, which otherwise equals
  the module path. Checked on flax 0.11.2 and 0.12.8.

  Returns:
    True when the debug path differs from ``path``, and when Flax does not
    say (the cautious answer: the statistic is then carried out of the pass
    as a lifted one's must be).
  """
  debug_path = scope_debug_path(scope)
  return debug_path is None or debug_path != tuple(path)


def _names(filter_like: object) -> Optional[frozenset]:
  """The collection names of a name / collection-of-names filter, else None."""
  if isinstance(filter_like, str):
    return frozenset((filter_like,))
  if isinstance(filter_like, collections.abc.Collection) and all(
    isinstance(name, str) for name in filter_like
  ):
    return frozenset(filter_like)
  return None


def _union_filters_fallback(mutable: Any, collection: str) -> Any:
  """``mutable`` (a Flax collection filter) that also admits ``collection``."""
  if mutable is True or mutable is False:
    return True if mutable else {collection}
  if isinstance(mutable, DenyList):
    deny = mutable.deny
    if deny is True or deny is False:  # nothing / everything mutable
      return {collection} if deny else True
    names = _names(deny)
    if names is not None:
      return DenyList(set(names - {collection}))
  names = _names(mutable)
  if names is None:
    raise flax_errors.InvalidFilterError(mutable)
  return set(names | {collection})


def union_filters(mutable: Any, collection: str) -> Any:
  """The Linen ``mutable=`` filter ``mutable`` with ``collection`` made mutable too.

  Uses ``flax.core.scope.union_filters`` (checked on flax 0.11.2 and 0.12.8);
  where a Flax release moved it, merges the filter itself: a bool, a name, a
  collection of names or a ``flax.core.DenyList`` of those.

  Raises:
    flax.errors.InvalidFilterError: ``mutable`` is no collection filter.

  Example:
    >>> sorted(union_filters(['batch_stats'], 'tract_stats'))
    ['batch_stats', 'tract_stats']
    >>> union_filters(True, 'tract_stats')
    True
  """
  try:
    from flax.core.scope import union_filters as flax_union  # pylint: disable=g-import-not-at-top
  except ImportError:
    return _union_filters_fallback(mutable, collection)
  return flax_union(mutable, collection)


# NNX --------------------------------------------------------------------------

#: The attribute ``nnx.capture`` keeps its collected variables in, per module.
_CAPTURES = '__captures__'
#: The per-instance set of data attribute names of an NNX object.
_NODES = '_pytree__nodes'


def nnx_has_capture() -> bool:
  """Whether this Flax has ``nnx.capture`` (0.12.6 and later; not 0.11.2)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return hasattr(nnx, 'capture')


def capture_active(module: object) -> bool:
  """Whether an ``nnx.capture`` is collecting on ``module`` (or failed and left its traces).

  ``nnx.capture`` sets ``__captures__`` on every module of the model for the
  call, and takes it off when the captured function returns (not when it
  raises). Checked on flax 0.12.8; False on 0.11.2, which has no capture.
  """
  return hasattr(module, _CAPTURES)


def sow_into_capture(module: Any, variable_type: type, name: str, value: object) -> bool:
  """Sows ``value`` into the active ``nnx.capture`` if it collects ``variable_type``.

  Returns:
    True if it was sown; False (and nothing done) when no capture is active on
    ``module`` or the active one does not collect ``variable_type``: the
    caller stores ``value`` itself. Checked on flax 0.11.2 and 0.12.8 (where
    ``Module.sow`` returns False for a type the capture does not collect).
  """
  return capture_active(module) and bool(module.sow(variable_type, name, value))


def drop_captures(model: Any) -> None:
  """Removes what a failed ``nnx.capture`` leaves on the modules of ``model``.

  Checked on flax 0.12.8 (a no-op on 0.11.2, which has no capture).
  """
  for _, module in iter_modules(model):
    if capture_active(module):
      delattr(module, _CAPTURES)


#: ``(module, its registered data attribute names)`` for each module of a model.
RegisteredNodes = List[Tuple[Any, Any]]


def registered_nodes(model: Any) -> RegisteredNodes:
  """Each module of ``model`` with its set of registered data attributes.

  Flax before 0.12 registers an attribute that holds a Variable in the
  module's ``_pytree__nodes`` (a frozenset) when it is set, but ``nnx.pop``
  deletes the attribute without unregistering it, so its name would stay in
  the model's GraphDef. ``unregister_popped`` undoes that from this
  snapshot. Checked on flax 0.11.2 (needed) and 0.12.8 (a mapping, kept
  right by Flax: nothing to undo).
  """
  return [(module, vars(module).get(_NODES)) for _, module in iter_modules(model)]


def unregister_popped(registered: RegisteredNodes, name: str) -> None:
  """Unregisters the popped attribute ``name`` (see ``registered_nodes``)."""
  for module, before in registered:
    nodes = vars(module).get(_NODES)
    if not isinstance(nodes, frozenset) or name not in nodes or name in vars(module):
      continue  # Flax 0.12+ keeps a mapping and unregisters on delete
    after = nodes - {name}
    # the very object from before keeps the GraphDef's text (set order) as it was
    object.__setattr__(module, _NODES, before if before == after else after)


def swap_class(module: object, cls: type) -> None:
  """Makes the live NNX object ``module`` an instance of ``cls``, in place.

  ``cls`` is a subclass of ``type(module)`` without ``__slots__`` (or the
  original class, to swap back). The swap goes around NNX's ``__setattr__``,
  which would register ``__class__`` as an attribute. NNX registers every
  subclass as a graph node type when it is defined, and records a module's
  type in its GraphDef, so ``nnx.split`` / ``nnx.merge`` (and the copies NNX
  transforms make) keep the subclass. Checked on flax 0.11.2 and 0.12.8.
  """
  object.__setattr__(module, '__class__', cls)


def _graph_node_test() -> Optional[Callable[[Any], bool]]:
  from flax import nnx  # pylint: disable=g-import-not-at-top

  for module_name in ('graphlib', 'graph'):  # 0.12 first, then 0.11
    test = getattr(getattr(nnx, module_name, None), 'is_graph_node', None)
    if callable(test):
      return test
  return None


def is_graph_node(value: object) -> bool:
  """Whether ``value`` is an NNX graph node (a Module, an ``nnx.Rngs``, a Variable).

  Uses ``nnx.graphlib.is_graph_node`` (flax 0.12.8) or
  ``nnx.graph.is_graph_node`` (flax 0.11.2); where a Flax release moved both,
  falls back to the public base classes every graph node type derives from
  (``nnx.Pytree``, ``nnx.Variable``).

  Example:
    >>> from flax import nnx
    >>> is_graph_node(nnx.Rngs(0)), is_graph_node(1.0)
    (True, False)
  """
  test = _graph_node_test()
  if test is not None:
    return bool(test(value))
  from flax import nnx  # pylint: disable=g-import-not-at-top

  return isinstance(value, (nnx.Pytree, nnx.Variable))


def iter_modules(model: Any) -> Iterator[Tuple[Tuple[Any, ...], Any]]:
  """``(path, module)`` of ``model`` and its submodules: ``nnx.iter_modules``
  (flax 0.12.8) or the ``Module.iter_modules`` method (flax 0.11.2)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  if hasattr(nnx, 'iter_modules'):
    return nnx.iter_modules(model)
  return model.iter_modules()


def variable_value(variable: Any) -> Any:
  """An NNX Variable's value: ``get_value()`` (flax 0.12.8) or ``.value`` (0.11.2)."""
  if hasattr(variable, 'get_value'):
    return variable.get_value()
  return variable.value


def set_variable_value(variable: Any, value: object) -> None:
  """Sets an NNX Variable's value: ``set_value`` (flax 0.12.8) or ``.value =`` (0.11.2)."""
  if hasattr(variable, 'set_value'):
    variable.set_value(value)
  else:
    variable.value = value


def raw_variable_value(variable: object) -> object:
  """The array a Variable holds, as stored (its identity changes when it is set).

  ``get_raw_value()`` (flax 0.12.8) or ``.raw_value`` (0.11.2; deprecated in
  0.12); None for anything else (no Variable).
  """
  getter = getattr(variable, 'get_raw_value', None)
  if callable(getter):
    return getter()
  return getattr(variable, 'raw_value', None)
