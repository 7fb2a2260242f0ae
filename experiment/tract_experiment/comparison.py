"""A whole comparison: every (input scale, budget, seed, method) run, then the outputs.

Writes ``results.json`` (settings, data source with SHA-256 of every file,
environment, every run, the summary) and ``accuracy_vs_budget.png`` to the
output folder. Part of the experiment application (``tract-optax-train``),
not of the library.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Any, Callable, Dict, List

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import tract_optax
from tract_experiment import data as data_lib
from tract_experiment import models as models_lib
from tract_experiment import report
from tract_experiment import training
from tract_experiment.config import METHOD_LABELS, Config

#: Files a comparison writes into its output folder.
RESULTS_FILE = 'results.json'
PLOT_FILE = 'accuracy_vs_budget.png'


class RunError(RuntimeError):
  """A comparison cannot run: missing or damaged data, an unwritable output folder.

  The message is one line that names the path or setting at fault.
  """


def environment() -> Dict[str, Any]:
  """Versions and the device the runs used."""
  device = jax.devices()[0]
  return dict(jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
              optax=optax.__version__, numpy=np.__version__,
              tract_optax=tract_optax.__version__, python=platform.python_version(),
              platform=device.platform, device=str(getattr(device, 'device_kind', device)),
              device_count=jax.device_count(), cpu_count=os.cpu_count(),
              machine=platform.machine())


def load_datasets(config: Config) -> Dict[str, data_lib.Dataset]:
  """The dataset at every input scale of ``config``, subset as asked.

  Raises:
    RunError: the data is missing or damaged, or has fewer training examples
      than one batch.
  """
  datasets = {}
  for scale in config.input_scales:
    try:
      dataset = data_lib.load(config.dataset, config.data_dir, input_scale=scale)
    except data_lib.DatasetError as error:
      raise RunError(str(error)) from None
    dataset = dataset.subset(config.train_examples, config.test_examples, seed=0)
    if len(dataset.train_labels) < config.batch_size:
      raise RunError(
          f'{len(dataset.train_labels)} training examples are fewer than one batch of '
          f'{config.batch_size}; lower --batch-size.')
    datasets[scale] = dataset
  return datasets


def _compile(config: Config, dataset: data_lib.Dataset, model: nn.Module,
             optimizers: Dict[str, optax.GradientTransformation],
             steps: Dict[str, Callable], eval_step: Callable) -> float:
  """Compiles every step once on throwaway states, so run times exclude it."""
  start = time.perf_counter()
  batch = dataset.train_images[:config.batch_size], dataset.train_labels[:config.batch_size]
  for method, step in steps.items():
    state = training.create_state(model, optimizers[method], dataset.image_shape, 0)
    state, _ = step(state, *batch, jnp.asarray(1), jnp.asarray(0))
    jax.block_until_ready(state)
  training.evaluate(eval_step, state, dataset.test_images[:config.eval_batch_size],
                    dataset.test_labels[:config.eval_batch_size], config.eval_batch_size)
  return time.perf_counter() - start


def _make_out(out: str) -> None:
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as error:
    raise RunError(f'cannot create the output folder {out}: {error.strerror}.') from None


def _log(message: str) -> None:
  print(message, flush=True)


def run_comparison(config: Config, log: Callable[[str], None] = _log) -> Dict[str, Any]:
  """Runs every (input scale, budget, seed, method), prints the summary, writes the outputs.

  Args:
    config: the resolved settings (:func:`tract_experiment.cli.parse_config`).
    log: where progress lines and the summary go.

  Returns:
    The dict written to ``results.json``.

  Raises:
    RunError: missing or damaged data, too few examples for a batch, or an
      output folder that cannot be created or written.
  """
  start_all = time.perf_counter()
  _make_out(config.out)
  start = time.perf_counter()
  datasets = load_datasets(config)
  load_time = time.perf_counter() - start
  first = datasets[config.input_scales[0]]
  source = first.source.to_dict() if first.source else None
  model = models_lib.create_model(config.model, first.num_classes)
  title = report.title(config, len(first.train_labels), len(first.test_labels))
  env = environment()
  log(f'{title}\nbudgets {list(config.epochs)} epochs, methods '
      f'{[METHOD_LABELS[m] for m in config.methods]}, augmentation crop pad '
      f'{config.crop_pad} flip {config.flip}; data loaded in {load_time:.1f} s; '
      f'jax {env["jax"]} on {env["platform"]} ({env["device"]})')
  if first.source:
    log(first.source.describe())

  optimizers = {method: training.make_optimizer(config, method) for method in config.methods}
  steps = {method: training.make_train_step(model, method, config.lr, config.refresh_every)
           for method in config.methods}
  eval_step = training.make_eval_step(model)
  compile_time = _compile(config, first, model, optimizers, steps, eval_step)
  log(f'compiled in {compile_time:.1f} s')

  runs: List[training.Run] = []
  for scale, dataset in datasets.items():
    for budget in config.epochs:
      for seed in config.seed_list:
        for method in config.methods:
          runs.append(training.train_run(config, dataset, method, seed, budget, model,
                                         optimizers[method], steps[method], eval_step, log))

  summary = report.summarize(runs, config)
  table = report.format_table(summary, config)
  grid = report.format_scale_grid(summary, config)
  log('\n' + title + '\n' + table)
  if grid:
    log('\n' + grid)
  for line in summary['lines']:
    log(line)
  if config.paired:
    log(report.VERDICT_RULE)

  config_dict = dataclasses.asdict(config)
  results = dict(
      config=config_dict, data_source=source, environment=env, title=title,
      timing=dict(load_s=load_time, compile_s=compile_time),
      train_examples=len(first.train_labels), test_examples=len(first.test_labels),
      runs=[dict(config=config_dict, **dataclasses.asdict(run), jax_version=env['jax'],
                 device=env['device'], platform=env['platform']) for run in runs],
      summary=summary, table=table, scale_grid=grid)
  plot_path = os.path.join(config.out, PLOT_FILE)
  json_path = os.path.join(config.out, RESULTS_FILE)
  try:
    report.plot(summary, runs, config, title, plot_path)
    results['timing']['total_s'] = time.perf_counter() - start_all
    with open(json_path, 'w') as handle:
      json.dump(results, handle, indent=1)
  except OSError as error:
    raise RunError(f'cannot write into {config.out}: {error}.') from None
  log(f'wrote {json_path} and {plot_path}; total {results["timing"]["total_s"]:.1f} s')
  return results
