"""One of the JAX processes of ``tests/test_multihost.py``, on loopback.

``test_multihost.py`` starts two of these, one per ``--process-id``. Each calls
``jax.distributed.initialize`` with the coordinator at ``localhost:PORT``, gets
4 simulated CPU devices (8 over both processes) and gloo CPU collectives,
builds a global ``Mesh`` over all 8 devices, and runs every case once: one
training step of a small Flax Linen model with TrAct on its first layer, the
global batch of 16 split over the 8 devices, each process feeding its half.
Each process writes the resulting parameters (read from its own replicas) and
a few facts about the run to ``OUT/process<i>.npz``; the test compares them
with the single-process whole-batch step it computes itself
(:func:`single_process_step`).

A case is a problem (model and data, :data:`PROBLEMS`), a route (how TrAct is
wired into the step, :data:`ROUTES`) and a parallelism (``'jit'``: the batch
sharded under ``jit``, tract without ``axis_name``; ``'shard_map'``: the step
under ``jax.shard_map`` with ``axis_name`` and the loss ``pmean``'ed, as the
README describes). Adding a route (say the gradient route) is one function
``my_route(problem, axis_name) -> (tx, step)`` with :func:`optax_route`'s
contract, an entry in :data:`ROUTES` and entries ``Case(problem, 'my_route',
'jit' | 'shard_map')`` in :data:`CASES`; the test parametrizes over
:data:`CASES` and takes each case's reference from the same route run with
``axis_name=None`` on the whole batch.

By hand (two shells, same port)::

  python tests/multihost_worker.py --port 12355 --process-id 0 --out /tmp/mh
  python tests/multihost_worker.py --port 12355 --process-id 1 --out /tmp/mh
"""

from __future__ import annotations

import os

#: XLA flags of every worker: 4 CPU devices per process, and no LLVM
#: optimisation of the tiny programs (compiling dominates the run time).
XLA_FLAGS = ('--xla_force_host_platform_device_count=4',
             '--xla_backend_optimization_level=0')

if __name__ == '__main__':
  # Must happen before jax is imported; only when run as a script, so that
  # importing this module (the test's reference, doctest collection) changes
  # nothing.
  _flags = [flag for flag in os.environ.get('XLA_FLAGS', '').split()
            if not flag.startswith('--xla_force_host_platform_device_count')]
  os.environ['XLA_FLAGS'] = ' '.join(
      _flags + [flag for flag in XLA_FLAGS if flag not in _flags])
  os.environ['JAX_PLATFORMS'] = 'cpu'

import argparse
import dataclasses
import sys
import time
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import tract_optax
from tract_optax import linen as tract_linen

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
NUM_DEVICES = NUM_PROCESSES * DEVICES_PER_PROCESS
GLOBAL_BATCH = 16
NUM_CLASSES = 5
FEATURES = 8
LAM = 0.1
LEARNING_RATE = 1.0
AXIS = 'data'
PARAMS_SEED = 0
DATA_SEED = 1
#: Exit code of a worker whose jax has no gloo CPU collectives.
NO_GLOO_EXIT_CODE = 3
#: Prefix of the one stderr line that says why a worker gave up.
ERROR_PREFIX = 'MULTIHOST_WORKER_ERROR:'

_HIGHEST = jax.lax.Precision.HIGHEST
_START = time.perf_counter()

Params = Dict[str, Any]
StepFn = Callable[..., Tuple[Params, Any]]


def log(message: str) -> None:
  """Progress with elapsed seconds, on stderr."""
  print(f'[{time.perf_counter() - _START:6.1f}s] {message}', file=sys.stderr,
        flush=True)


class ConvNet(nn.Module):
  """3x3 conv stem (the first layer), tanh, global mean pool, Dense head.

  Attributes:
    padding: the stem's padding.
  """

  padding: str = 'SAME'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Conv(FEATURES, (3, 3), padding=self.padding, precision=_HIGHEST,
                name='stem')(x)
    h = jnp.tanh(h).mean(axis=(1, 2))
    return nn.Dense(NUM_CLASSES, precision=_HIGHEST, name='head')(h)


class DenseNet(nn.Module):
  """Dense first layer on flat inputs, tanh, Dense head."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.tanh(nn.Dense(FEATURES, precision=_HIGHEST, name='stem')(x))
    return nn.Dense(NUM_CLASSES, precision=_HIGHEST, name='head')(h)


@dataclasses.dataclass(frozen=True)
class Problem:
  """A model whose first layer TrAct preconditions, and its data.

  Attributes:
    name: used in case names.
    module: the Linen model; its first layer is ``first_layer``.
    example_shape: shape of one input example.
    first_layer: module path of the preconditioned layer.
    lam: TrAct's ridge strength lambda for this problem.
  """

  name: str
  module: nn.Module
  example_shape: Tuple[int, ...]
  first_layer: Tuple[str, ...] = ('stem',)
  lam: float = LAM

  def batch(self, seed: int = DATA_SEED) -> Tuple[np.ndarray, np.ndarray]:
    """The global batch: inputs whose examples differ in contrast and offset.

    Different examples, hence devices and processes, then have clearly
    different local statistics.
    """
    rng = np.random.default_rng(seed)
    expand = (GLOBAL_BATCH,) + (1,) * len(self.example_shape)
    scale = rng.uniform(0.5, 2.0, expand)
    shift = rng.uniform(-0.5, 0.5, expand)
    x = rng.standard_normal((GLOBAL_BATCH,) + self.example_shape) * scale + shift
    labels = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH)
    return x.astype(np.float32), labels.astype(np.int32)

  def init(self, seed: int = PARAMS_SEED) -> Params:
    """Numpy parameters, drawn without jax's PRNG (same in every process)."""
    example = jnp.zeros((1,) + self.example_shape, jnp.float32)
    shapes = jax.eval_shape(self.module.init, jax.random.key(0), example)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
      if path[-1].key == 'bias':
        return np.asarray(rng.uniform(-0.1, 0.1, leaf.shape), np.float32)
      fan_in = int(np.prod(leaf.shape[:-1]))
      values = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
      return np.asarray(values, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes['params'])


PROBLEMS: Dict[str, Problem] = {
    # Per device: N = 2 images x 64 positions = 128 >= n = 27 (moment form).
    'conv': Problem('conv', ConvNet(), (8, 8, 3)),
    # Per device: N = 2 images x 2 x 2 positions = 8 < n = 27 (Woodbury form);
    # on the whole batch 64 >= 27: the reference solves with the moment, while
    # shard_map gathers the 64 patch rows of all 8 devices.
    'conv_woodbury': Problem('conv_woodbury', ConvNet('VALID'), (4, 4, 3)),
    # Per device 2 rows < n = 64 features, and 16 < 64 on the whole batch:
    # the Woodbury form everywhere, so under shard_map the rows of all 8
    # devices (both processes) are gathered. lam = 0.5: the Woodbury form
    # subtracts two nearly equal terms when the rows' Gram matrix dwarfs
    # N * lam (about 60x at lam = 0.1 here), and in float32 the single-process
    # update itself was then 1.5e-5 off float64, too close to the tolerance.
    'dense_woodbury': Problem('dense_woodbury', DenseNet(), (64,), lam=0.5),
}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def optax_route(problem: Problem, axis_name: Optional[str]
                ) -> Tuple[optax.GradientTransformation, StepFn]:
  """TrAct as an Optax transformation fed by ``linen.apply_with_stats``.

  Args:
    problem: the model, its first layer and ``lam``.
    axis_name: ``None`` for one whole-batch program (single process, or
      ``jit`` with a sharded batch); the mapped batch axis under
      ``shard_map``, where the loss is ``pmean``'ed over it (gradients of the
      replicated parameters then come back as the global-batch gradient) and
      ``tract`` all-reduces the statistics.

  Returns:
    ``(tx, step)`` with ``step(params, opt_state, x, labels) -> (params,
    opt_state)``.
  """
  tx = optax.chain(tract_optax.tract(problem.lam, axis_name=axis_name),
                   optax.sgd(LEARNING_RATE))

  def loss_fn(params, x, labels):
    logits, stats = tract_linen.apply_with_stats(
        problem.module, {'params': params}, x, layers=[problem.first_layer])
    loss = cross_entropy(logits, labels)
    if axis_name is not None:
      loss = jax.lax.pmean(loss, axis_name)
    return loss, stats

  def step(params, opt_state, x, labels):
    grads, stats = jax.grad(loss_fn, has_aux=True)(params, x, labels)
    _record_traced_form(stats)
    updates, opt_state = tx.update(grads, opt_state, params, tract_stats=stats)
    return optax.apply_updates(params, updates), opt_state

  return tx, step


def gradient_route(problem: Problem, axis_name: Optional[str]
                   ) -> Tuple[optax.GradientTransformation, StepFn]:
  """TrAct as the gradient route: ``linen.apply_tract`` and plain SGD.

  No ``tract`` in the chain and no ``tract_stats``: ``jax.grad`` of the loss
  already returns the first layer's TrAct gradient (under ``shard_map`` the
  statistic is all-reduced over ``axis_name`` in the backward pass).
  """
  tx = optax.sgd(LEARNING_RATE)

  def loss_fn(params, x, labels):
    logits = tract_linen.apply_tract(
        problem.module, {'params': params}, x, lam=problem.lam,
        layers=[problem.first_layer], axis_name=axis_name)
    loss = cross_entropy(logits, labels)
    if axis_name is not None:
      loss = jax.lax.pmean(loss, axis_name)
    return loss

  def step(params, opt_state, x, labels):
    grads = jax.grad(loss_fn)(params, x, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return tx, step


#: How TrAct is wired into a training step: ``route(problem, axis_name) ->
#: (tx, step)``; see :func:`optax_route` for the contract.
ROUTES: Dict[str, Callable[[Problem, Optional[str]],
                           Tuple[optax.GradientTransformation, StepFn]]] = {
    'optax': optax_route,
    'gradient': gradient_route,
}

#: Whether the statistic a traced step computed was in Woodbury form: one
#: device's under shard_map, the whole batch's under jit. Filled at trace time
#: by the routes that see the statistic.
_TRACED_FORMS: List[bool] = []


def _record_traced_form(stats: Dict[Any, tract_optax.TractStats]) -> None:
  _TRACED_FORMS.extend(s.is_woodbury for s in stats.values())


@dataclasses.dataclass(frozen=True)
class Case:
  """One multi-process check.

  Attributes:
    problem: key of :data:`PROBLEMS`.
    route: key of :data:`ROUTES`.
    parallelism: ``'jit'`` or ``'shard_map'``.
  """

  problem: str
  route: str
  parallelism: str

  @property
  def name(self) -> str:
    return f'{self.problem}/{self.route}/{self.parallelism}'


CASES: List[Case] = [
    Case('conv', 'optax', 'jit'),
    Case('conv', 'optax', 'shard_map'),
    Case('conv_woodbury', 'optax', 'jit'),
    Case('conv_woodbury', 'optax', 'shard_map'),
    Case('dense_woodbury', 'optax', 'jit'),
    Case('dense_woodbury', 'optax', 'shard_map'),
    Case('conv', 'gradient', 'jit'),
    Case('conv', 'gradient', 'shard_map'),
    Case('dense_woodbury', 'gradient', 'shard_map'),
]


def single_process_step(case: Case) -> Params:
  """The reference: one step on the whole batch in one program, one device.

  Runs in whatever process calls it (the test itself), without
  ``jax.distributed``.
  """
  problem = PROBLEMS[case.problem]
  tx, step = ROUTES[case.route](problem, None)
  params = problem.init()
  new_params, _ = jax.jit(step)(params, tx.init(params), *problem.batch())
  return jax.tree.map(np.asarray, new_params)


def flatten(tree: Params, prefix: str = '') -> Dict[str, np.ndarray]:
  """``{'prefix/stem/kernel': array, ...}`` of a nested dict of arrays."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, 'key', k)) for k in path]
    flat['/'.join([prefix] + keys if prefix else keys)] = np.asarray(leaf)
  return flat


@dataclasses.dataclass
class Context:
  """What every case needs from the distributed set-up."""

  mesh: Mesh
  process_id: int

  def local_rows(self, array: np.ndarray) -> np.ndarray:
    """This process's contiguous part of a global batch."""
    per_process = array.shape[0] // NUM_PROCESSES
    return array[self.process_id * per_process:(self.process_id + 1) * per_process]

  def to_global(self, tree, spec: PartitionSpec):
    """Host-local numpy leaves as global arrays over the whole mesh."""
    return multihost_utils.host_local_array_to_global_array(tree, self.mesh, spec)


def _replicated_value(leaf: jax.Array) -> Tuple[np.ndarray, float]:
  """A replicated global array's value and its replicas' largest spread."""
  if not leaf.sharding.is_fully_replicated:
    raise AssertionError(f'expected a replicated output, got {leaf.sharding}')
  shards = [np.asarray(s.data) for s in leaf.addressable_shards]
  spread = max(float(np.max(np.abs(s - shards[0]))) for s in shards)
  return shards[0], spread


def shard_map_fn() -> Callable[..., Any]:
  """``jax.shard_map`` where it exists, else the experimental one."""
  if hasattr(jax, 'shard_map'):
    return jax.shard_map
  from jax.experimental.shard_map import shard_map  # pylint: disable=g-import-not-at-top
  return shard_map


def run_case(ctx: Context, case: Case) -> Dict[str, np.ndarray]:
  """Runs one case on the global mesh; returns the flat results."""
  problem = PROBLEMS[case.problem]
  axis_name = AXIS if case.parallelism == 'shard_map' else None
  tx, step = ROUTES[case.route](problem, axis_name)
  params0 = problem.init()
  x, labels = problem.batch()
  replicated, batch_spec = PartitionSpec(), PartitionSpec(AXIS)
  params = ctx.to_global(params0, replicated)
  opt_state = ctx.to_global(jax.tree.map(np.asarray, tx.init(params0)), replicated)
  x_global, labels_global = ctx.to_global(
      (ctx.local_rows(x), ctx.local_rows(labels)), batch_spec)
  del _TRACED_FORMS[:]
  if case.parallelism == 'jit':
    out = NamedSharding(ctx.mesh, replicated)
    compiled = jax.jit(step, out_shardings=(out, out))
  elif case.parallelism == 'shard_map':
    compiled = jax.jit(shard_map_fn()(
        step, mesh=ctx.mesh,
        in_specs=(replicated, replicated, batch_spec, batch_spec),
        out_specs=(replicated, replicated)))
  else:
    raise ValueError(f'unknown parallelism {case.parallelism!r}')
  new_params, _ = compiled(params, opt_state, x_global, labels_global)
  read = jax.tree.map(_replicated_value, new_params)
  is_pair = lambda node: isinstance(node, tuple)
  values = flatten(jax.tree.map(lambda pair: pair[0], read, is_leaf=is_pair),
                   f'{case.name}/params')
  spreads = [pair[1] for pair in jax.tree.leaves(read, is_leaf=is_pair)]
  values[f'{case.name}/replica_spread'] = np.asarray(max(spreads))
  values[f'{case.name}/batch_devices'] = np.asarray(len(x_global.sharding.device_set))
  values[f'{case.name}/batch_shard_shape'] = np.asarray(
      x_global.addressable_shards[0].data.shape)
  values[f'{case.name}/batch_global_shape'] = np.asarray(x_global.shape)
  values[f'{case.name}/traced_woodbury'] = np.asarray(_TRACED_FORMS, bool)
  return values


def _fail(message: str, code: int = 1) -> NoReturn:
  """Exits after one stderr line that the test quotes."""
  print(f'{ERROR_PREFIX} {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def use_gloo() -> None:
  """Selects gloo CPU collectives, or exits with :data:`NO_GLOO_EXIT_CODE`."""
  try:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except Exception as error:  # pylint: disable=broad-except
    _fail(f'jax {jax.__version__} has no gloo CPU collectives '
          f"(jax.config.update('jax_cpu_collectives_implementation', 'gloo') "
          f'raised {type(error).__name__}: {error}); the multi-host test '
          'needs them.', NO_GLOO_EXIT_CODE)


def main(argv: Optional[List[str]] = None) -> None:
  """Initialises jax.distributed, runs the cases, writes the .npz."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--process-id', type=int, required=True)
  parser.add_argument('--out', required=True, help='directory for the .npz')
  parser.add_argument('--cases', default='',
                      help='comma-separated case names (default: all)')
  args = parser.parse_args(argv)
  cases = CASES
  if args.cases:
    wanted = args.cases.split(',')
    cases = [c for c in CASES if c.name in wanted]
    if len(cases) != len(wanted):
      _fail(f'unknown case among {wanted}; known: {[c.name for c in CASES]}')

  use_gloo()
  log(f'process {args.process_id}: initialising (localhost:{args.port})')
  jax.distributed.initialize(
      coordinator_address=f'localhost:{args.port}', num_processes=NUM_PROCESSES,
      process_id=args.process_id, initialization_timeout=60)
  devices = jax.devices()
  if len(devices) != NUM_DEVICES or jax.local_device_count() != DEVICES_PER_PROCESS:
    _fail(f'expected {NUM_DEVICES} devices, {DEVICES_PER_PROCESS} per process; '
          f'got {len(devices)}, {jax.local_device_count()} local.')
  mesh = Mesh(np.array(devices), (AXIS,))
  ctx = Context(mesh=mesh, process_id=jax.process_index())
  results: Dict[str, np.ndarray] = {
      'process_index': np.asarray(jax.process_index()),
      'process_count': np.asarray(jax.process_count()),
      'device_count': np.asarray(jax.device_count()),
      'local_device_count': np.asarray(jax.local_device_count()),
      'mesh_process_indices': np.asarray([d.process_index for d in devices]),
      'collectives': np.asarray(str(jax.config.jax_cpu_collectives_implementation)),
      'cases': np.asarray([c.name for c in cases]),
  }
  for case in cases:
    results.update(run_case(ctx, case))
    log(f'process {args.process_id}: {case.name} done')

  os.makedirs(args.out, exist_ok=True)
  final = os.path.join(args.out, f'process{args.process_id}.npz')
  partial = final + '.partial.npz'
  np.savez(partial, **results)
  os.replace(partial, final)
  jax.distributed.shutdown()
  log(f'process {args.process_id}: wrote {final}')


if __name__ == '__main__':
  main()
