"""Every docs pointer in an error message names a page and a heading that exist."""

import ast
import pathlib

from tract_optax._src import docs_link

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / 'tract_optax').rglob('*.py'))


def _headings(page: str) -> set:
  lines = (ROOT / 'docs' / f'{page}.md').read_text().splitlines()
  return {line.lstrip('#').strip() for line in lines if line.startswith('#')}


def _see_calls():
  for source in SOURCES:
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Call)
        and getattr(node.func, 'attr', getattr(node.func, 'id', None)) == 'see'
        and len(node.args) == 2
      ):
        page, heading = (ast.literal_eval(arg) for arg in node.args)
        yield source.name, page, heading


def test_every_pointer_names_an_existing_section():
  calls = list(_see_calls())
  for source, page, heading in calls:
    assert (ROOT / 'docs' / f'{page}.md').exists(), (source, page)
    assert heading in _headings(page), (source, page, heading)


def test_anchor_matches_mkdocs_slug():
  assert docs_link.anchor_of('Per-example gradients (`jax.vmap`)') == 'per-example-gradients-jaxvmap'
  assert docs_link.see('limits', 'Checkpoints') == ' See docs/limits.md#checkpoints.'
