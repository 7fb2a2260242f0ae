"""Step-time and memory overhead of TrAct on Flax models, plain vs TrAct.

Both variants run the code path users run: a jitted Linen train step with
``optax.chain(..., sgd momentum)``; the TrAct step calls
``tract_optax.linen.apply_with_stats`` and puts ``tract_optax.tract`` first in
the chain. Steps are timed side by side in one process, interleaved round by
round after warm-up, and the medians are compared. Peak memory is XLA's
compiled memory analysis of each step (the same measure on CPU and GPU).

Modes:
  overhead  median step time and peak memory per model (the default).
  scaling   cost of the conv statistic alone as the batch and image grow,
            chunked (default) vs explicit patch matrix, vs the stem's own
            forward + backward; expected O(N n^2).

Usage:
  python benchmarks/overhead.py --device cpu            # CPU subset, < 3 min
  python benchmarks/overhead.py --device gpu            # all models
  python benchmarks/overhead.py --mode scaling --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import os
import sys
import time
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

import tract_optax
from tract_optax import linen as tract_linen
from tract_optax import models as model_zoo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imagenet_models  # pylint: disable=g-bad-import-order  (benchmarks/ is on sys.path)

imagenet_models.register()


@dataclasses.dataclass(frozen=True)
class Case:
  """One model configuration to benchmark."""
  model: str
  batch: int
  image_size: int
  channels: int
  num_classes: int = 10
  cpu_rounds: int = 41       # CPU defaults sized so `--device cpu` takes < 3 min;
  cpu_steps_per_round: int = 1  # many one-step rounds: CPU step times drift
  cpu_warmup: int = 1


CPU_CASES = [Case('cnn', 128, 28, 1),
             Case('resnet18', 128, 32, 3, cpu_rounds=3, cpu_steps_per_round=1,
                  cpu_warmup=0)]
GPU_CASES = [Case('resnet18', 128, 32, 3), Case('resnet50', 128, 224, 3, 1000),
             Case('vit_b16', 64, 224, 3, 1000), Case('cnn', 128, 28, 1)]


def _peak_bytes(compiled) -> int:
  """Arguments + outputs (less donated aliases) + XLA's temporary arena.

  The same measure on every backend (XLA CPU's ``peak_memory_in_bytes`` is not
  filled in); -1 where the backend gives no analysis.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return -1
  return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes +
             stats.output_size_in_bytes - stats.alias_size_in_bytes)


def _make_steps(case: Case, lam: float, refresh_every: int):
  """Builds the initial state and the jitted plain / TrAct / amortised steps."""
  model = model_zoo.create_model(case.model, case.num_classes)
  rng = jax.random.key(0)
  images = jax.random.normal(rng, (case.batch, case.image_size, case.image_size,
                                   case.channels), jnp.float32)
  labels = jax.random.randint(rng, (case.batch,), 0, case.num_classes)
  variables = model.init(rng, images[:2], train=False)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  first_layer = model_zoo.FIRST_LAYER[case.model]
  sgd = optax.sgd(0.01, momentum=0.9)
  txs = {
      'plain': sgd,
      'tract': optax.chain(tract_optax.tract(lam), sgd),
      'amortized': optax.chain(tract_optax.tract(lam, layers=[first_layer],
                                                 refresh_every=refresh_every), sgd),
  }

  def loss_and_updates(params, batch_stats, with_stats):
    variables = {'params': params, 'batch_stats': batch_stats}
    if with_stats:
      (logits, updates), stats = tract_linen.apply_with_stats(
          model, variables, images, train=True, mutable=['batch_stats'],
          layers=[first_layer])
    else:
      logits, updates = model.apply(variables, images, train=True,
                                    mutable=['batch_stats'])
      stats = {}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (updates.get('batch_stats', {}), stats)

  def build(name, with_stats, pass_stats):
    tx = txs[name]

    def step(params, batch_stats, opt_state):
      grads, (new_batch_stats, stats) = jax.grad(
          loss_and_updates, has_aux=True)(params, batch_stats, with_stats)
      extra = {'tract_stats': stats} if pass_stats else {}
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      return optax.apply_updates(params, updates), new_batch_stats, opt_state

    return jax.jit(step, donate_argnums=(0, 1, 2))

  steps = {
      'plain': build('plain', False, False),
      'tract': build('tract', True, True),
      # Amortised: the statistic is computed on due steps only; the other
      # steps run the plain forward pass and reuse the kept statistic.
      'amortized_due': build('amortized', True, True),
      'amortized_skip': build('amortized', False, True),
  }
  states = {name: (params, batch_stats, txs[name].init(params)) for name in txs}
  return steps, states


def _copy(tree):
  return jax.tree.map(jnp.array, tree)


def measure_overhead(case: Case, *, rounds: int, steps_per_round: int, lam: float,
                     refresh_every: int, amortized: bool = True, warmup: int = 1) -> Dict:
  """Median step times (ms) and peak bytes of plain, TrAct and amortised TrAct."""
  jitted, init_states = _make_steps(case, lam, refresh_every)
  if not amortized:
    jitted = {k: v for k, v in jitted.items() if not k.startswith('amortized')}
  step_fns, peaks = {}, {}
  for name, fn in jitted.items():  # compile once; run the compiled executables
    state_name = 'amortized' if name.startswith('amortized') else name
    step_fns[name] = fn.lower(*init_states[state_name]).compile()
    peaks[name] = _peak_bytes(step_fns[name])
  states = {name: _copy(state) for name, state in init_states.items()}
  amortized_count = [0]  # host-side step counter: no device round trip per step

  def run(name, count):
    start = time.perf_counter()
    if name == 'amortized':
      state = states['amortized']
      for _ in range(count):
        due = amortized_count[0] % refresh_every == 0
        state = step_fns['amortized_due' if due else 'amortized_skip'](*state)
        amortized_count[0] += 1
      states['amortized'] = state
    else:
      state = states[name]
      for _ in range(count):
        state = step_fns[name](*state)
      states[name] = state
    jax.block_until_ready(states[name])
    return (time.perf_counter() - start) / count * 1e3

  variants = ['plain', 'tract'] + (['amortized'] if amortized else [])
  for name in variants:  # warm-up: settle caches (amortised: both steps)
    count = max(warmup, refresh_every + 1) if name == 'amortized' else warmup
    if count:
      run(name, count)
  times: Dict[str, List[float]] = {name: [] for name in variants}
  # Amortised rounds cover whole refresh periods so due and skipped steps mix
  # in their real proportion.
  amortized_steps = refresh_every * max(1, math.ceil(steps_per_round / refresh_every))
  for _ in tqdm(range(rounds), desc=f'{case.model} b{case.batch}', leave=False):
    for name in variants:
      times[name].append(run(name, amortized_steps if name == 'amortized'
                             else steps_per_round))
  medians = {name: statistics.median(values) for name, values in times.items()}
  medians.setdefault('amortized', float('nan'))
  return {
      'model': case.model, 'batch': case.batch, 'image_size': case.image_size,
      'plain_ms': medians['plain'], 'tract_ms': medians['tract'],
      'ratio': medians['tract'] / medians['plain'],
      'amortized_ms': medians['amortized'],
      'amortized_ratio': medians['amortized'] / medians['plain'],
      'refresh_every': refresh_every if amortized else None,
      'plain_peak_bytes': peaks['plain'], 'tract_peak_bytes': peaks['tract'],
      'peak_ratio': peaks['tract'] / peaks['plain'] if peaks['plain'] > 0 else None,
      'rounds': rounds, 'steps_per_round': steps_per_round,
      'plain_ms_all': times['plain'], 'tract_ms_all': times['tract'],
      'device': jax.devices()[0].device_kind,
  }


def _time_fn(fn: Callable, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append((time.perf_counter() - start) * 1e3)
  return statistics.median(samples)


def measure_scaling(batches: List[int], sizes: List[int], *, channels: int,
                    kernel: int, stride: int, repeats: int) -> List[Dict]:
  """Statistic cost (chunked and explicit) vs stem forward+backward."""
  rows = []
  shape_grid = [(b, s) for s in sizes for b in batches]
  for batch, size in tqdm(shape_grid, desc='scaling', leave=False):
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    kernel_weights = jax.random.normal(jax.random.key(1),
                                       (kernel, kernel, channels, 64)) * 0.1

    def stem_loss(w, x):
      y = jax.lax.conv_general_dilated(x, w, (stride, stride), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return jnp.sum(y ** 2)

    stem = jax.jit(jax.value_and_grad(stem_loss))
    chunked = jax.jit(lambda v: tract_optax.conv_stats(
        v, (kernel, kernel), stride, 'SAME').moment)
    explicit = jax.jit(lambda v: tract_optax.conv_stats(
        v, (kernel, kernel), stride, 'SAME', max_chunk_bytes=None).moment)
    geometry_rows = batch * math.ceil(size / stride) ** 2
    n = kernel * kernel * channels
    rows.append({
        'batch': batch, 'image_size': size, 'N': geometry_rows, 'n': n,
        'flops_2Nn2': 2 * geometry_rows * n * n,
        'stem_fwd_bwd_ms': _time_fn(stem, (kernel_weights, x), repeats),
        'stats_chunked_ms': _time_fn(chunked, (x,), repeats),
        'stats_explicit_ms': _time_fn(explicit, (x,), repeats),
        'chunked_peak_bytes': _peak_bytes(chunked.lower(x).compile()),
        'explicit_peak_bytes': _peak_bytes(explicit.lower(x).compile()),
        'device': jax.devices()[0].device_kind,
    })
  return rows


def _format_bytes(value: Optional[int]) -> str:
  if value is None or value < 0:
    return 'n/a'
  return f'{value / 2**20:.1f} MiB'


def print_overhead_table(results: List[Dict]) -> None:
  header = (f"{'model':<10}{'batch':>6}{'plain ms':>11}{'TrAct ms':>11}{'ratio':>8}"
            f"{'amort. ratio':>14}{'plain peak':>13}{'TrAct peak':>13}  device")
  print(header)
  print('-' * len(header))
  for r in results:
    print(f"{r['model']:<10}{r['batch']:>6}{r['plain_ms']:>11.1f}{r['tract_ms']:>11.1f}"
          f"{r['ratio']:>8.3f}{r['amortized_ratio']:>14.3f}"
          f"{_format_bytes(r['plain_peak_bytes']):>13}"
          f"{_format_bytes(r['tract_peak_bytes']):>13}  {r['device']}")


def print_scaling_table(rows: List[Dict]) -> None:
  header = (f"{'batch':>6}{'size':>6}{'N':>10}{'n':>5}{'GFLOP':>8}{'stem f+b ms':>13}"
            f"{'chunked ms':>12}{'explicit ms':>13}{'chunked peak':>14}{'explicit peak':>15}")
  print(header)
  print('-' * len(header))
  for r in rows:
    print(f"{r['batch']:>6}{r['image_size']:>6}{r['N']:>10}{r['n']:>5}"
          f"{r['flops_2Nn2'] / 1e9:>8.2f}{r['stem_fwd_bwd_ms']:>13.2f}"
          f"{r['stats_chunked_ms']:>12.2f}{r['stats_explicit_ms']:>13.2f}"
          f"{_format_bytes(r['chunked_peak_bytes']):>14}"
          f"{_format_bytes(r['explicit_peak_bytes']):>15}")


def main(argv: Optional[List[str]] = None) -> List[Dict]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--mode', choices=['overhead', 'scaling'], default='overhead')
  parser.add_argument('--device', choices=['auto', 'cpu', 'gpu'], default='auto',
                      help='cpu: the CPU-sized subset (small CNN, ResNet-18 CIFAR)')
  parser.add_argument('--models', default=None,
                      help='comma-separated subset of cnn,resnet18,resnet50,vit_b16')
  parser.add_argument('--batch', type=int, default=None, help='override the batch size')
  parser.add_argument('--rounds', type=int, default=None)
  parser.add_argument('--steps-per-round', type=int, default=None)
  parser.add_argument('--lam', type=float, default=0.1)
  parser.add_argument('--refresh-every', type=int, default=10,
                      help='refresh period of the amortised statistic')
  parser.add_argument('--amortized', action=argparse.BooleanOptionalAction, default=None,
                      help='also time the amortised statistic (default: on GPU only)')
  parser.add_argument('--out', default=None, help='JSON file for the results')
  args = parser.parse_args(argv)

  platform = jax.devices()[0].platform
  on_cpu = args.device == 'cpu' or (args.device == 'auto' and platform == 'cpu')
  print(f'jax {jax.__version__}, device: {jax.devices()[0].device_kind} ({platform})',
        file=sys.stderr)

  if args.mode == 'scaling':
    if on_cpu:
      rows = measure_scaling([8, 32, 64], [32, 64, 128], channels=3, kernel=7,
                             stride=2, repeats=args.rounds or 5)
    else:
      rows = measure_scaling([32, 64, 128, 256], [112, 224], channels=3, kernel=7,
                             stride=2, repeats=args.rounds or 20)
    print_scaling_table(rows)
    results = rows
  else:
    cases = CPU_CASES if on_cpu else GPU_CASES
    if args.models:
      wanted = args.models.split(',')
      cases = [c for c in CPU_CASES + GPU_CASES if c.model in wanted]
      cases = list({c.model: c for c in cases}.values())
    if args.batch:
      cases = [dataclasses.replace(c, batch=args.batch) for c in cases]
    amortized = (not on_cpu) if args.amortized is None else args.amortized
    results = []
    for case in tqdm(cases, desc='models'):
      rounds = args.rounds or (case.cpu_rounds if on_cpu else 7)
      steps = args.steps_per_round or (case.cpu_steps_per_round if on_cpu else 20)
      results.append(measure_overhead(
          case, rounds=rounds, steps_per_round=steps, lam=args.lam,
          refresh_every=args.refresh_every, amortized=amortized,
          warmup=case.cpu_warmup if on_cpu else 3))
    print_overhead_table(results)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  main()
