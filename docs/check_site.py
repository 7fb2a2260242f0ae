"""Checks the built docs site as a reader sees it; CI runs it after ``mkdocs build``.

Usage: ``python docs/check_site.py SITE_DIR``. Fails (exit 1, one line per
finding) when a page shows

- a raw Sphinx role (``:func:`x```, ``:class:`x``` ...) as text: MkDocs does not
  render them, so docstrings must use Markdown (backticks, cross-references);
- a Returns or Yields section split into several rows: a Google-style section
  describes one value, and its continuation lines belong to that one row.
"""

from __future__ import annotations

import html
import pathlib
import re
import sys

_ROLE = re.compile(r':(?:func|class|mod|meth|attr|data|exc|obj|py:\w+):`?[~\w.]+')
_SECTION = re.compile(
  r'<span class="doc-section-title">(Returns|Yields):</span>.*?<tbody>(.*?)</tbody>', re.S
)
_ROW = re.compile(r'<tr class="doc-section-item">')


def _visible_text(page: str) -> str:
  without_code_blocks = re.sub(r'<pre.*?</pre>', '', page, flags=re.S)
  return html.unescape(re.sub(r'<[^>]+>', '', without_code_blocks))


def findings(site: pathlib.Path) -> list[str]:
  """What is wrong on the site's pages, one line each (empty: nothing)."""
  found = []
  for page_path in sorted(site.rglob('*.html')):
    page = page_path.read_text(encoding='utf-8')
    name = page_path.relative_to(site)
    for role in sorted(set(_ROLE.findall(_visible_text(page)))):
      found.append(f'{name}: raw Sphinx role shown as text: {role}')
    for section, body in _SECTION.findall(page):
      rows = len(_ROW.findall(body))
      if rows > 1:
        found.append(f'{name}: a {section} section split into {rows} rows')
  return found


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(__doc__.strip().splitlines()[2], file=sys.stderr)
    return 2
  site = pathlib.Path(argv[1])
  if not (site / 'index.html').exists():
    print(f'{site} holds no built site (index.html missing)', file=sys.stderr)
    return 2
  problems = findings(site)
  for line in problems:
    print(line)
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
