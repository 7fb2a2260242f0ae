"""Error and warning messages are short: what is wrong and what to do, then a docs pointer.

The explanation of a refusal lives once, in the docs; a message says the problem and the fix
in a sentence or two (at most MAX_CHARS characters of its own text, the docs pointer from
``docs_link.see`` not counted) and points there. Measured on the source: every string
constant that makes up the message of an error built (``raise``d or returned) or of a
``warnings.warn``, or a module-level
message constant (an UPPER_CASE name bound to text), placeholders not counted.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / 'tract_optax').rglob('*.py'))
MAX_CHARS = 320


def _text(node) -> str:
  """The constant text of a message expression (f-string placeholders, see() left out)."""
  parts = []
  for child in ast.walk(node):
    if isinstance(child, ast.Call) and getattr(child.func, 'attr', None) == 'see':
      for inner in ast.walk(child):  # the docs pointer is not the message
        inner._skip = True  # type: ignore[attr-defined]
    if isinstance(child, ast.FormattedValue) and child.format_spec is not None:
      for inner in ast.walk(child.format_spec):  # '.3g' and the like
        inner._skip = True  # type: ignore[attr-defined]
  for child in ast.walk(node):
    if getattr(child, '_skip', False):
      continue
    if isinstance(child, ast.Constant) and isinstance(child.value, str):
      parts.append(child.value)
  return ''.join(parts)


def _is_error_class(func) -> bool:
  name = getattr(func, 'id', None) or getattr(func, 'attr', None) or ''
  return name.endswith(('Error', 'Exception'))


def _messages():
  for source in SOURCES:
    tree = ast.parse(source.read_text())
    raised: set = set()  # calls already read as a raise's message
    for node in ast.walk(tree):
      if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
        raised.add(id(node.exc))
        yield f'{source.name}:{node.lineno}', _text(node.exc.args[0])
      elif (
        isinstance(node, ast.Call)
        and id(node) not in raised
        and _is_error_class(node.func)
        and node.args
      ):  # an error built to be raised elsewhere (return ValueError(...))
        yield f'{source.name}:{node.lineno}', _text(node.args[0])
      elif (
        isinstance(node, ast.Call)
        and getattr(node.func, 'attr', None) == 'warn'
        and node.args
      ):
        yield f'{source.name}:{node.lineno}', _text(node.args[0])
    for node in tree.body:  # module-level message constants
      if (
        isinstance(node, ast.Assign)
        and all(isinstance(t, ast.Name) and t.id.isupper() and t.id.lstrip('_') for t in node.targets)
        and any(isinstance(t, ast.Name) and ('MESSAGE' in t.id or 'TEXT' in t.id or t.id.startswith('_')) for t in node.targets)
      ):
        text = _text(node.value)
        if ' ' in text:  # prose, not a name or a layout string
          yield f'{source.name}:{node.lineno}', text


MESSAGES = list(_messages())


def test_messages_are_found():
  assert len(MESSAGES) > 50


@pytest.mark.parametrize('where,text', MESSAGES, ids=[where for where, _ in MESSAGES])
def test_message_is_short(where, text):
  assert len(text) <= MAX_CHARS, f'{where}: {len(text)} characters: {text[:120]}...'
