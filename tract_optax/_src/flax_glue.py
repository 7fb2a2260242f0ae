"""The one place that checks Flax is importable before the Flax glue loads."""

from __future__ import annotations

import importlib.util

FLAX_EXTRA_HINT = 'pip install "tract_optax[flax]"'


def require_flax(glue_module: str) -> None:
  """Raises a clear ``ImportError`` when Flax is not installed.

  ``tract_optax`` itself needs only JAX and Optax; its Flax glue
  (``tract_optax.linen``, ``tract_optax.nnx``) needs Flax too, which the
  ``flax`` extra installs.

  Args:
    glue_module: The public module asking, e.g. ``'tract_optax.linen'``.

  Raises:
    ImportError: Flax cannot be imported; the message names the extra.
  """
  if importlib.util.find_spec('flax') is None:
    raise ImportError(
      f'{glue_module} needs Flax, which is not installed. Install the '
      f'extra: {FLAX_EXTRA_HINT} (the core, tract_optax.tract / '
      'tract_kernel / dense_stats / conv_stats, works without it).'
    )
