"""Step-time and memory overhead of TrAct on Flax models, plain vs TrAct.

Both variants run the code path users run: a jitted Linen train step with
``optax.chain(..., sgd momentum)``; the TrAct step calls
``tract_optax.linen.apply_with_stats`` and puts ``tract_optax.tract`` first in
the chain. Every variant is built and compiled afresh several times
(``--compiles``; a CPU executable lands in a fast or a slow mode by chance);
per compile the steps are timed side by side in one process, interleaved
round by round after warm-up, and each variant's median is taken; tables give
the best and the median over compiles. Peak memory is XLA's
compiled memory analysis of each step (the same measure on CPU and GPU).

Variants per model: plain; TrAct exact (the statistic of every batch); TrAct
amortised (``tract(..., layers=[stem], refresh_every=K)``: the statistic is
computed only on steps where ``tract_optax.stats_due`` is true, the other
steps run the plain forward pass); each TrAct variant once per statistic
precision asked for (``apply_with_stats(..., precision=...)``).

Modes:
  overhead  median step time and peak memory per model (the default).
  scaling   cost of the conv statistic alone as the batch and image grow,
            chunked (default) vs explicit patch matrix, vs the stem's own
            forward and forward + weight gradient; expected O(N n^2).

Usage:
  python benchmarks/overhead.py --device cpu            # CPU subset, about 4 min
  python benchmarks/overhead.py --device gpu            # all models
  python benchmarks/overhead.py --mode scaling --device cpu
  python benchmarks/overhead.py --mode scaling --batches 128 --sizes 224 \\
      --precision default,highest --out scaling.json   # the ResNet-50 stem
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import math
import statistics
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

import tract_optax
from tract_optax import linen as tract_linen
from tract_experiment import models as model_zoo

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
  cpu_rounds: int = 15       # CPU defaults sized so `--device cpu` takes about 4 min;
  cpu_steps_per_round: int = 1  # many one-step rounds: CPU step times drift
  cpu_warmup: int = 1
  patch_size: Optional[int] = None  # the ViT's patch side
  label: Optional[str] = None       # the name in tables and --models (default: model)

  @property
  def name(self) -> str:
    """How ``--models`` and the tables name this case."""
    return self.label or self.model


#: The application's ViT (tract_experiment.models.vit) on Fashion-MNIST-sized
#: images with 7x7 patches (the main job's model), 4x4 and 14x14.
APP_VITS = [Case('vit', 128, 28, 1, patch_size=size, label=f'vit_p{size}')
            for size in (7, 4, 14)]

CPU_CASES = [Case('cnn', 128, 28, 1),
             Case('resnet18', 128, 32, 3, cpu_rounds=2, cpu_steps_per_round=1,
                  cpu_warmup=0),
             APP_VITS[0]]
# Most informative first, so a run stopped by a time limit keeps the big models.
GPU_CASES = [Case('resnet50', 128, 224, 3, 1000), Case('vit_b16', 64, 224, 3, 1000),
             Case('resnet18', 128, 32, 3), Case('cnn', 128, 28, 1)]

#: Statistic precisions ``--precision`` accepts (``apply_with_stats(precision=...)``).
PRECISIONS = ('default', 'high', 'highest')


def select_cases(models: Optional[Sequence[str]], on_cpu: bool) -> List[Case]:
  """The cases to run, in the order asked; the device's own sizes win.

  Args:
    models: model names, or None for the device's default list.
    on_cpu: whether the CPU list (and its sizes) comes first.

  Returns:
    One case per model name.

  Raises:
    ValueError: for a model name no case list holds.
  """
  own, other = (CPU_CASES, GPU_CASES) if on_cpu else (GPU_CASES, CPU_CASES)
  if models is None:
    return list(own)
  by_name: Dict[str, Case] = {}
  for case in APP_VITS + other + own:  # the device's own case overrides the other's
    by_name[case.name] = case
  unknown = [name for name in models if name not in by_name]
  if unknown:
    raise ValueError(f'--models: unknown {unknown}; choose from {sorted(by_name)}')
  return [by_name[name] for name in models]


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


def _make_steps(case: Case, lam: float, refresh_every: int, precisions: Sequence[str],
                gradient_route: bool = True
                ) -> Tuple[Dict[str, Callable], Dict[str, tuple], Dict[str, str], tuple]:
  """Builds the initial states and the jitted steps of every variant.

  Args:
    case: the model and its input size.
    lam: TrAct's ridge strength.
    refresh_every: refresh period of the amortised variant; 0 leaves it out.
    precisions: statistic precisions, one exact (and amortised) variant each.
    gradient_route: also a ``route@P`` variant: the gradient route
      (``linen.apply_tract`` in the loss, the plain optimizer).

  Returns:
    ``(steps, states, state_of, batch)``: the jitted steps by name
    (``plain``, ``tract@P``, ``route@P``, and when amortised
    ``amortized_due@P`` and the shared ``amortized_skip``), each called as
    ``step(*state, *batch)``; the initial ``(params, batch_stats, opt_state)``
    of each timed variant (``plain``, ``tract@P``, ``route@P``,
    ``amortized@P``); for each step the variant whose
    state it runs on; and the batch ``(images, labels)``, an argument rather
    than a closed-over constant (which XLA would embed in the program).
  """
  options = {'patch_size': case.patch_size} if case.patch_size else {}
  model = model_zoo.create_model(case.model, case.num_classes, **options)
  rng = jax.random.key(0)
  images = jax.random.normal(rng, (case.batch, case.image_size, case.image_size,
                                   case.channels), jnp.float32)
  labels = jax.random.randint(rng, (case.batch,), 0, case.num_classes)
  # Jitted: an eager init dispatches (and on GPU compiles) every op one by one.
  variables = jax.jit(functools.partial(model.init, train=False))(rng, images[:2])
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  first_layer = model_zoo.FIRST_LAYER[case.model]
  sgd = optax.sgd(0.01, momentum=0.9)
  exact_tx = optax.chain(tract_optax.tract(lam), sgd)
  amortized_tx = None
  if refresh_every:
    amortized_tx = optax.chain(tract_optax.tract(lam, layers=[first_layer],
                                                 refresh_every=refresh_every), sgd)

  def loss_and_updates(params, batch_stats, images, labels, precision):
    """Loss and the new batch statistics; the TrAct statistic unless precision is None."""
    variables = {'params': params, 'batch_stats': batch_stats}
    if precision is not None:
      (logits, updates), stats = tract_linen.apply_with_stats(
          model, variables, images, train=True, mutable=['batch_stats'],
          layers=[first_layer], precision=precision)
    else:
      logits, updates = model.apply(variables, images, train=True,
                                    mutable=['batch_stats'])
      stats = {}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (updates.get('batch_stats', {}), stats)

  def route_loss_and_updates(params, batch_stats, images, labels, precision):
    """The gradient route: TrAct's gradient comes out of jax.grad itself."""
    logits, updates = tract_linen.apply_tract(
        model, {'params': params, 'batch_stats': batch_stats}, images, lam=lam,
        layers=[first_layer], precision=precision, train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (updates.get('batch_stats', {}), {})

  def build(tx, precision, pass_stats, loss_fn=loss_and_updates):
    def step(params, batch_stats, opt_state, images, labels):
      grads, (new_batch_stats, stats) = jax.grad(
          loss_fn, has_aux=True)(params, batch_stats, images, labels, precision)
      extra = {'tract_stats': stats} if pass_stats else {}
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      return optax.apply_updates(params, updates), new_batch_stats, opt_state

    return jax.jit(step, donate_argnums=(0, 1, 2))

  steps = {'plain': build(sgd, None, False)}
  states = {'plain': (params, batch_stats, sgd.init(params))}
  state_of = {'plain': 'plain'}
  for precision in precisions:
    name = f'tract@{precision}'
    steps[name] = build(exact_tx, precision, True)
    states[name] = (params, batch_stats, exact_tx.init(params))
    state_of[name] = name
    if gradient_route:
      name = f'route@{precision}'
      steps[name] = build(sgd, precision, False, route_loss_and_updates)
      states[name] = (params, batch_stats, sgd.init(params))
      state_of[name] = name
  if amortized_tx is not None:
    for precision in precisions:
      name = f'amortized@{precision}'
      # Due steps compute the statistic; the other steps run the plain
      # forward pass and precondition with the kept one.
      steps[f'amortized_due@{precision}'] = build(amortized_tx, precision, True)
      states[name] = (params, batch_stats, amortized_tx.init(params))
      state_of[f'amortized_due@{precision}'] = name
    steps['amortized_skip'] = build(amortized_tx, None, True)
    state_of['amortized_skip'] = f'amortized@{precisions[0]}'
  return steps, states, state_of, (images, labels)


def _copy(tree):
  return jax.tree.map(jnp.array, tree)


def _log(message: str) -> None:
  """A progress line on stderr (the tqdm bars show on a terminal only)."""
  print(message, file=sys.stderr, flush=True)


def _compile_steps(jitted: Dict[str, Callable], states: Dict[str, tuple],
                   state_of: Dict[str, str], batch: tuple, workers: int) -> Dict[str, object]:
  """Compiles every step: ``plain`` first, then the others on ``workers`` threads.

  XLA compiles with the GIL released, so threads overlap. ``plain`` goes
  alone first: on a GPU it fills XLA's in-process autotuning cache for the
  model's own convolutions and matmuls, so the compiles running side by side
  only autotune what TrAct adds.
  """
  def compile_one(name):
    return name, jitted[name].lower(*states[state_of[name]], *batch).compile()

  compiled = dict([compile_one('plain')])
  others = [name for name in jitted if name != 'plain']
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    compiled.update(pool.map(compile_one, others))
  return compiled


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
  if numerator is None or denominator is None or denominator <= 0 or numerator < 0:
    return None
  return numerator / denominator


def _time_one_compile(case: Case, *, rounds: int, steps_per_round: int, lam: float,
                      refresh_every: int, precisions: Sequence[str], warmup: int,
                      compile_workers: int, gradient_route: bool, shift: int
                      ) -> Tuple[Dict[str, List[float]], Dict[str, int], float]:
  """Builds and compiles every variant afresh, then times them interleaved.

  Returns:
    ``(times, peaks, compile_s)``: per timed variant the ms per step of each
    round, per step its peak bytes, and the seconds spent building and
    compiling. ``shift`` rotates the order the variants run in each round.
  """
  start = time.perf_counter()
  jitted, init_states, state_of, batch = _make_steps(case, lam, refresh_every, precisions,
                                                     gradient_route)
  compiled = _compile_steps(jitted, init_states, state_of, batch, compile_workers)
  peaks = {name: _peak_bytes(executable) for name, executable in compiled.items()}
  compile_s = time.perf_counter() - start
  states = {name: _copy(state) for name, state in init_states.items()}
  # Host-side step counters: no device round trip per timed step. The
  # warm-up asks tract_optax.stats_due (a device read) and checks them.
  counters = {name: 0 for name in states if name.startswith('amortized@')}

  def run(name: str, count: int, check_due: bool = False) -> float:
    begin = time.perf_counter()
    state = states[name]
    for _ in range(count):
      if name in counters:
        due = counters[name] % refresh_every == 0
        if check_due and bool(tract_optax.stats_due(state[2])) != due:
          raise RuntimeError(
              f'{name}: tract_optax.stats_due says {not due} at step '
              f'{counters[name]}, the schedule (every {refresh_every}) says {due}.')
        step = f'amortized_due@{name.split("@", 1)[1]}' if due else 'amortized_skip'
        counters[name] += 1
      else:
        step = name
      state = compiled[step](*state, *batch)
    states[name] = state
    jax.block_until_ready(state)
    return (time.perf_counter() - begin) / count * 1e3

  variants = list(states)
  shift %= len(variants)
  variants = variants[shift:] + variants[:shift]
  for name in variants:  # warm-up: settle caches (amortised: due and skipped steps)
    count = max(warmup, refresh_every + 1) if name in counters else warmup
    if count:
      run(name, count, check_due=True)
  times: Dict[str, List[float]] = {name: [] for name in variants}
  amortized_steps = (refresh_every * max(1, math.ceil(steps_per_round / refresh_every))
                     if refresh_every else 0)
  for _ in tqdm(range(rounds), desc=f'{case.name} b{case.batch}', leave=False,
                disable=None):
    for name in variants:
      times[name].append(run(name, amortized_steps if name in counters
                             else steps_per_round))
  return times, peaks, compile_s


def measure_overhead(case: Case, *, rounds: int, steps_per_round: int, lam: float,
                     refresh_every: int = 0, precisions: Sequence[str] = ('highest',),
                     warmup: int = 1, compile_workers: int = 1,
                     gradient_route: bool = True, compiles: int = 1) -> List[Dict]:
  """Step times (ms) and peak bytes of plain, TrAct and amortised TrAct, over compiles.

  On a CPU, identical executables run in a fast or a slow mode by chance
  (docs/overhead.md), so every variant is built and compiled afresh
  ``compiles`` times. Per compile, every variant runs in this process,
  interleaved round by round: each round times ``steps_per_round`` steps of
  each variant in turn (the amortised ones whole refresh periods, so due and
  skipped steps mix in their real proportion), the variant order rotating
  from compile to compile; a compile's time of a variant is its median over
  rounds. Each variant reports the best and the median over compiles; the
  ratios compare best with best and median with median.

  Args:
    case: the model and its input size.
    rounds: timed rounds per compile (odd numbers give a plain median).
    steps_per_round: steps per round and variant.
    lam: TrAct's ridge strength.
    refresh_every: refresh period K of the amortised variant; 0 leaves it out.
    precisions: statistic precisions to time ('default', 'high', 'highest').
    warmup: untimed steps per variant first (amortised: at least K + 1).
    compile_workers: threads compiling the TrAct steps after the plain one.
    gradient_route: also time the gradient route (``apply_tract``).
    compiles: fresh builds and compiles of every variant.

  Returns:
    One row per precision; the plain columns are the same measurement in
    each. Amortised columns are None without ``refresh_every``.

  Raises:
    RuntimeError: if ``tract_optax.stats_due`` disagrees with the schedule the
      timed rounds follow (refresh at step 0, K, 2K, ...).
  """
  per_compile: Dict[str, List[float]] = {}
  rounds_ms: Dict[str, List[List[float]]] = {}
  compile_s = 0.0
  peaks: Dict[str, int] = {}
  timing_start = time.perf_counter()
  for index in range(compiles):
    times, peaks, seconds = _time_one_compile(
        case, rounds=rounds, steps_per_round=steps_per_round, lam=lam,
        refresh_every=refresh_every, precisions=precisions, warmup=warmup,
        compile_workers=compile_workers, gradient_route=gradient_route, shift=index)
    compile_s += seconds
    for name, values in times.items():
      per_compile.setdefault(name, []).append(statistics.median(values))
      rounds_ms.setdefault(name, []).append(values)
    _log(f'{case.name} b{case.batch}: compile {index + 1}/{compiles} in {seconds:.1f} s; ' +
         ', '.join(f'{name} {values[-1]:.1f} ms' for name, values in per_compile.items()))
  timing_s = time.perf_counter() - timing_start - compile_s
  best = {name: min(values) for name, values in per_compile.items()}
  median = {name: statistics.median(values) for name, values in per_compile.items()}
  platform = jax.devices()[0].platform
  rows = []
  for precision in precisions:
    exact, amortized = f'tract@{precision}', f'amortized@{precision}'
    route = f'route@{precision}'
    amortized_peak = None
    if refresh_every:
      amortized_peak = max(peaks[f'amortized_due@{precision}'], peaks['amortized_skip'])
    rows.append({
        'model': case.name, 'batch': case.batch, 'image_size': case.image_size,
        'patch_size': case.patch_size, 'precision': precision, 'compiles': compiles,
        'plain_ms': best['plain'], 'tract_ms': best[exact],
        'ratio': best[exact] / best['plain'],
        'plain_ms_median': median['plain'], 'tract_ms_median': median[exact],
        'ratio_median': median[exact] / median['plain'],
        'route_ms': best.get(route), 'route_ms_median': median.get(route),
        'route_ratio': _ratio(best.get(route), best['plain']),
        'route_ratio_median': _ratio(median.get(route), median['plain']),
        'route_peak_bytes': peaks.get(route),
        'route_peak_ratio': _ratio(peaks.get(route), peaks['plain']),
        'amortized_ms': best.get(amortized),
        'amortized_ratio': _ratio(best.get(amortized), best['plain']),
        'refresh_every': refresh_every or None,
        'plain_peak_bytes': peaks['plain'], 'tract_peak_bytes': peaks[exact],
        'peak_ratio': _ratio(peaks[exact], peaks['plain']),
        'amortized_peak_bytes': amortized_peak,
        'amortized_peak_ratio': _ratio(amortized_peak, peaks['plain']),
        'rounds': rounds, 'steps_per_round': steps_per_round,
        'amortized_steps_per_round': (
            refresh_every * max(1, math.ceil(steps_per_round / refresh_every))
            if refresh_every else None),
        'plain_ms_per_compile': per_compile['plain'],
        'tract_ms_per_compile': per_compile[exact],
        'route_ms_per_compile': per_compile.get(route),
        'amortized_ms_per_compile': per_compile.get(amortized),
        'plain_ms_all': rounds_ms['plain'], 'tract_ms_all': rounds_ms[exact],
        'amortized_ms_all': rounds_ms.get(amortized),
        'compile_s': compile_s, 'timing_s': timing_s,
        'device': jax.devices()[0].device_kind, 'platform': platform,
    })
  _log(f'{case.name} b{case.batch}: {compiles} compiles, {rounds} rounds each; ' +
       ', '.join(f"{row['precision']}: ratio {row['ratio']:.3f} best, "
                 f"{row['ratio_median']:.3f} median" for row in rows))
  return rows


def _calls_per_sample(fn: Callable, args, target_s: float) -> int:
  """Back-to-back calls per timing sample so that one sample lasts ``target_s``.

  Runs ``fn`` twice (compile, then one timed call); fast computations get
  several calls per sample, so dispatch latency does not dominate them.
  """
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  once = time.perf_counter() - start
  return int(min(100, max(1, math.ceil(target_s / max(once, 1e-6)))))


def time_interleaved(fns: Dict[str, Tuple[Callable, tuple]], repeats: int,
                     target_s: float = 0.02) -> Dict[str, float]:
  """Median ms per call of each function, sampled in turn ``repeats`` times.

  Args:
    fns: name -> (jitted function, arguments).
    repeats: samples per function; each sample is the mean of a few
      back-to-back calls (see :func:`_calls_per_sample`).
    target_s: the least duration of one sample.

  Returns:
    name -> median milliseconds per call.
  """
  calls = {name: _calls_per_sample(fn, args, target_s) for name, (fn, args) in fns.items()}
  samples: Dict[str, List[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, (fn, args) in fns.items():
      start = time.perf_counter()
      for _ in range(calls[name]):
        out = fn(*args)
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - start) / calls[name] * 1e3)
  return {name: statistics.median(values) for name, values in samples.items()}


def measure_scaling(batches: Sequence[int], sizes: Sequence[int], *, channels: int,
                    kernel: int, stride: int, repeats: int,
                    precisions: Sequence[str] = ('highest',),
                    explicit: bool = True) -> List[Dict]:
  """Statistic cost (chunked and explicit) vs the stem's own computation.

  The stem is a ``kernel x kernel`` convolution with stride ``stride``,
  ``kernel // 2`` zero padding on each side (ResNet-50's 7x7/2 stem) and 64
  output channels, run at JAX's default matmul precision as a model would.
  Per shape it times, interleaved: the stem's forward, its forward + weight
  gradient, and ``tract_optax.conv_stats`` (chunked, and explicit: the full
  patch matrix) at each statistic precision.

  Args:
    batches: batch sizes.
    sizes: square image sizes.
    channels: input channels.
    kernel: square window size.
    stride: window stride.
    repeats: timing samples per computation.
    precisions: statistic precisions ('default', 'high', 'highest').
    explicit: also time the explicit patch-matrix statistic.

  Returns:
    One row per (size, batch, precision); the stem columns repeat per precision.
  """
  rows = []
  shape_grid = [(b, s) for s in sizes for b in batches]
  pad = kernel // 2
  padding = ((pad, pad), (pad, pad))
  for batch, size in tqdm(shape_grid, desc='scaling', leave=False, disable=None):
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    kernel_weights = jax.random.normal(jax.random.key(1),
                                       (kernel, kernel, channels, 64)) * 0.1

    def stem_forward(w, x):
      return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    def stem_loss(w, x):
      return jnp.sum(stem_forward(w, x) ** 2)

    fns = {'stem_fwd': (jax.jit(stem_forward), (kernel_weights, x)),
           'stem_fwd_bwd': (jax.jit(jax.value_and_grad(stem_loss)), (kernel_weights, x))}
    statistics_fns = {}
    for precision in precisions:
      statistics_fns[f'chunked@{precision}'] = jax.jit(functools.partial(
          lambda v, p: tract_optax.conv_stats(v, (kernel, kernel), stride, padding,
                                              precision=p).moment, p=precision))
      if explicit:
        statistics_fns[f'explicit@{precision}'] = jax.jit(functools.partial(
            lambda v, p: tract_optax.conv_stats(v, (kernel, kernel), stride, padding,
                                                precision=p, max_chunk_bytes=None).moment,
            p=precision))
    fns.update({name: (fn, (x,)) for name, fn in statistics_fns.items()})
    start = time.perf_counter()
    medians = time_interleaved(fns, repeats)
    peaks = {name: _peak_bytes(fn.lower(x).compile()) for name, fn in statistics_fns.items()}
    out_size = (size + 2 * pad - kernel) // stride + 1
    geometry_rows = batch * out_size ** 2
    n = kernel * kernel * channels
    _log(f'scaling b{batch} {size}px: timed in {time.perf_counter() - start:.1f} s')
    for precision in precisions:
      chunked_ms = medians[f'chunked@{precision}']
      explicit_ms = medians.get(f'explicit@{precision}')
      rows.append({
          'batch': batch, 'image_size': size, 'channels': channels, 'kernel': kernel,
          'stride': stride, 'N': geometry_rows, 'n': n,
          'flops_2Nn2': 2 * geometry_rows * n * n, 'precision': precision,
          'stem_fwd_ms': medians['stem_fwd'],
          'stem_fwd_bwd_ms': medians['stem_fwd_bwd'],
          'stats_chunked_ms': chunked_ms, 'stats_explicit_ms': explicit_ms,
          'chunked_over_stem': chunked_ms / medians['stem_fwd_bwd'],
          'explicit_over_stem': _ratio(explicit_ms, medians['stem_fwd_bwd']),
          'chunked_peak_bytes': peaks[f'chunked@{precision}'],
          'explicit_peak_bytes': peaks.get(f'explicit@{precision}'),
          'repeats': repeats,
          'device': jax.devices()[0].device_kind, 'platform': jax.devices()[0].platform,
      })
  return rows


def _format_bytes(value: Optional[int]) -> str:
  if value is None or value < 0:
    return 'n/a'
  return f'{value / 2**20:.1f} MiB'


def _format_optional(value: Optional[float], spec: str) -> str:
  return 'n/a' if value is None else format(value, spec)


def print_overhead_table(results: List[Dict]) -> None:
  """Prints one line per (model, precision) row of :func:`measure_overhead`.

  Times are the best over compiles with the median over compiles after the
  slash; the ratios likewise (best / best, median / median).
  """
  header = (f"{'model':<10}{'batch':>6}{'precision':>10}{'compiles':>9}"
            f"{'plain ms':>15}{'TrAct ms':>15}{'ratio':>14}{'route ratio':>14}"
            f"{'amort. ratio':>14}{'plain peak':>13}{'TrAct peak':>13}{'peak ratio':>12}"
            "  device")
  print('ms and ratios: best over compiles / median over compiles')
  print(header)
  print('-' * len(header))
  for r in results:
    amortized = _format_optional(r['amortized_ratio'], '.3f')
    if r['refresh_every']:
      amortized += f" (K={r['refresh_every']})"
    route = (f"{_format_optional(r.get('route_ratio'), '.3f')}/"
             f"{_format_optional(r.get('route_ratio_median'), '.3f')}")
    print(f"{r['model']:<10}{r['batch']:>6}{r['precision']:>10}{r['compiles']:>9}"
          f"{r['plain_ms']:>9.1f}/{r['plain_ms_median']:<5.1f}"
          f"{r['tract_ms']:>9.1f}/{r['tract_ms_median']:<5.1f}"
          f"{r['ratio']:>8.3f}/{r['ratio_median']:.3f}{route:>14}{amortized:>14}"
          f"{_format_bytes(r['plain_peak_bytes']):>13}"
          f"{_format_bytes(r['tract_peak_bytes']):>13}"
          f"{_format_optional(r['peak_ratio'], '.3f'):>12}  {r['device']}")


def print_scaling_table(rows: List[Dict]) -> None:
  """Prints one line per (shape, precision) row of :func:`measure_scaling`."""
  header = (f"{'batch':>6}{'size':>6}{'N':>10}{'n':>5}{'GFLOP':>8}{'precision':>10}"
            f"{'stem fwd ms':>12}{'stem f+wg ms':>13}{'chunked ms':>12}{'/ stem':>8}"
            f"{'explicit ms':>13}{'chunked peak':>14}{'explicit peak':>15}")
  print(header)
  print('-' * len(header))
  for r in rows:
    print(f"{r['batch']:>6}{r['image_size']:>6}{r['N']:>10}{r['n']:>5}"
          f"{r['flops_2Nn2'] / 1e9:>8.2f}{r['precision']:>10}{r['stem_fwd_ms']:>12.2f}"
          f"{r['stem_fwd_bwd_ms']:>13.2f}{r['stats_chunked_ms']:>12.2f}"
          f"{r['chunked_over_stem']:>8.2f}"
          f"{_format_optional(r['stats_explicit_ms'], '.2f'):>13}"
          f"{_format_bytes(r['chunked_peak_bytes']):>14}"
          f"{_format_bytes(r['explicit_peak_bytes']):>15}")


def _write_json(path: str, results: List[Dict]) -> None:
  """Writes the results whole (a temporary file renamed), so a reader never sees half."""
  temporary = f'{path}.partial'
  with open(temporary, 'w') as f:
    json.dump(results, f, indent=2)
  os.replace(temporary, path)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
  """Shows every default; a default of None (chosen per device) is spelled out in the help."""

  def _get_help_string(self, action):
    if action.default is None:
      return action.help
    return super()._get_help_string(action)


def _int_list(text: str) -> List[int]:
  try:
    values = [int(part) for part in text.split(',') if part.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected comma-separated integers; got {text!r}') from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f'expected integers >= 1; got {text!r}')
  return values


def _precision_list(text: str) -> List[str]:
  values = [part.strip().lower() for part in text.split(',') if part.strip()]
  unknown = [value for value in values if value not in PRECISIONS]
  if not values or unknown:
    raise argparse.ArgumentTypeError(
        f'expected comma-separated precisions from {",".join(PRECISIONS)}; got {text!r}')
  return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
  """The command line of the benchmark."""
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      epilog='\n\n'.join(__doc__.split('\n\n')[2:]), formatter_class=_HelpFormatter)
  add = parser.add_argument
  add('--mode', choices=['overhead', 'scaling'], default='overhead',
      help='overhead: train-step time and peak memory per model; scaling: the conv '
           'statistic alone vs the stem convolution, over a grid of shapes')
  add('--device', choices=['auto', 'cpu', 'gpu'], default='auto',
      help='which defaults to use: cpu the CPU-sized subset (small CNN, ResNet-18 CIFAR, '
           'few rounds), gpu the full list (ResNet-50 b128, ViT-B/16 b64, ResNet-18 '
           'CIFAR b128, small CNN); auto follows the JAX backend. Runs on whatever '
           'device JAX has')
  add('--models', default=None,
      help='comma-separated models, run in this order, from cnn,resnet18,resnet50,vit_b16 '
           'and the application\'s ViT on 28 px images: vit_p7 (7x7 patches, the main '
           "job's model), vit_p4, vit_p14 (default: the device's list)")
  add('--compiles', type=int, default=None,
      help='overhead: fresh builds and compiles of every variant, each timed interleaved '
           'with the others; tables give the best and the median over compiles (CPU '
           'executables land in a fast or a slow mode by chance) (default: cpu 3, gpu 1)')
  add('--batch', type=int, default=None,
      help="batch size of every model (default: each model's own, 128; ViT-B/16 64)")
  add('--rounds', type=int, default=None,
      help='overhead: timed rounds per model; scaling: timing samples per computation '
           '(default: overhead cpu 15 per compile, 2 for resnet18, gpu 7; scaling cpu 5, '
           'gpu 20)')
  add('--steps-per-round', type=int, default=None,
      help='steps of each variant per round (default: cpu 1, gpu 20)')
  add('--warmup', type=int, default=None,
      help='untimed steps of each variant before the rounds; amortised variants run at '
           'least K + 1 (default: cpu 1 for cnn and 0 for resnet18, gpu 3)')
  add('--lam', type=float, default=0.1, help='TrAct ridge strength lambda')
  add('--amortize', type=int, default=None, metavar='K',
      help='also time TrAct with the amortised statistic: tract(..., layers=[stem], '
           'refresh_every=K), the statistic computed only on steps where '
           'tract_optax.stats_due holds; 0 leaves it out (default: gpu 10, cpu 0)')
  add('--precision', type=_precision_list, default=None,
      help='comma-separated statistic precisions from default,high,highest, one TrAct '
           'variant (or scaling row) each: apply_with_stats(..., precision=P), '
           'conv_stats(..., precision=P) (default: gpu default,highest; cpu default)')
  add('--gradient-route', action=argparse.BooleanOptionalAction, default=True,
      help='overhead: also time the gradient route (linen.apply_tract in the loss, '
           'the plain optimizer) beside the Optax route')
  add('--compile-workers', type=int, default=None,
      help='threads compiling the TrAct steps side by side after the plain one '
           '(default: gpu 4, cpu 1)')
  add('--batches', type=_int_list, default=None,
      help='scaling: comma-separated batch sizes (default: cpu 8,32,64; gpu 32,64,128,256)')
  add('--sizes', type=_int_list, default=None,
      help='scaling: comma-separated image sizes (default: cpu 32,64,128; gpu 112,224)')
  add('--channels', type=int, default=3, help='scaling: input channels of the stem')
  add('--kernel', type=int, default=7, help='scaling: stem window size')
  add('--stride', type=int, default=2, help='scaling: stem stride')
  add('--explicit', action=argparse.BooleanOptionalAction, default=True,
      help='scaling: also time the explicit patch-matrix statistic')
  add('--out', default=None,
      help='JSON file for the results (a list of rows), rewritten after each model, so '
           'a run stopped early keeps what finished (default: none)')
  return parser


def _check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  for name, least in (('batch', 1), ('rounds', 1), ('steps_per_round', 1), ('warmup', 0),
                      ('compiles', 1),
                      ('amortize', 0), ('compile_workers', 1), ('channels', 1),
                      ('kernel', 1), ('stride', 1)):
    value = getattr(args, name)
    if value is not None and value < least:
      parser.error(f'--{name.replace("_", "-")} must be >= {least}; got {value}')
  if args.lam <= 0:
    parser.error(f'--lam must be > 0; got {args.lam}')


def main(argv: Optional[List[str]] = None) -> List[Dict]:
  """Runs the benchmark; returns the rows it printed (and wrote to ``--out``)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  _check_positive(parser, args)

  platform = jax.devices()[0].platform
  on_cpu = args.device == 'cpu' or (args.device == 'auto' and platform == 'cpu')
  _log(f'jax {jax.__version__}, device: {jax.devices()[0].device_kind} ({platform})')
  if args.device == 'gpu' and platform != 'gpu':
    _log(f'warning: --device gpu picks the GPU sizes, but JAX runs on {platform}')
  precisions = args.precision or (['default'] if on_cpu else ['default', 'highest'])
  results: List[Dict] = []

  if args.mode == 'scaling':
    results = measure_scaling(
        args.batches or ([8, 32, 64] if on_cpu else [32, 64, 128, 256]),
        args.sizes or ([32, 64, 128] if on_cpu else [112, 224]),
        channels=args.channels, kernel=args.kernel, stride=args.stride,
        repeats=args.rounds or (5 if on_cpu else 20), precisions=precisions,
        explicit=args.explicit)
    print_scaling_table(results)
    if args.out:
      _write_json(args.out, results)
    return results

  try:
    cases = select_cases(args.models.split(',') if args.models else None, on_cpu)
  except ValueError as error:
    parser.error(str(error))
  if args.batch:
    cases = [dataclasses.replace(c, batch=args.batch) for c in cases]
  refresh_every = (0 if on_cpu else 10) if args.amortize is None else args.amortize
  workers = args.compile_workers or (1 if on_cpu else 4)
  compiles = args.compiles or (3 if on_cpu else 1)
  for case in tqdm(cases, desc='models', disable=None):
    _log(f'{case.name} b{case.batch} ({case.image_size} px): building and compiling '
         f'{compiles} times')
    results.extend(measure_overhead(
        case, rounds=args.rounds or (case.cpu_rounds if on_cpu else 7),
        steps_per_round=args.steps_per_round or (case.cpu_steps_per_round if on_cpu else 20),
        lam=args.lam, refresh_every=refresh_every, precisions=precisions,
        warmup=args.warmup if args.warmup is not None else (
            case.cpu_warmup if on_cpu else 3),
        compile_workers=workers, gradient_route=args.gradient_route, compiles=compiles))
    if args.out:
      _write_json(args.out, results)
  print_overhead_table(results)
  return results


if __name__ == '__main__':
  main()
