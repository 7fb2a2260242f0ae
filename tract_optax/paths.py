"""Module paths: how ``tract_stats`` keys name kernels in a gradient pytree.

A module path is a tuple of names, e.g. ``('stem',)`` or
``('backbone', 'patch_embed')``; ``'backbone/patch_embed'`` is accepted too.
The kernel of the module at ``path`` is the leaf whose key path reads
``path + ('kernel',)``, optionally below a top-level ``'params'`` collection
(Linen variables) and above a trailing ``.value`` (NNX variables).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple, Union

import jax

ModulePath = Tuple[str, ...]
PathLike = Union[str, Tuple[Any, ...]]

KERNEL_NAME = 'kernel'


def normalize_path(path: PathLike) -> ModulePath:
  """Returns ``path`` as a tuple of strings.

  Example:
    >>> normalize_path('backbone/patch_embed')
    ('backbone', 'patch_embed')
    >>> normalize_path(('layers', 0))
    ('layers', '0')
  """
  if isinstance(path, str):
    return tuple(part for part in path.split('/') if part)
  if isinstance(path, (tuple, list)):
    return tuple(str(part) for part in path)
  raise TypeError(
      f'A module path must be a tuple of names or an "a/b" string; got {path!r}.')


def _key_name(key) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def kernel_module_path(key_path) -> ModulePath | None:
  """The module path of a ``kernel`` leaf, or None if the leaf is no kernel."""
  names = [_key_name(k) for k in key_path]
  if names and names[-1] == 'value' and isinstance(key_path[-1], jax.tree_util.GetAttrKey):
    names.pop()
  if not names or names[-1] != KERNEL_NAME:
    return None
  names.pop()
  if names and names[0] == 'params':
    names.pop(0)
  return tuple(names)


def kernel_leaf_index(tree) -> Dict[ModulePath, int]:
  """Maps the module path of every ``kernel`` leaf to its flat leaf index.

  Example:
    >>> grads = {'stem': {'kernel': 1.0, 'bias': 2.0}, 'head': {'kernel': 3.0}}
    >>> sorted(kernel_leaf_index(grads).items())
    [(('head',), 0), (('stem',), 2)]
  """
  leaves_with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
  index = {}
  for position, (key_path, _) in enumerate(leaves_with_path):
    module = kernel_module_path(key_path)
    if module is not None:
      index[module] = position
  return index


def kernel_paths_text(kernel_index: Dict[ModulePath, int]) -> str:
  """The module paths that have a kernel, for error messages.

  Example:
    >>> kernel_paths_text({('stem',): 2, ('head',): 0})
    "Module paths with a kernel: ('head',), ('stem',)."
  """
  known = ', '.join(repr(p) for p in sorted(kernel_index)) or 'none'
  return f'Module paths with a kernel: {known}.'


def format_path(path: ModulePath) -> str:
  return '/'.join(path) if path else '<root>'
