"""The parity cases against the authors' PyTorch reference, shared by the test and
the script that records its golden outputs (``tests/golden/make_torch_golden.py``).

Nothing here imports torch: the cases are plain data, and the golden file holds
what ``torch_tract`` 1.0.0 returned for each.
"""

from __future__ import annotations

import pathlib
from typing import Dict, Tuple

#: TrAct's lambda in every case.
LAM = 0.1

#: Case dtypes, as numpy names.
DTYPES: Tuple[str, ...] = ('float64', 'float32')

#: Linear layers: (input shape, out_features).
LINEAR_CASES = (
    ((64, 10), 7),       # N > n
    ((8, 16, 12), 5),    # ViT-like batch x tokens x features
    ((5, 24), 6),        # N < n: Woodbury branch in both
    ((2, 3, 20), 4),     # N = 6 < n = 20 with 3-D inputs
)

#: Conv2d layers: (batch, channels, size, kernel, stride, padding); 6 out channels.
CONV_CASES = (
    (4, 3, 10, 3, 1, 1),
    (4, 3, 11, 3, 2, 1),
    (2, 1, 12, 5, 2, 2),
    (3, 2, 9, 3, 1, 0),
    (2, 3, 16, 4, 4, 0),   # ViT-style patchify
    (2, 4, 8, 1, 1, 0),
    (1, 8, 3, 3, 1, 0),    # N = 1 < n = 72: Woodbury
    (2, 6, 4, 3, 2, 1),    # N = 8 < n = 54: Woodbury
)
CONV_OUT_CHANNELS = 6

#: One SGD step of a conv stem through optax.chain (float32).
STEP_CASE = 'chain_sgd_step'
STEP_LEARNING_RATE = 0.5

#: The golden outputs of torch_tract, one compressed .npz.
GOLDEN_PATH = pathlib.Path(__file__).resolve().parent / 'golden' / 'torch_tract_parity.npz'


def linear_id(shape, out_features) -> str:
  return f'linear_{"x".join(map(str, shape))}_to_{out_features}'


def conv_id(batch, channels, size, kernel, stride, padding) -> str:
  return f'conv2d_b{batch}_c{channels}_s{size}_k{kernel}_st{stride}_p{padding}'


def key(case_id: str, dtype: str, name: str) -> str:
  """Name of one array in the golden file, e.g. ``'linear_64x10_to_7__float32__tract'``."""
  return f'{case_id}__{dtype}__{name}'


def case_arrays(golden: Dict[str, object], case_id: str, dtype: str) -> Dict[str, object]:
  """The arrays stored for one case: ``{'x', 'plain', 'tract', ...}``."""
  prefix = f'{case_id}__{dtype}__'
  return {name[len(prefix):]: golden[name] for name in golden if name.startswith(prefix)}
