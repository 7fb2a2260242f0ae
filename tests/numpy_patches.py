"""The obvious patch matrix of a Flax convolution, by numpy loops (test reference).

Independent of tract_optax: padding is applied with ``np.pad`` and every row is
read off one window position at a time, in Flax kernel order (window-major,
channel-minor), so ``rows[g] @ kernel[..., g-th output block]`` is the
convolution's output.
"""

from __future__ import annotations

import itertools
from typing import Sequence, Tuple, Union

import numpy as np

Padding = Union[str, int, Sequence[Union[int, Tuple[int, int]]]]


def _pads(padding: Padding, in_shape, window, strides):
  if isinstance(padding, int):
    return [(padding, padding)] * len(in_shape)
  if isinstance(padding, str):
    name = padding.upper()
    if name in ('CIRCULAR', 'REFLECT'):
      return [((w - 1) // 2, w // 2) for w in window]
    if name == 'CAUSAL':
      return [(window[0] - 1, 0)]
    if name == 'VALID':
      return [(0, 0)] * len(in_shape)
    assert name == 'SAME', padding
    pads = []
    for size, w, s in zip(in_shape, window, strides):
      out = -(-size // s)
      total = max((out - 1) * s + w - size, 0)
      pads.append((total // 2, total - total // 2))
    return pads
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def patch_rows(x: np.ndarray, kernel_size: Sequence[int], strides: Sequence[int],
               padding: Padding, dilation: Sequence[int], groups: int = 1) -> np.ndarray:
  """``(groups, N, n)`` patch rows of channels-last ``x`` (one batch axis)."""
  x = np.asarray(x, np.float64)
  spatial = x.shape[1:-1]
  window = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
  pads = _pads(padding, spatial, window, strides)
  mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}.get(
      padding.upper() if isinstance(padding, str) else '', 'constant')
  x = np.pad(x, [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)], mode=mode)
  out_shape = [(size - w) // s + 1
               for size, w, s in zip(x.shape[1:-1], window, strides)]
  channels = x.shape[-1] // groups
  rows = [[] for _ in range(groups)]
  for b in range(x.shape[0]):
    for position in itertools.product(*[range(o) for o in out_shape]):
      for g in range(groups):
        row = []
        for offset in itertools.product(*[range(k) for k in kernel_size]):
          index = tuple(p * s + o * d for p, s, o, d
                        in zip(position, strides, offset, dilation))
          row.extend(x[(b,) + index + (slice(g * channels, (g + 1) * channels),)])
        rows[g].append(row)
  return np.asarray(rows)
