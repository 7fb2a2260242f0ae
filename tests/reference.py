"""Independent reference computations in plain numpy, for the tests.

Nothing here uses tract_optax or XLA's patch extraction: patches are gathered
with explicit loops, padding is computed from its definition.
"""

from __future__ import annotations

import itertools
import math

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
