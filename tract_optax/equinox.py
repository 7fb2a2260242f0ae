"""TrAct for Equinox layers (needs Equinox: ``pip install equinox``).

- ``apply_tract``: an ``eqx.nn.Linear`` / ``eqx.nn.Conv`` applied to the
  whole batch, its weight's gradient TrAct's.
- ``tract_layer``: the layer with its weight wrapped, to swap into a
  model before ``jax.vmap(model)(x)``.
- ``layer_stats``: the layer's input statistic for the Optax route,
  geometry (padding, stride, dilation, groups) read off the layer.
- ``conv_padding``: the explicit padding an Equinox conv applies.
- ``TractLayer``: the layer, its statistic taken from the input it
  receives (safe under Equinox's per-example ``jax.vmap`` with ``axis_name``).

``import tract_optax`` does not import this module (nor Equinox).
"""

import importlib.util as _importlib_util

if _importlib_util.find_spec('equinox') is None:
  raise ImportError(
    'tract_optax.equinox needs Equinox, which is not installed: pip install '
    'equinox (the core, tract_optax.tract / tract_kernel / dense_stats / '
    'conv_stats, works without it).'
  )

from tract_optax._src.equinox import (  # after the Equinox check
  TractLayer,
  apply_tract,
  conv_padding,
  layer_stats,
  tract_layer,
)

__all__ = [
  'TractLayer',
  'apply_tract',
  'conv_padding',
  'layer_stats',
  'tract_layer',
]
