"""TrAct for Flax NNX models (needs the ``flax`` extra).

- ``apply_tract``: the gradient route, ``model(*args)`` whose gradient is
  TrAct's for the first layer's kernel.
- ``value_and_grad_with_stats``: the Optax route, ``nnx.value_and_grad``
  plus the first layer's statistic for ``nnx.Optimizer.update(...,
  tract_stats=...)``; ``apply_with_stats`` and ``capture_stats`` are
  its building blocks.
- ``layer_input_stats``: the statistic of one layer's input.
- ``TractInputStats``: the variable type the statistics are sown as;
  give it an axis in ``nnx.vmap`` / ``nnx.scan``'s ``StateAxes``.
"""

from tract_optax._src.flax_glue import require_flax

require_flax('tract_optax.nnx')

from tract_optax._src.nnx import (  # noqa: E402  (after the Flax check)
  TractInputStats,
  apply_tract,
  apply_with_stats,
  capture_stats,
  layer_input_stats,
  value_and_grad_with_stats,
)

__all__ = [
  'TractInputStats',
  'apply_tract',
  'apply_with_stats',
  'capture_stats',
  'layer_input_stats',
  'value_and_grad_with_stats',
]
