"""Records the golden outputs of the authors' PyTorch reference for the parity tests.

For every case in ``tests/parity_cases.py`` it builds the layer, input and
output cotangent with a fixed torch seed, and stores the input, the plain
weight gradient and ``torch_tract.TrAct``'s weight gradient (torch layout) in
``tests/golden/torch_tract_parity.npz``. The parity tests check tract_optax
against that file without torch, and against torch itself when it is
installed (``pip install -e ".[test,parity]"``).

Run from the repository root, with torch and torch_tract installed::

  python -m tests.golden.make_torch_golden

torch is imported when a case is built, not at import time, so the test
suite's doctest collection imports this file without torch.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import sys
from typing import Dict, Tuple

import numpy as np

if __package__ in (None, ''):  # run as a file: make `tests` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from tests import parity_cases  # pylint: disable=g-import-not-at-top


def _torch():
  """``(torch, torch_tract)``, imported on first use."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch_tract  # pylint: disable=import-outside-toplevel
  return torch, torch_tract


def torch_grads(layer, x, cotangent) -> Tuple[np.ndarray, np.ndarray]:
  """Plain and TrAct weight gradients of ``layer`` for ``sum(out * cotangent)``."""
  _, torch_tract = _torch()
  grads = []
  for module in (layer, torch_tract.TrAct(layer, l=parity_cases.LAM)):
    layer.weight.grad = None
    (module(x) * cotangent).sum().backward()
    grads.append(layer.weight.grad.detach().clone().numpy())
  return grads[0], grads[1]


def linear_case(shape, out_features, dtype: str) -> Dict[str, np.ndarray]:
  """``x`` (``shape``), ``plain`` and ``tract`` gradients (``(out, in)``)."""
  torch, _ = _torch()
  torch.manual_seed(0)
  torch_dtype = getattr(torch, dtype)
  layer = torch.nn.Linear(shape[-1], out_features).to(torch_dtype)
  x = torch.randn(*shape, dtype=torch_dtype)
  cotangent = torch.randn(*shape[:-1], out_features, dtype=torch_dtype)
  plain, tract = torch_grads(layer, x, cotangent)
  return dict(x=x.numpy(), plain=plain, tract=tract)


def conv_case(batch, channels, size, kernel, stride, padding,
              dtype: str) -> Dict[str, np.ndarray]:
  """``x`` (NCHW), ``plain`` and ``tract`` gradients (OIHW), ``out_shape``."""
  torch, _ = _torch()
  torch.manual_seed(1)
  torch_dtype = getattr(torch, dtype)
  layer = torch.nn.Conv2d(channels, parity_cases.CONV_OUT_CHANNELS, kernel, stride=stride,
                          padding=padding).to(torch_dtype)
  x = torch.randn(batch, channels, size, size, dtype=torch_dtype)
  out_shape = layer(x).shape
  cotangent = torch.randn(*out_shape, dtype=torch_dtype)
  plain, tract = torch_grads(layer, x, cotangent)
  return dict(x=x.numpy(), plain=plain, tract=tract, out_shape=np.asarray(out_shape))


def step_case() -> Dict[str, np.ndarray]:
  """A 3x3 conv stem in float32: ``x``, ``weight``, ``plain`` and ``tract`` gradients."""
  torch, _ = _torch()
  torch.manual_seed(2)
  layer = torch.nn.Conv2d(3, 5, 3, stride=1, padding=1)
  x = torch.randn(4, 3, 8, 8)
  cotangent = torch.randn(4, 5, 8, 8)
  plain, tract = torch_grads(layer, x, cotangent)
  return dict(x=x.numpy(), weight=layer.weight.detach().numpy(), plain=plain, tract=tract)


def build_all() -> Dict[str, np.ndarray]:
  """Every case's arrays, keyed by :func:`tests.parity_cases.key`."""
  arrays: Dict[str, np.ndarray] = {}
  for dtype in parity_cases.DTYPES:
    for shape, out_features in parity_cases.LINEAR_CASES:
      case_id = parity_cases.linear_id(shape, out_features)
      for name, value in linear_case(shape, out_features, dtype).items():
        arrays[parity_cases.key(case_id, dtype, name)] = value
    for case in parity_cases.CONV_CASES:
      case_id = parity_cases.conv_id(*case)
      for name, value in conv_case(*case, dtype).items():
        arrays[parity_cases.key(case_id, dtype, name)] = value
  for name, value in step_case().items():
    arrays[parity_cases.key(parity_cases.STEP_CASE, 'float32', name)] = value
  torch, _ = _torch()
  arrays['versions'] = np.asarray([f'torch {torch.__version__}', 'torch_tract '
                                   + importlib.metadata.version('torch_tract')])
  return arrays


def main() -> None:
  arrays = build_all()
  parity_cases.GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(parity_cases.GOLDEN_PATH, **arrays)
  size = parity_cases.GOLDEN_PATH.stat().st_size
  print(f'wrote {len(arrays)} arrays ({size} bytes) to {parity_cases.GOLDEN_PATH}')


if __name__ == '__main__':
  main()
