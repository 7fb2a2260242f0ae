"""Per-epoch seconds of each method, measured so that one compile cannot decide them.

On a CPU, identical XLA executables run in a fast or a slow mode by chance
(about 1.4x apart on a 2-core VM; docs/overhead.md), so one compile per
method is a draw. :func:`epoch_seconds` builds each method's single-run
train step afresh several times, times the steps of all methods interleaved
step by step on the same batches, and reports per compile the median step
time, then the best and the median over compiles. Part of the experiment
application (``tract-optax-train``), not of the library.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tract_experiment import data as data_lib
from tract_experiment import training
from tract_experiment.config import Config


def epoch_seconds(config: Config, dataset: data_lib.Dataset, model: nn.Module,
                  optimizers: Dict[str, optax.GradientTransformation], *, compiles: int,
                  steps: int, warmup: int = 2,
                  log: Callable[[str], None] = lambda message: None) -> Dict[str, Any]:
  """Step and epoch times of one run of each method, over fresh compiles.

  Each compile round builds every method's step (:func:`training.make_train_step`)
  and state anew, runs ``warmup`` untimed steps, then ``steps`` timed steps
  of each method in turn, one step at a time, on the first seed's batches
  of the first epoch (the same batches for every method). The method order
  rotates from round to round.

  Args:
    config: the comparison's settings (batch size, refresh period, lrs).
    dataset: the training data.
    model: the model.
    optimizers: each method's optimizer.
    compiles: fresh compiles per method (>= 1).
    steps: timed steps per compile and method (>= 1).
    warmup: untimed steps per compile and method (the first compiles).
    log: where one line per compile round goes.

  Returns:
    A JSON-ready dict: ``methods[method]`` with ``per_compile_ms`` (the
    median step time of each compile), ``best_ms`` and ``median_ms`` over
    compiles, ``epoch_s`` (``best_ms`` x steps per epoch) and
    ``epoch_median_s``; ``steps_per_epoch``, ``compiles``, ``steps``,
    ``warmup``, ``seconds`` (time spent measuring).
  """
  if compiles < 1 or steps < 1:
    raise ValueError(f'compiles and steps must be >= 1; got {compiles} and {steps}.')
  start = time.perf_counter()
  methods = list(optimizers)
  steps_per_epoch = len(dataset.train_labels) // config.batch_size
  seed = config.seed_list[0]
  batches = list(data_lib.batches(dataset.train_images, dataset.train_labels,
                                  config.batch_size, seed=(seed, 0, 0), drop_remainder=True))
  total = jnp.asarray(steps_per_epoch * max(config.epochs))
  warmup_steps = jnp.asarray(0)
  peak = jnp.asarray(config.lrs[0], jnp.float32)
  per_compile: Dict[str, List[float]] = {method: [] for method in methods}
  for round_index in range(compiles):
    order = methods[round_index % len(methods):] + methods[:round_index % len(methods)]
    steps_of, states = {}, {}
    for method in order:
      steps_of[method] = training.make_train_step(model, method, config.refresh_every)
      state = training.create_state(model, optimizers[method], dataset.image_shape, seed)
      for index in range(warmup):
        images, labels = batches[index % len(batches)]
        state, _ = steps_of[method](state, images, labels, total, warmup_steps, peak,
                                    step_index=index)
      states[method] = jax.block_until_ready(state)
    times: Dict[str, List[float]] = {method: [] for method in order}
    for index in range(warmup, warmup + steps):
      images, labels = batches[index % len(batches)]
      for method in order:
        begin = time.perf_counter()
        state, _ = steps_of[method](states[method], images, labels, total, warmup_steps, peak,
                                    step_index=index)
        states[method] = jax.block_until_ready(state)
        times[method].append(time.perf_counter() - begin)
    for method in order:
      per_compile[method].append(statistics.median(times[method]) * 1e3)
    log('  timing, compile ' + f'{round_index + 1}/{compiles}: ' + ', '.join(
        f'{method} {per_compile[method][-1]:.1f} ms' for method in methods))
  result: Dict[str, Any] = dict(steps_per_epoch=steps_per_epoch, compiles=compiles,
                                steps=steps, warmup=warmup, methods={})
  for method in methods:
    best = min(per_compile[method])
    median = statistics.median(per_compile[method])
    result['methods'][method] = dict(
        per_compile_ms=per_compile[method], best_ms=best, median_ms=median,
        epoch_s=best * steps_per_epoch / 1e3, epoch_median_s=median * steps_per_epoch / 1e3)
  result['seconds'] = time.perf_counter() - start
  return result


def ratio_text(timing: Dict[str, Any], method: str, baseline: str) -> str:
  """One phrase: ``method``'s step time over ``baseline``'s, best and median over compiles.

  Example:
    >>> timing = {'compiles': 3, 'methods': {
    ...     'plain': {'best_ms': 50.0, 'median_ms': 60.0},
    ...     'tract': {'best_ms': 51.0, 'median_ms': 66.0}}}
    >>> ratio_text(timing, 'tract', 'plain')
    'tract / plain step time 1.020 (best over 3 compiles), 1.100 (median)'
  """
  ours, theirs = timing['methods'][method], timing['methods'][baseline]
  return (f'{method} / {baseline} step time {ours["best_ms"] / theirs["best_ms"]:.3f} '
          f'(best over {timing["compiles"]} compiles), '
          f'{ours["median_ms"] / theirs["median_ms"]:.3f} (median)')


def per_epoch(timing: Dict[str, Any]) -> Dict[str, float]:
  """``{method: seconds per epoch}`` (best over compiles) of :func:`epoch_seconds`."""
  return {method: values['epoch_s'] for method, values in timing['methods'].items()}

