"""Independent reference computations in plain numpy, for the tests.

Nothing here uses tract_optax or XLA's patch extraction: patches are gathered
with explicit loops (:func:`explicit_patches`, the one numpy patch builder),
padding is computed from its definition (:func:`same_pads`, :func:`flax_pads`).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence, Tuple, Union

import numpy as np


def same_pads(in_size: int, kernel: int, stride: int, dilation: int):
  """(low, high) padding of XLA's 'SAME' for one spatial dimension."""
  effective = (kernel - 1) * dilation + 1
  out = -(-in_size // stride)
  total = max((out - 1) * stride + effective - in_size, 0)
  return total // 2, total - total // 2


def explicit_patches(x, kernel_size, strides, pads, dilation, groups=1,
                     pad_mode='constant'):
  """Patch matrix of a channels-last conv, window-major / channel-minor rows.

  Args:
    x: ``(B, *spatial, C)`` numpy array.
    kernel_size, strides, dilation: one int per spatial dim.
    pads: (low, high) per spatial dim, applied with ``pad_mode``.
    groups: channel groups; the result is then ``(groups, N, n)``.

  Returns:
    ``(N, n)`` (groups == 1) or ``(groups, N, n)`` float64 array.
  """
  x = np.asarray(x, np.float64)
  padded = np.pad(x, [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)], mode=pad_mode)
  spatial = padded.shape[1:-1]
  out_shape = [
      (size - ((k - 1) * d + 1)) // s + 1
      for size, k, s, d in zip(spatial, kernel_size, strides, dilation)]
  channels = x.shape[-1]
  per_group = channels // groups
  result = []
  for g in range(groups):
    rows = []
    for b in range(x.shape[0]):
      for out_index in itertools.product(*[range(o) for o in out_shape]):
        row = []
        for offset in itertools.product(*[range(k) for k in kernel_size]):
          position = tuple(o * s + k * d for o, k, s, d in
                           zip(out_index, offset, strides, dilation))
          row.extend(padded[(b,) + position][g * per_group:(g + 1) * per_group])
        rows.append(row)
    result.append(np.array(rows))
  return result[0] if groups == 1 else np.stack(result)


Padding = Union[str, int, Sequence[Union[int, Tuple[int, int]]]]


def flax_pads(padding: Padding, spatial_shape: Sequence[int], kernel_size: Sequence[int],
              strides: Sequence[int], dilation: Sequence[int]):
  """``(pads, pad_mode)`` of a padding as Flax's Conv takes it, for :func:`explicit_patches`.

  Args:
    padding: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``, ``'CAUSAL'``
      (1-D), an int, or one int or ``(low, high)`` pair per spatial dimension.
    spatial_shape, kernel_size, strides, dilation: one int per spatial dim.

  Returns:
    ``[(low, high), ...]`` per spatial dim and numpy's ``np.pad`` mode.
  """
  windows = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
  if isinstance(padding, int):
    return [(padding, padding)] * len(spatial_shape), 'constant'
  if isinstance(padding, str):
    name = padding.upper()
    if name == 'SAME':
      return [same_pads(size, k, s, d) for size, k, s, d in
              zip(spatial_shape, kernel_size, strides, dilation)], 'constant'
    if name == 'VALID':
      return [(0, 0)] * len(spatial_shape), 'constant'
    if name == 'CAUSAL':
      return [(windows[0] - 1, 0)], 'constant'
    mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[name]
    return [((w - 1) // 2, w // 2) for w in windows], mode
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding], 'constant'


def patch_rows(x, kernel_size, strides, padding: Padding, dilation, groups=1):
  """``(groups, N, n)`` patch rows of a Flax Conv, ``padding`` as Flax takes it.

  ``rows[g] @ kernel[..., g-th output block].reshape(-1, c_out // groups)`` is
  the convolution's output (window-major, channel-minor rows).
  """
  x = np.asarray(x, np.float64)
  pads, mode = flax_pads(padding, x.shape[1:-1], kernel_size, strides, dilation)
  rows = explicit_patches(x, kernel_size, strides, pads, dilation, groups, pad_mode=mode)
  return rows[None] if groups == 1 else rows


def tract_solve(rows, grad, lam):
  """``(A^T A / N + lam I)^{-1} G`` by numpy's dense solve, float64."""
  rows = np.asarray(rows, np.float64)
  grad = np.asarray(grad, np.float64)
  n = rows.shape[1]
  system = rows.T @ rows / rows.shape[0] + lam * np.eye(n)
  return np.linalg.solve(system, grad.reshape(n, -1)).reshape(grad.shape)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def num_features(kernel_shape) -> int:
  return math.prod(kernel_shape[:-1])
