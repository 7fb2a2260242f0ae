"""TrAct for Haiku models (needs the ``haiku`` extra: ``pip install "tract_optax[haiku]"``).

- ``apply_tract``: the gradient route, a transformed function's ``apply``
  whose gradient is TrAct's for the first layer's ``'w'``; the layer's
  output is computed by ``tract_optax.conv`` / ``tract_optax.dense`` with
  the geometry read off the ``hk.ConvND`` / ``hk.Linear`` module.

``import tract_optax`` does not import this module (nor Haiku).
"""

import importlib.util as _importlib_util

if _importlib_util.find_spec('haiku') is None:
  raise ImportError(
    'tract_optax.haiku needs Haiku, which is not installed. Install the extra: '
    'pip install "tract_optax[haiku]" (the core, tract_optax.tract / '
    'tract_kernel / dense_stats / conv_stats, works without it).'
  )

from tract_optax._src.haiku import apply_tract  # after the Haiku check

__all__ = ['apply_tract']
