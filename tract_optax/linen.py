"""TrAct for Flax Linen models (needs the ``flax`` extra).

- ``apply_tract``: the gradient route, ``apply`` whose gradient is
  TrAct's for the first layer's kernel; nothing else in the trainer changes.
- ``apply_with_stats``: the Optax route's capture, ``apply`` plus the
  first layer's input statistic for ``tract_optax.tract``.
- ``TractTrainState``: Flax's ``TrainState`` whose ``apply_gradients``
  forwards ``tract_stats`` to the optimizer.
- ``layer_input_stats``: the statistic of one layer's input, for
  hand-written capture.
- ``COLLECTION``: the variable collection the statistics travel in; add it
  to ``variable_axes`` of ``nn.scan`` / ``nn.vmap`` around the first layer.
"""

from tract_optax._src.flax_glue import require_flax

require_flax('tract_optax.linen')

from tract_optax._src.linen import (  # noqa: E402  (after the Flax check)
  COLLECTION,
  TractTrainState,
  apply_tract,
  apply_with_stats,
  layer_input_stats,
)

__all__ = [
  'COLLECTION',
  'TractTrainState',
  'apply_tract',
  'apply_with_stats',
  'layer_input_stats',
]
