"""tract_optax: TrAct (trainable first-layer pre-activations) for JAX and Optax.

Two routes to TrAct gradients:

- the Optax route: ``tract(...)`` first in an ``optax.chain``, fed the first
  layer's input statistic (``tract_stats``) at each update;
- the gradient route: ``tract_kernel`` (or the Flax glue's ``apply_tract``)
  makes backpropagation itself return the TrAct gradient, so any optimizer and
  trainer work unchanged.

Example:
  >>> import optax, tract_optax
  >>> tx = optax.chain(tract_optax.tract(lam=0.1), optax.adam(1e-3))
"""

import types

from tract_optax._src.axes import AxisDetectionWarning
from tract_optax._src.capture import conv_settings, mark_linear_kernel
from tract_optax._src.conv import conv_patches, conv_stats
from tract_optax._src.gradient_route import tract_kernel
from tract_optax._src.layer_ops import conv, dense
from tract_optax._src.precondition import ConditioningWarning, precondition
from tract_optax._src.stats import (
  TractStats,
  all_reduce_stats,
  combine_stats,
  dense_stats,
  stats_from_rows,
)
from tract_optax._src.transform import TractState, allow_before_tract, stats_due, tract
from tract_optax._version import __version__ as __version__

__all__ = [
  'AxisDetectionWarning',
  'ConditioningWarning',
  'TractState',
  'TractStats',
  'all_reduce_stats',
  'allow_before_tract',
  'combine_stats',
  'conv',
  'conv_patches',
  'conv_settings',
  'conv_stats',
  'dense',
  'dense_stats',
  'mark_linear_kernel',
  'precondition',
  'stats_due',
  'stats_from_rows',
  'tract',
  'tract_kernel',
]

_GLUE = ('linen', 'nnx', 'equinox', 'haiku')  # imported on first use: they import their framework


def __getattr__(name: str) -> types.ModuleType:
  """``tract_optax.linen`` / ``.nnx`` / ``.equinox`` / ``.haiku`` without importing their framework."""
  if name in _GLUE:
    import importlib

    return importlib.import_module(f'tract_optax.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
