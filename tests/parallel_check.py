"""Multi-device TrAct checks on 8 simulated CPU devices, printed as JSON.

Run by ``tests/test_parallel.py`` in a subprocess, because the CPU device
count is read once, when jax first initialises its backend; by hand:

  python tests/parallel_check.py  # sets XLA_FLAGS itself, before importing jax

Each check trains a tiny plain-JAX model for two steps of
``chain(tract(0.1), sgd(0.1, momentum=0.9))`` on a global batch of 16 split
over the 8 devices, and compares the change of every parameter with the same
two steps run on one device over the whole batch. The model has two first
layers, both preconditioned: a conv ``stem`` on an image and a dense ``embed``
on a set of tokens (a ViT-like patch embedding); a dense ``head`` reads both.

The printed object maps ``'<check>/<model>'`` to ``{'max_abs', 'rel',
'scale'}``: the largest absolute difference of parameter changes, that over
``scale``, and ``scale``, the largest parameter change of the single-device
run; other keys record facts the tests assert on (shard shapes, the statistic's
form, the spread between pmap replicas).
"""

from __future__ import annotations

import os

#: XLA flags this script needs: 8 CPU devices, and no LLVM optimisation of the
#: tiny programs (compiling is nearly all of the run time; the arithmetic and
#: its results are the same).
XLA_FLAGS = ('--xla_force_host_platform_device_count=8',
             '--xla_backend_optimization_level=0')

if __name__ == '__main__':
  # Must happen before jax is imported; only when run as a script, so that
  # importing this module (pytest's doctest collection) changes nothing.
  _flags = os.environ.get('XLA_FLAGS', '').split()
  os.environ['XLA_FLAGS'] = ' '.join(
      _flags + [flag for flag in XLA_FLAGS if flag not in _flags])
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import dataclasses
import inspect
import json
import sys
import time
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import tract_optax

NUM_DEVICES = 8
GLOBAL_BATCH = 16
NUM_CLASSES = 5
FEATURES = 8
KERNEL_SIZE = (3, 3)
STEPS = 2
LAM = 0.1
LEARNING_RATE = 0.1
MOMENTUM = 0.9
AXIS = 'data'
_HIGHEST = jax.lax.Precision.HIGHEST

Params = Dict[str, Dict[str, Any]]
Batch = Tuple[Any, Any, Any]  # images, tokens, labels


_START = time.perf_counter()


def log(message: str) -> None:
  """Progress with elapsed seconds, on stderr (stdout carries the JSON)."""
  print(f'[{time.perf_counter() - _START:6.1f}s] {message}', file=sys.stderr,
        flush=True)


def shard_map_fn() -> Callable[..., Any]:
  """``jax.shard_map`` where it exists, else the experimental one."""
  if hasattr(jax, 'shard_map'):
    return jax.shard_map
  from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top
  return shard_map


def replication_check_kwarg() -> str:
  """Name of shard_map's replication-checking flag in this jax version."""
  parameters = inspect.signature(shard_map_fn()).parameters
  return 'check_vma' if 'check_vma' in parameters else 'check_rep'


@dataclasses.dataclass(frozen=True)
class Model:
  """Conv stem on images plus dense embedding of tokens, then a dense head.

  Attributes:
    name: used in the result keys.
    image_shape: one image, channels-last.
    token_shape: one example's tokens, ``(..., features)``.
    padding: the stem convolution's padding.
  """

  name: str
  image_shape: Tuple[int, ...]
  token_shape: Tuple[int, ...]
  padding: str

  def init(self, seed: int) -> Params:
    """Random numpy parameters for ``stem``, ``embed`` and ``head``."""
    rng = np.random.default_rng(seed)
    stem_shape = KERNEL_SIZE + (self.image_shape[-1], FEATURES)
    embed_shape = (self.token_shape[-1], FEATURES)

    def dense(shape):
      fan_in = int(np.prod(shape[:-1]))
      kernel = rng.standard_normal(shape) / np.sqrt(fan_in)
      return {'kernel': kernel.astype(np.float32),
              'bias': np.zeros(shape[-1], np.float32)}

    return {'stem': dense(stem_shape), 'embed': dense(embed_shape),
            'head': dense((2 * FEATURES, NUM_CLASSES))}

  def batch(self, seed: int) -> Batch:
    """A global batch whose examples differ in contrast and brightness.

    Different examples (hence devices) then have clearly different local
    statistics, as TrAct's motivating data do.
    """
    rng = np.random.default_rng(seed)

    def inputs(shape):
      expand = (GLOBAL_BATCH,) + (1,) * len(shape)
      scale = rng.uniform(0.2, 3.0, expand)
      shift = rng.uniform(-1.0, 1.0, expand)
      x = rng.standard_normal((GLOBAL_BATCH,) + shape) * scale + shift
      return x.astype(np.float32)

    labels = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)
    return inputs(self.image_shape), inputs(self.token_shape), labels

  def logits(self, params: Params, images, tokens) -> jax.Array:
    stem = jax.lax.conv_general_dilated(
        images, params['stem']['kernel'], (1, 1), self.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=_HIGHEST)
    embed = jnp.dot(tokens, params['embed']['kernel'], precision=_HIGHEST)
    pooled = [
        jax.nn.tanh(out + params[name]['bias'])
        .reshape(out.shape[0], -1, FEATURES).mean(axis=1)
        for name, out in (('stem', stem), ('embed', embed))]
    hidden = jnp.concatenate(pooled, axis=-1)
    return jnp.dot(hidden, params['head']['kernel'],
                   precision=_HIGHEST) + params['head']['bias']

  def loss(self, params: Params, images, tokens, labels) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(
        self.logits(params, images, tokens), labels).mean()

  def stats(self, images, tokens):
    """``tract_stats`` of both first layers from the (local or global) batch."""
    return {
        ('stem',): tract_optax.conv_stats(images, KERNEL_SIZE,
                                          padding=self.padding),
        ('embed',): tract_optax.dense_stats(tokens),
    }


MODELS = {
    # Per device: stem N = 2 images x 64 positions = 128 >= n = 27, embed
    # N = 2 x 4 tokens = 8 >= n = 6: the moment form everywhere.
    'moment': Model('moment', (8, 8, 3), (4, 6), 'SAME'),
    # Per device: stem N = 2 x 2 x 2 = 8 < n = 27, embed N = 2 < n = 12: the
    # Woodbury form; on the whole batch (64 >= 27, 16 >= 12) the moment form.
    'woodbury': Model('woodbury', (4, 4, 3), (12,), 'VALID'),
}


def optimizer(axis_name=None, local_stats=False) -> optax.GradientTransformationExtraArgs:
  return optax.chain(tract_optax.tract(LAM, axis_name=axis_name, local_stats=local_stats),
                     optax.sgd(LEARNING_RATE, momentum=MOMENTUM))


def gradient_route_loss(model: Model, axis_name=None):
  """The loss with both first kernels wrapped by ``tract_kernel`` (no tract)."""

  def loss(params, images, tokens, labels):
    stats = model.stats(images, tokens)
    wrapped = dict(params)
    for (name,), layer_stats in stats.items():
      kernel = tract_optax.tract_kernel(params[name]['kernel'], layer_stats,
                                        lam=LAM, axis_name=axis_name)
      wrapped[name] = {**params[name], 'kernel': kernel}
    return model.loss(wrapped, images, tokens, labels)

  return loss


def make_route_step(model: Model, *, axis_name=None, mean_over_axis: str = 'none'):
  """One step of the gradient route: plain SGD on ``jax.grad`` of the loss."""
  tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
  route_loss = gradient_route_loss(model, axis_name)

  def loss_fn(params, images, tokens, labels):
    loss = route_loss(params, images, tokens, labels)
    return jax.lax.pmean(loss, AXIS) if mean_over_axis == 'loss' else loss

  def step(params, opt_state, images, tokens, labels):
    grads = jax.grad(loss_fn)(params, images, tokens, labels)
    if mean_over_axis == 'grads':
      grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return tx, step


def make_step(model: Model, tx, *, mean_over_axis: str = 'none'):
  """One training step.

  Args:
    model: the model.
    tx: the optimizer; gets ``tract_stats`` of the batch it sees.
    mean_over_axis: ``'none'``; ``'grads'`` to pmean the gradients over
      ``AXIS``; ``'loss'`` to pmean the loss (shard_map with replication
      checking, where gradients of replicated parameters come back summed
      over the devices).
  """

  def loss_fn(params, images, tokens, labels):
    loss = model.loss(params, images, tokens, labels)
    return jax.lax.pmean(loss, AXIS) if mean_over_axis == 'loss' else loss

  def step(params, opt_state, images, tokens, labels):
    grads = jax.grad(loss_fn)(params, images, tokens, labels)
    if mean_over_axis == 'grads':
      grads = jax.lax.pmean(grads, AXIS)
    stats = model.stats(images, tokens)
    updates, opt_state = tx.update(grads, opt_state, params, tract_stats=stats)
    return optax.apply_updates(params, updates), opt_state

  return step


def run_steps(step, params, opt_state, batches, put_batch=lambda b: b,
              label='', to_host=False):
  """Runs ``step`` over ``batches``; returns the final parameters.

  ``to_host`` hands the state back as numpy arrays between steps, so that a
  ``pmap`` sees the same input types every step and compiles once.
  """
  for batch in batches:
    params, opt_state = step(params, opt_state, *put_batch(batch))
    if to_host:
      params, opt_state = jax.tree.map(np.asarray, (params, opt_state))
  params = jax.block_until_ready(params)
  if label:
    log(label)
  return params


def compare(params0, params, reference) -> Dict[str, float]:
  """Largest difference of parameter changes against the reference run."""
  def change(tree):
    return [np.asarray(a, np.float64) - np.asarray(b, np.float64) for a, b in
            zip(jax.tree.leaves(tree), jax.tree.leaves(params0))]

  ours, ref = change(params), change(reference)
  max_abs = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, ref))
  scale = max(float(np.max(np.abs(b))) for b in ref)
  return {'max_abs': max_abs, 'rel': max_abs / scale, 'scale': scale}


def replica_spread(stacked_params) -> float:
  """Largest difference between any pmap replica and replica 0."""
  return max(float(np.max(np.abs(np.asarray(leaf) - np.asarray(leaf)[:1])))
             for leaf in jax.tree.leaves(stacked_params))


def to_devices(tree):
  """Splits the leading (global batch) axis into (devices, per-device batch)."""
  return jax.tree.map(
      lambda a: np.asarray(a).reshape((NUM_DEVICES, -1) + a.shape[1:]), tree)


def replicate(tree):
  return jax.tree.map(
      lambda a: np.broadcast_to(np.asarray(a), (NUM_DEVICES,) + np.shape(a)), tree)


def unreplicate(tree):
  return jax.tree.map(lambda a: np.asarray(a)[0], tree)


def ddp_reference(model: Model, params0, batches):
  """By hand: the mean over devices of each device's own TrAct gradient.

  This is what the PyTorch reference computes under DDP: every device applies
  TrAct with its local statistic in backward, then gradients are all-reduced.
  """
  inner = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)

  def local_tract_grads(params, images, tokens, labels):
    grads = jax.grad(model.loss)(params, images, tokens, labels)
    for module, stats in model.stats(images, tokens).items():
      name = module[0]
      grads[name]['kernel'] = tract_optax.precondition(
          grads[name]['kernel'], stats, LAM)
    return grads

  @jax.jit
  def step(params, inner_state, images, tokens, labels):
    per_device = jax.vmap(local_tract_grads, (None, 0, 0, 0))(
        params, images, tokens, labels)
    grads = jax.tree.map(lambda g: g.mean(axis=0), per_device)
    updates, inner_state = inner.update(grads, inner_state, params)
    return optax.apply_updates(params, updates), inner_state

  return run_steps(step, params0, inner.init(params0), batches, to_devices,
                   label=f'ddp by hand/{model.name}')


def check_model(model: Model, mesh: Mesh, results: Dict[str, Any]) -> None:
  """Runs the parallel arrangements for ``model`` and records differences."""
  name = model.name
  params0 = model.init(0)
  batches = [model.batch(1 + i) for i in range(STEPS)]
  tx, tx_axis = optimizer(), optimizer(AXIS)

  # Single device, whole batch: the reference.
  reference = run_steps(jax.jit(make_step(model, tx)), params0,
                        tx.init(params0), batches, label=f'reference/{name}')
  global_stats = jax.eval_shape(model.stats, *batches[0][:2])
  results[f'global_woodbury/{name}'] = [
      s.is_woodbury for s in global_stats.values()]

  # (a) jit with the batch sharded over the mesh: XLA makes the statistic
  # global by itself; tract needs no axis_name.
  data_sharding = NamedSharding(mesh, PartitionSpec(AXIS))
  replicated = NamedSharding(mesh, PartitionSpec())
  params_r = jax.device_put(params0, replicated)
  put = lambda batch: jax.device_put(batch, data_sharding)
  # The initial state placed as the step's outputs are: one compilation.
  init_r = lambda tx: jax.device_put(tx.init(params0), replicated)
  if name == 'moment':
    images = put(batches[0])[0]
    results[f'a_images_shard_shape/{name}'] = list(
        images.addressable_shards[0].data.shape)
    results[f'a_images_num_devices/{name}'] = len(images.sharding.device_set)
    step = jax.jit(make_step(model, tx))
    params = run_steps(step, params_r, init_r(tx), batches, put,
                       label=f'a_jit_sharded/{name}')
    results[f'a_jit_sharded/{name}'] = compare(params0, params, reference)

  # (b) shard_map with tract(axis_name=...). Without replication checking
  # gradients are local and are pmean'ed; with it (jax.shard_map's default
  # check_vma=True) gradients of replicated parameters are already summed
  # over devices, so the loss is pmean'ed instead.
  shard_map = shard_map_fn()
  check_kwarg = replication_check_kwarg()
  spec_p, spec_d = PartitionSpec(), PartitionSpec(AXIS)
  variants = {}
  if name == 'moment' or check_kwarg != 'check_vma':
    variants['b_shard_map'] = ('grads', False)
  if check_kwarg == 'check_vma':
    variants['b_shard_map_vma'] = ('loss', True)
    if name == 'moment':
      # The pitfall: with checking on, pmean'ing the gradients changes nothing
      # (they are already device-invariant sums), so the update is
      # NUM_DEVICES times too large.
      variants['b_shard_map_vma_pmean_grads'] = ('grads', True)
  for check, (mean_over_axis, checking) in variants.items():
    step = jax.jit(shard_map(
        make_step(model, tx_axis, mean_over_axis=mean_over_axis), mesh=mesh,
        in_specs=(spec_p, spec_p, spec_d, spec_d, spec_d),
        out_specs=(spec_p, spec_p), **{check_kwarg: checking}))
    params = run_steps(step, params_r, init_r(tx_axis), batches, put,
                       label=f'{check}/{name}')
    results[f'{check}/{name}'] = compare(params0, params, reference)

  # (c) pmap with tract(axis_name=...) and pmean'ed gradients.
  local_woodbury = []

  def pmap_step(tx, mean_over_axis):
    inner = make_step(model, tx, mean_over_axis=mean_over_axis)

    def step(params, opt_state, images, tokens, labels):
      local_woodbury.append(
          [s.is_woodbury for s in model.stats(images, tokens).values()])
      return inner(params, opt_state, images, tokens, labels)

    return jax.pmap(step, axis_name=AXIS)

  stacked = run_steps(pmap_step(tx_axis, 'grads'), replicate(params0),
                      replicate(tx_axis.init(params0)), batches, to_devices,
                      to_host=True, label=f'c_pmap/{name}')
  results[f'c_pmap/{name}'] = compare(params0, unreplicate(stacked), reference)
  results[f'c_pmap_replica_spread/{name}'] = replica_spread(stacked)
  results[f'local_woodbury/{name}'] = local_woodbury[0]

  # (d) no axis_name: local statistics, as under PyTorch DDP. Each device
  # preconditions its own gradient with its own statistic and the TrAct
  # gradients are then averaged (a pmean placed after tract in the chain).
  pmean = optax.stateless(lambda updates, params: jax.lax.pmean(updates, AXIS))
  tx_ddp = optax.chain(tract_optax.tract(LAM, local_stats=True), pmean,
                       optax.sgd(LEARNING_RATE, momentum=MOMENTUM))
  stacked = run_steps(pmap_step(tx_ddp, 'none'), replicate(params0),
                      replicate(tx_ddp.init(params0)), batches, to_devices,
                      to_host=True, label=f'd_local_stats/{name}')
  local = unreplicate(stacked)
  results[f'd_local_stats/{name}'] = compare(params0, local, reference)
  results[f'd_local_stats_vs_by_hand/{name}'] = compare(
      params0, local, ddp_reference(model, params0, batches))
  results[f'd_local_stats_replica_spread/{name}'] = replica_spread(stacked)

  # (d') no axis_name with gradients pmean'ed first: every device preconditions
  # the same global gradient with a different local statistic, and the
  # replicas drift apart.
  if name == 'moment':
    tx_local = optimizer(local_stats=True)
    stacked = run_steps(pmap_step(tx_local, 'grads'), replicate(params0),
                        replicate(tx_local.init(params0)), batches, to_devices,
                        to_host=True, label=f'd_naive/{name}')
    results[f'd_naive_replica_spread/{name}'] = replica_spread(stacked)

  # (e) tract without axis_name (or local_stats) inside pmap / shard_map: an
  # error that names the fix, never a silently local statistic.
  if name == 'moment':
    record_error(results, 'e_no_axis_error/pmap', lambda: run_steps(
        pmap_step(tx, 'grads'), replicate(params0), replicate(tx.init(params0)),
        batches[:1], to_devices, to_host=True))
    record_error(results, 'e_no_axis_error/shard_map', lambda: run_steps(
        jax.jit(shard_map(make_step(model, tx, mean_over_axis='loss'), mesh=mesh,
                          in_specs=(spec_p, spec_p, spec_d, spec_d, spec_d),
                          out_specs=(spec_p, spec_p))),
        params_r, init_r(tx), batches[:1], put))
    route_tx, route_step = make_route_step(model, mean_over_axis='grads')
    record_error(results, 'e_no_axis_error/gradient_route_pmap', lambda: run_steps(
        jax.pmap(route_step, axis_name=AXIS), replicate(params0),
        replicate(route_tx.init(params0)), batches[:1], to_devices, to_host=True))
    record_error(results, 'e_unbound_axis_error/jit', lambda: run_steps(
        jax.jit(make_step(model, tx_axis)), params_r, init_r(tx_axis),
        batches[:1], put))

  # (f) the gradient route (tract_kernel inside the loss, plain SGD): sharded
  # jit without axis_name, shard_map and pmap with it.
  route_tx, route_step = make_route_step(model)
  params = run_steps(jax.jit(route_step), params_r,
                     jax.device_put(route_tx.init(params0), replicated), batches,
                     put, label=f'f_route_jit_sharded/{name}')
  results[f'f_route_jit_sharded/{name}'] = compare(params0, params, reference)
  if check_kwarg == 'check_vma':
    route_tx, route_step = make_route_step(model, axis_name=AXIS, mean_over_axis='loss')
    step = jax.jit(shard_map(route_step, mesh=mesh,
                             in_specs=(spec_p, spec_p, spec_d, spec_d, spec_d),
                             out_specs=(spec_p, spec_p)))
    params = run_steps(step, params_r, jax.device_put(route_tx.init(params0), replicated),
                       batches, put, label=f'f_route_shard_map/{name}')
    results[f'f_route_shard_map/{name}'] = compare(params0, params, reference)
  route_tx, route_step = make_route_step(model, axis_name=AXIS, mean_over_axis='grads')
  stacked = run_steps(jax.pmap(route_step, axis_name=AXIS), replicate(params0),
                      replicate(route_tx.init(params0)), batches, to_devices,
                      to_host=True, label=f'f_route_pmap/{name}')
  results[f'f_route_pmap/{name}'] = compare(params0, unreplicate(stacked), reference)
  results[f'f_route_pmap_replica_spread/{name}'] = replica_spread(stacked)


def record_error(results: Dict[str, Any], key: str, run: Callable[[], Any]) -> None:
  """Records the type and message of the error ``run`` raises (or None)."""
  try:
    run()
  except Exception as error:  # pylint: disable=broad-except
    results[key] = {'type': type(error).__name__, 'message': str(error)}
  else:
    results[key] = None


def main() -> None:
  devices = jax.devices()
  if len(devices) != NUM_DEVICES:
    sys.exit(f'Expected {NUM_DEVICES} devices, got {len(devices)}: set XLA_FLAGS='
             f'--xla_force_host_platform_device_count={NUM_DEVICES} before jax '
             'is imported.')
  mesh = Mesh(np.array(devices), (AXIS,))
  results: Dict[str, Any] = {
      'num_devices': len(devices),
      'shard_map': f'{shard_map_fn().__module__}.{shard_map_fn().__name__}',
      'replication_check_kwarg': replication_check_kwarg(),
  }
  for model in MODELS.values():
    check_model(model, mesh, results)
  print(json.dumps(results, sort_keys=True))


if __name__ == '__main__':
  main()
