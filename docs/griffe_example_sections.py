"""Griffe extension for the API pages: read ``Example:`` as an examples section.

The library's docstrings follow the Google style with a singular ``Example:``
heading (as the house style asks). Griffe's Google parser knows only the plural
``Examples:`` as a section and renders anything else as an admonition, where
doctest lines like ``grads['stem']['kernel']`` are read as Markdown links. This
extension renames the heading before the docstring is parsed, so the doctests
render as code. Loaded from mkdocs.yml; not part of the library.
"""

import re
from typing import Any

import griffe

_SINGULAR_HEADING = re.compile(r'^(\s*)Example:[ \t]*$', re.M)


class ExampleSections(griffe.Extension):
  """Renames ``Example:`` headings to ``Examples:`` in every docstring."""

  def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
    """Rewrites the heading of ``obj``'s docstring, if it has one."""
    del kwargs
    if obj.docstring is not None:
      obj.docstring.value = _SINGULAR_HEADING.sub(r'\1Examples:', obj.docstring.value)
