"""The Flax glue under ``jax.shard_map`` on 8 simulated CPU devices, as JSON.

Run by ``tests/test_shard_map_glue.py`` in a subprocess, because the CPU
device count is read once, when jax first initialises its backend; by hand:

  python tests/shard_map_glue_check.py  # sets XLA_FLAGS itself, before jax

Every check uses ``shard_map`` with its default replication checking
(``check_vma=True`` in recent jax) and automatic first-layer selection (no
``layers=``): the first-layer probe then runs on arrays typed as varying over
the mesh axis. A model with a conv ``stem`` and a dense ``head`` is fit on a
global batch of 16 split over the 8 devices; the stem's kernel gradient (or
``tract``'s update) must equal ``(A^T A / N + lam I)^{-1} G`` with ``A`` the
patch matrix of the whole batch and ``G`` the plain gradient, both in float64
numpy; the head's must equal its plain gradient.

The printed object maps each check to ``{'stem', 'head', 'stem_vs_local'}``:
the relative differences (largest absolute difference over the largest entry
of the expected value) of the stem and head against the reference, and of the
stem against the per-device (local statistic) answer, which must be far.
"""

from __future__ import annotations

import os

XLA_FLAGS = ('--xla_force_host_platform_device_count=8', '--xla_backend_optimization_level=0')

if __name__ == '__main__':
  # Before jax is imported, and only when run as a script: importing this
  # module (pytest's doctest collection) changes nothing.
  _flags = os.environ.get('XLA_FLAGS', '').split()
  os.environ['XLA_FLAGS'] = ' '.join(_flags + [f for f in XLA_FLAGS if f not in _flags])
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import json
import traceback
from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

import tract_optax
from tract_optax import linen as tract_linen
from tract_optax import nnx as tract_nnx

NUM_DEVICES = 8
GLOBAL_BATCH = 16
IMAGE_SHAPE = (5, 5, 2)
KERNEL_SIZE = (3, 3)
FEATURES = 4
OUTPUTS = 3
LAM = 0.1
AXIS = 'batch'


class LinenNet(nn.Module):
  """A 3x3 'SAME' conv stem, then a dense head on the mean feature."""

  @nn.compact
  def __call__(self, images):
    h = nn.relu(nn.Conv(FEATURES, KERNEL_SIZE, name='stem')(images))
    return nn.Dense(OUTPUTS, name='head')(h.mean((1, 2)))


class NNXNet(nnx.Module):
  """:class:`LinenNet` in NNX."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Conv(IMAGE_SHAPE[-1], FEATURES, KERNEL_SIZE, rngs=rngs)
    self.head = nnx.Linear(FEATURES, OUTPUTS, rngs=rngs)

  def __call__(self, images):
    return self.head(nnx.relu(self.stem(images)).mean((1, 2)))


def batch(seed: int = 0):
  """Images whose examples differ in contrast and brightness, and targets.

  Devices then hold clearly different local statistics.
  """
  rng = np.random.default_rng(seed)
  scale = rng.uniform(0.2, 3.0, (GLOBAL_BATCH, 1, 1, 1))
  shift = rng.uniform(-1.0, 1.0, (GLOBAL_BATCH, 1, 1, 1))
  images = rng.standard_normal((GLOBAL_BATCH,) + IMAGE_SHAPE) * scale + shift
  targets = rng.standard_normal((GLOBAL_BATCH, OUTPUTS))
  return images.astype(np.float32), targets.astype(np.float32)


def patch_rows(images: np.ndarray) -> np.ndarray:
  """The 3x3 'SAME' patch matrix in float64, features in Flax kernel order
  ``(kh, kw, c)``: one row per output position of every image."""
  kh, kw = KERNEL_SIZE
  padded = np.pad(np.float64(images), ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  _, height, width, _ = images.shape
  rows = [
    padded[:, i : i + kh, j : j + kw, :].reshape(len(images), -1)
    for i in range(height)
    for j in range(width)
  ]
  return np.stack(rows, 1).reshape(-1, kh * kw * images.shape[-1])


def tract_solve(images: np.ndarray, kernel_grad) -> np.ndarray:
  """``(A^T A / N + lam I)^{-1} G`` in float64, in the kernel's shape."""
  rows = patch_rows(images)
  grad = np.float64(kernel_grad)
  moment = rows.T @ rows / len(rows)
  solved = np.linalg.solve(moment + LAM * np.eye(len(moment)), grad.reshape(len(moment), -1))
  return solved.reshape(grad.shape)


def relative(value, expected) -> float:
  value, expected = np.float64(value), np.float64(expected)
  return float(np.max(np.abs(value - expected)) / np.max(np.abs(expected)))


def squared_error(outputs, targets):
  return jnp.mean((outputs - targets) ** 2)


def compare(stem, head, plain: Dict[str, Any], images) -> Dict[str, float]:
  """The stem against the whole-batch and per-device TrAct solves, the head
  against its plain gradient."""
  expected = tract_solve(images, plain['stem'])
  # Per-device statistics: every device solves with its own part of the batch
  # (its part of the gradient being the plain one of the whole batch here,
  # which is enough to show that the local statistic gives another answer).
  local = np.mean(
    [tract_solve(part, plain['stem']) for part in np.split(images, NUM_DEVICES)], axis=0
  )
  return {
    'stem': relative(stem, expected),
    'head': relative(head, plain['head']),
    'stem_vs_local': relative(stem, local),
  }


def linen_checks(mesh: Mesh, images, targets) -> Dict[str, Callable[[], Dict[str, float]]]:
  model = LinenNet()
  params = model.init(jax.random.key(0), images)['params']
  plain = jax.grad(lambda p: squared_error(model.apply({'params': p}, images), targets))(params)
  plain = {name: plain[name]['kernel'] for name in ('stem', 'head')}

  def gradient_route():
    def loss(p, x, y):
      outputs = tract_linen.apply_tract(model, {'params': p}, x, lam=LAM, axis_name=AXIS)
      # With replication checking the gradient of replicated parameters is
      # summed over devices already: the mean loss gives the mean gradient.
      return jax.lax.pmean(squared_error(outputs, y), AXIS)

    spec = (PartitionSpec(), PartitionSpec(AXIS), PartitionSpec(AXIS))
    grad = jax.jit(
      jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=spec, out_specs=PartitionSpec())
    )
    grads = grad(params, images, targets)
    return compare(grads['stem']['kernel'], grads['head']['kernel'], plain, images)

  def optax_route():
    tx = tract_optax.tract(LAM, axis_name=AXIS)

    def step(p, opt_state, x, y):
      def loss(q):
        outputs, stats = tract_linen.apply_with_stats(model, {'params': q}, x)
        return jax.lax.pmean(squared_error(outputs, y), AXIS), stats

      grads, stats = jax.grad(loss, has_aux=True)(p)
      updates, _ = tx.update(grads, opt_state, p, tract_stats=stats)
      return updates

    spec = (PartitionSpec(),) * 2 + (PartitionSpec(AXIS),) * 2
    run = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=spec, out_specs=PartitionSpec()))
    updates = run(params, tx.init(params), images, targets)
    return compare(updates['stem']['kernel'], updates['head']['kernel'], plain, images)

  return {'linen_apply_tract': gradient_route, 'linen_apply_with_stats_tract': optax_route}


def nnx_checks(mesh: Mesh, images, targets) -> Dict[str, Callable[[], Dict[str, float]]]:
  model = NNXNet(nnx.Rngs(0))
  plain = nnx.grad(lambda m: squared_error(m(images), targets))(model)
  plain = {name: np.asarray(plain[name]['kernel'][...]) for name in ('stem', 'head')}
  graphdef, state = nnx.split(model)

  def gradient_route():
    def grad(state, x, y):
      copy = nnx.merge(graphdef, state)

      def loss(m):
        outputs = tract_nnx.apply_tract(m, x, lam=LAM, axis_name=AXIS)
        return jax.lax.pmean(squared_error(outputs, y), AXIS)

      return nnx.state(nnx.grad(loss)(copy))

    spec = (PartitionSpec(), PartitionSpec(AXIS), PartitionSpec(AXIS))
    run = jax.jit(jax.shard_map(grad, mesh=mesh, in_specs=spec, out_specs=PartitionSpec()))
    grads = run(state, images, targets)
    return compare(grads['stem']['kernel'][...], grads['head']['kernel'][...], plain, images)

  return {'nnx_apply_tract': gradient_route}


def main() -> None:
  results: Dict[str, Any] = {'num_devices': jax.device_count()}
  mesh = Mesh(np.array(jax.devices()), (AXIS,))
  images, targets = batch()
  checks = {**linen_checks(mesh, images, targets), **nnx_checks(mesh, images, targets)}
  for name, check in checks.items():
    try:
      results[name] = check()
    except Exception:  # recorded, so that the test shows which route failed and how
      results[name] = {'error': traceback.format_exc(limit=4)[-3000:]}
  print(json.dumps(results))


if __name__ == '__main__':
  main()
