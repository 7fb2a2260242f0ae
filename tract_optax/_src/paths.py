"""Module paths: how ``tract_stats`` keys name kernels in a gradient pytree.

A module path is a tuple of names, e.g. ``('stem',)`` or
``('backbone', 'patch_embed')``; ``'backbone/patch_embed'`` is accepted too.
The kernel of the module at ``path`` is the leaf whose key path reads
``path + ('kernel',)`` (above a trailing ``.value`` for NNX variables), or
``('params',) + path + ('kernel',)`` when a whole Linen variables dict is
passed; ``find_kernel`` tries both and refuses to guess if both exist.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, SupportsIndex, Tuple, Union, cast

import jax

#: A module path: names, e.g. ``('backbone', 'stem')`` (NNX's paths, before
#: ``normalize_path``, hold list indices as ints). The one path type.
ModulePath = Tuple[Any, ...]
PathLike = Union[str, Tuple[Any, ...]]

KERNEL_NAME = 'kernel'


class ModulePathError(KeyError):
  """A module path names no layer (or kernel) where it is looked up.

  A ``KeyError`` (code that catches one keeps working) whose message prints
  as the sentence it is, not as a quoted key.

  Example:
    >>> print(ModulePathError('No layer at path stem.'))
    No layer at path stem.
  """

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ''


def reject_ambiguous_paths(layers: Any, argument: str = 'layers') -> None:
  """Raises ``TypeError`` for a tuple of names: one nested path, or several?

  ``('backbone', 'stem')`` could be the layer ``backbone/stem`` or the two
  top-level layers ``backbone`` and ``stem``; the caller must say which, with a
  list. Shared by ``tract(layers=...)`` and the Flax glue.

  Example:
    >>> reject_ambiguous_paths(['stem', ('backbone', 'stem')])  # a list: fine
    >>> reject_ambiguous_paths(('backbone', 'stem'))
    Traceback (most recent call last):
    ...
    TypeError: layers=('backbone', 'stem') is ambiguous: one nested path or several paths? Pass a list: [('backbone', 'stem')] for the layer at that path, or ['backbone', 'stem'] for several top-level layers.
  """
  if isinstance(layers, tuple) and layers and all(isinstance(part, (str, int)) for part in layers):
    raise TypeError(
      f'{argument}={layers!r} is ambiguous: one nested path or several paths? '
      f'Pass a list: [{layers!r}] for the layer at that path, or '
      f'{list(layers)!r} for several top-level layers.'
    )


def normalize_paths(
  layers: Union[str, Sequence[PathLike]], argument: str = 'layers'
) -> List[ModulePath]:
  """A string or a list of paths as module paths (a tuple of names refused).

  Raises:
    TypeError: for a tuple of names (see ``reject_ambiguous_paths``) or a
      malformed path.

  Example:
    >>> normalize_paths(['stem', ('backbone', 'layers', 0)])
    [('stem',), ('backbone', 'layers', '0')]
    >>> normalize_paths('backbone/stem')
    [('backbone', 'stem')]
  """
  if isinstance(layers, str):
    return [normalize_path(layers)]
  reject_ambiguous_paths(layers, argument)
  try:
    items = list(layers)
  except TypeError:
    raise TypeError(
      f'{argument} must be a list of module paths (tuples of names or "a/b" '
      f'strings); got {layers!r}.'
    ) from None
  return [normalize_path(path) for path in items]


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
    return tuple(_part_name(part) for part in path)
  raise TypeError(f'A module path must be a tuple of names or an "a/b" string; got {path!r}.')


def _part_name(part: object) -> str:
  if isinstance(part, str):
    return part
  if isinstance(part, int) and not isinstance(part, bool):
    return str(part)
  if hasattr(part, '__index__') and not isinstance(part, bool):
    return str(cast(SupportsIndex, part).__index__())  # numpy integers
  raise TypeError(
    f'A module path is made of names (str) and indices (int); got {part!r} '
    f'of type {type(part).__name__}.'
  )


def _key_name(key: object) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def kernel_module_path(key_path: jax.tree_util.KeyPath) -> ModulePath | None:
  """The module path of a ``kernel`` leaf, or None if the leaf is no kernel."""
  names = [_key_name(k) for k in key_path]
  if names and names[-1] == 'value' and isinstance(key_path[-1], jax.tree_util.GetAttrKey):
    names.pop()
  if not names or names[-1] != KERNEL_NAME:
    return None
  names.pop()
  return tuple(names)


def kernel_leaf_index(tree: Any) -> Dict[ModulePath, int]:
  """Maps the module path of every ``kernel`` leaf to its flat leaf index.

  Example:
    >>> grads = {'stem': {'kernel': 1.0, 'bias': 2.0}, 'head': {'kernel': 3.0}}
    >>> sorted(kernel_leaf_index(grads).items())
    [(('head',), 0), (('stem',), 2)]
  """
  leaves_with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
  index: Dict[ModulePath, int] = {}
  for position, (key_path, _) in enumerate(leaves_with_path):
    module = kernel_module_path(key_path)
    if module is not None:
      index[module] = position
  return index


def find_kernel(kernel_index: Dict[ModulePath, int], path: ModulePath) -> Optional[int]:
  """The leaf index of the kernel of module ``path``, or None if there is none.

  ``path`` as given, or below a top-level ``'params'`` collection (a Linen
  variables dict); a module really named ``params`` (NNX) is found as given.

  Raises:
    ValueError: if both spellings name a kernel (the tree is ambiguous).

  Example:
    >>> index = kernel_leaf_index({'params': {'stem': {'kernel': 1.0}}})
    >>> find_kernel(index, ('stem',)), find_kernel(index, ('head',))
    (0, None)
  """
  found = [candidate for candidate in (path, ('params',) + path) if candidate in kernel_index]
  if len(found) > 1:
    raise ValueError(
      f'The module path {path!r} is ambiguous: the tree has a kernel under '
      f'{found[0]!r} and under {found[1]!r}. Pass the updates of the params '
      'collection alone (grads["params"]), or name the full path.'
    )
  return kernel_index[found[0]] if found else None


def require_kernel(
  kernel_index: Dict[ModulePath, int], path: ModulePath, source: str, tree: str, hint: str = ''
) -> int:
  """``find_kernel``, raising a ``ModulePathError`` that lists the kernels.

  Args:
    kernel_index: from ``kernel_leaf_index``.
    path: the module path asked for.
    source: who names it, e.g. ``'tract_stats'``.
    tree: what was searched, e.g. ``'the updates'``.
    hint: a sentence to append.

  Raises:
    ModulePathError: (a ``KeyError``) if no kernel is under ``path``.
  """
  position = find_kernel(kernel_index, path)
  if position is None:
    raise ModulePathError(
      f'{source} names the module path {path!r} ({format_path(path)!r}), but '
      f"{tree} have no 'kernel' under it. " + kernel_paths_text(kernel_index) + hint
    )
  return position


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
