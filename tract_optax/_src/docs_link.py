"""Links from error messages to the documentation page that explains them.

A message says what is wrong and what to do in a sentence or two; the
explanation lives once, in the docs (``docs/`` in the repository, the MkDocs
site), and the message ends with a pointer to its section.
"""

from __future__ import annotations

import re

#: Where the docs live, relative to the repository root (also the site's pages).
DOCS_ROOT = 'docs'


def anchor_of(heading: str) -> str:
  """The anchor MkDocs gives a Markdown heading (its ``toc`` slug).

  Example:
    >>> anchor_of('Where `tract` sits in the chain')
    'where-tract-sits-in-the-chain'
  """
  text = re.sub(r'[^\w\s-]', '', heading.strip().lower())
  return re.sub(r'[-\s]+', '-', text).strip('-')


def see(page: str, heading: str) -> str:
  """The closing pointer of a message: `` See docs/PAGE.md#ANCHOR.``

  Args:
    page: the page's file name without ``.md``, e.g. ``'limits'``.
    heading: the section's heading text, exactly as written on the page.

  Returns:
    The sentence to append to a message (it starts with a space).

  Example:
    >>> see('limits', 'Checkpoints')
    ' See docs/limits.md#checkpoints.'
  """
  return f' See {DOCS_ROOT}/{page}.md#{anchor_of(heading)}.'
