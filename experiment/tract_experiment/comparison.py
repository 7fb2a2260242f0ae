"""A whole comparison: every (input scale, budget, seed, lr, method) run, then the outputs.

Writes ``results.json`` (settings, data source with SHA-256 of every file,
environment, every run with its validation and test accuracy, the lr chosen
per method and budget, the summary) and ``accuracy_vs_budget.png`` to the
output folder. Part of the experiment application (``tract-optax-train``),
not of the library.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

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
from tract_experiment import report, training
from tract_experiment import timing as timing_lib
from tract_experiment.config import AUTO_VAL_EXAMPLES, BASELINE, METHOD_LABELS, Config

#: Files a comparison writes into its output folder.
RESULTS_FILE = 'results.json'
PLOT_FILE = 'accuracy_vs_budget.png'


#: Files of an earlier comparison that ``--out`` may not hold without ``--overwrite``.
OUTPUT_FILES = (RESULTS_FILE, PLOT_FILE)

#: ``--lam`` at least this many times the first layer's mean input eigenvalue
#: (``tract``) or this large (``tract_rel``) freezes the first layer in effect.
FROZEN_LAM_RATIO = 100.0


class RunError(RuntimeError):
  """A comparison cannot run; the message is one line naming what to change.

  Attributes:
    status: the exit status of ``tract-optax-train``: 1 (data, output folder,
      missing dependency) or 2 (a flag value the data cannot satisfy).
  """

  def __init__(self, message: str, status: int = 1):
    super().__init__(message)
    self.status = status


class Interrupted(RunError):
  """The comparison was interrupted (Ctrl-C); finished runs are kept (status 130)."""

  def __init__(self, message: str):
    super().__init__(message, status=130)


def environment() -> Dict[str, Any]:
  """Versions and the device the runs used."""
  device = jax.devices()[0]
  return dict(jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
              optax=optax.__version__, numpy=np.__version__,
              tract_optax=tract_optax.__version__, python=platform.python_version(),
              platform=device.platform, device=str(getattr(device, 'device_kind', device)),
              device_count=jax.device_count(), cpu_count=os.cpu_count(),
              machine=platform.machine())


def _out_problem(out: str, overwrite: bool) -> Optional[str]:
  """Why the folder ``out`` cannot be used, or None."""
  path = Path(out)
  if path.exists():
    if not path.is_dir():
      return f'--out {out} exists and is not a folder; choose another --out.'
    if not os.access(path, os.W_OK | os.X_OK):
      return f'--out {out} is not writable; choose another --out.'
    held = [name for name in OUTPUT_FILES if (path / name).exists()]
    if held and not overwrite:
      return (f'--out {out} already holds results ({", ".join(held)}); pass --overwrite to '
              'replace them, or choose another --out.')
    return None
  parent = path.absolute().parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    return f'--out {out} cannot be created: {parent} is a file, not a folder.'
  if not os.access(parent, os.W_OK | os.X_OK):
    return f'--out {out} cannot be created: {parent} is not writable.'
  return None


def check_before_running(config: Config) -> None:
  """Everything that can be checked before the data is read or anything is trained.

  Raises:
    RunError: ``--data-dir`` missing or not a folder, ``--out`` unusable or
      holding earlier results (without ``--overwrite``), or matplotlib missing
      while the plot is asked for (status 1).
  """
  if config.data_dir is not None:
    if not os.path.exists(config.data_dir):
      raise RunError(f'--data-dir {config.data_dir} does not exist.')
    if not os.path.isdir(config.data_dir):
      raise RunError(f'--data-dir {config.data_dir} is not a folder.')
  problem = _out_problem(config.out, config.overwrite)
  if problem:
    raise RunError(problem)
  if config.plot and importlib.util.find_spec('matplotlib') is None:
    raise RunError('matplotlib is not installed and the plot needs it: install it '
                   '(python -m pip install matplotlib, or the experiment package with its '
                   'dependencies), or pass --no-plot.')


def _tqdm_missing(config: Config) -> bool:
  return config.progress and importlib.util.find_spec('tqdm') is None


def _auto_val_examples(train_file_examples: int) -> int:
  return max(1, min(AUTO_VAL_EXAMPLES, train_file_examples // 6))


def load_datasets(config: Config) -> Dict[str, data_lib.Dataset]:
  """The dataset at every input scale of ``config``, split and subset as asked.

  The validation split is carved from the training file (see
  :meth:`~tract_experiment.data.Dataset.split`), the same examples at every
  input scale.

  Raises:
    RunError: the data is missing or damaged (status 1); the sizes asked for
      do not fit the data, or the ViT's patches do not tile the images
      (status 2).
  """
  datasets = {}
  for scale in config.input_scales:
    try:
      dataset = data_lib.load(config.dataset, config.data_dir, input_scale=scale)
    except data_lib.DatasetError as error:
      raise RunError(str(error)) from None
    val_examples = config.val_examples or _auto_val_examples(len(dataset.train_labels))
    try:
      dataset = dataset.split(config.train_examples, val_examples, config.test_examples,
                              seed=0)
    except data_lib.SplitError as error:
      raise RunError(str(error), status=2) from None
    if len(dataset.train_labels) < config.batch_size:
      raise RunError(
          f'{len(dataset.train_labels)} training examples are fewer than one batch of '
          f'{config.batch_size}; lower --batch-size.', status=2)
    side = dataset.image_shape[0]
    if config.patch_size and (side % config.patch_size or dataset.image_shape[1] % config.patch_size):
      divisors = [d for d in range(2, side) if side % d == 0]
      raise RunError(
          f'--patch-size {config.patch_size} does not tile the {side}x'
          f'{dataset.image_shape[1]} images of {config.dataset}; choose a divisor of '
          f'{side} ({", ".join(map(str, divisors))}).', status=2)
    datasets[scale] = dataset
  return datasets


def lam_warning(config: Config, dataset: data_lib.Dataset) -> Optional[str]:
  """A warning line when ``--lam`` freezes the first layer in effect, else None.

  TrAct's first-layer step is ``(S + lam I)^-1 G`` with ``S`` the input
  statistic, at most ``1 / lam`` times the gradient; once ``lam`` dwarfs
  ``S``'s mean eigenvalue (``mean(x^2)`` of the inputs, about the mean squared
  patch entry) the step is plain SGD's divided by about ``lam``. For
  ``tract_rel`` the ridge is already relative, so ``lam`` itself is the ratio.
  """
  if not config.tract_methods:
    return None
  mean_eigenvalue = float(np.mean(np.square(dataset.train_images[:2048], dtype=np.float64)))
  ratios = {}
  if 'tract' in config.tract_methods and mean_eigenvalue > 0:
    ratios['tract'] = config.lam / mean_eigenvalue
  if 'tract_rel' in config.tract_methods:
    ratios['tract_rel'] = config.lam
  frozen = {m: r for m, r in ratios.items() if r >= FROZEN_LAM_RATIO}
  if not frozen:
    return None
  parts = ', '.join(f'{METHOD_LABELS[m]}: lam / mean eigenvalue = {r:.3g}'
                    for m, r in frozen.items())
  return (f'warning: --lam {config.lam:g} dwarfs the first layer\'s input statistic '
          f'({dataset.input_scale} input, mean eigenvalue about {mean_eigenvalue:.3g}; {parts}):'
          f' TrAct\'s first-layer step is plain SGD\'s divided by about that much, so the '
          'first layer is frozen in effect (the paper\'s default lam is 0.1).')


def model_for(config: Config, num_classes: int) -> nn.Module:
  """The model of ``config`` (with ``--patch-size`` for the ViT)."""
  options = {'patch_size': config.patch_size} if config.patch_size else {}
  return models_lib.create_model(config.model, num_classes, **options)


def _compile(config: Config, dataset: data_lib.Dataset, model: nn.Module,
             optimizers: Dict[str, optax.GradientTransformation],
             steps: Dict[str, Callable], eval_step: Callable) -> float:
  """Compiles every group step once on throwaway states, so run times exclude it.

  The budget and the peak lrs are arrays, so one compile per method serves
  every budget; with ``--refresh-every`` the reusing step compiles at its
  first use.
  """
  start = time.perf_counter()
  seeds = config.seed_list
  images, labels = next(training.group_batches(dataset, config, seeds, 0))
  lrs = jnp.asarray(config.lrs, jnp.float32)
  for method, step in steps.items():
    states = training.create_group_state(model, optimizers[method], dataset.image_shape,
                                         seeds, len(config.lrs))
    states, _ = step(states, images, labels, jnp.asarray(1), jnp.asarray(0), lrs)
    jax.block_until_ready(states)
  training.evaluate_group(eval_step, states, dataset.test_images[:config.eval_batch_size],
                          dataset.test_labels[:config.eval_batch_size],
                          config.eval_batch_size)
  return time.perf_counter() - start


def _log(message: str) -> None:
  print(message, flush=True)


class _Output:
  """The output folder: created at the first write, removed again if nothing was written."""

  def __init__(self, out: str):
    self.out = out
    self.created = False

  def path(self, name: str) -> str:
    return os.path.join(self.out, name)

  def write_json(self, results: Dict[str, Any]) -> str:
    try:
      if not os.path.isdir(self.out):
        os.makedirs(self.out)
        self.created = True
      path = self.path(RESULTS_FILE)
      temporary = path + '.tmp'
      with open(temporary, 'w') as handle:
        json.dump(results, handle, indent=1)
      os.replace(temporary, path)
    except OSError as error:
      raise RunError(f'cannot write into {self.out}: {error.strerror or error}.') from None
    return path

  def remove_if_empty(self) -> None:
    if self.created and os.path.isdir(self.out) and not os.listdir(self.out):
      os.rmdir(self.out)


def _run_plan(config: Config) -> List[Tuple[str, int, int, float, str]]:
  """Every (input scale, budget, seed, lr, method), in the order they are reported."""
  return [(scale, budget, seed, lr, method) for scale, budget in _group_plan(config)
          for method in config.methods for seed in config.seed_list for lr in config.lrs]


def _group_plan(config: Config) -> List[Tuple[str, int]]:
  """Every (input scale, budget): the methods' vectorised groups (seeds x lrs), side by side."""
  return [(scale, budget) for scale in config.input_scales for budget in config.epochs]


def run_comparison(config: Config, log: Callable[[str], None] = _log) -> Dict[str, Any]:
  """Runs every (input scale, budget, seed, lr, method), prints the summary, writes outputs.

  ``results.json`` is rewritten after every finished run (``partial: true``
  until the last), then completed with the summary, then the plot is drawn.
  The output folder is created at the first write; a run that fails before
  that leaves none behind.

  Args:
    config: the resolved settings (:func:`tract_experiment.cli.parse_config`).
    log: where progress lines and the summary go.

  Returns:
    The dict written to ``results.json``.

  Raises:
    RunError: see :func:`check_before_running` and :func:`load_datasets`; an
      output folder that cannot be written.
    Interrupted: Ctrl-C; the finished runs are in ``results.json``.
  """
  check_before_running(config)
  output = _Output(config.out)
  try:
    return _run(config, log, output)
  except KeyboardInterrupt:
    output.remove_if_empty()
    raise Interrupted('no run had finished; nothing was written.') from None
  except BaseException:
    output.remove_if_empty()
    raise


def _time_epochs(config: Config, dataset: data_lib.Dataset, model: nn.Module,
                 optimizers: Dict[str, optax.GradientTransformation],
                 log: Callable[[str], None]) -> Optional[Dict[str, Any]]:
  """Seconds per epoch of one run of each method (:mod:`tract_experiment.timing`), or None.

  Only when plain and a TrAct method both ran and ``--timing-compiles`` is not 0.
  """
  if not (config.paired and config.timing_compiles):
    return None
  log(f'timing one run\'s train step of each method: {config.timing_compiles} fresh compiles, '
      f'{config.timing_steps} steps each, interleaved')
  result = timing_lib.epoch_seconds(config, dataset, model, optimizers,
                                    compiles=config.timing_compiles,
                                    steps=config.timing_steps, log=log)
  for method in config.tract_methods:
    log(f'  {timing_lib.ratio_text(result, method, BASELINE)}; measured in '
        f'{result["seconds"]:.1f} s')
  return result


def _timing_note(config: Config, epoch_timing: Dict[str, Any]) -> str:
  per_epoch = ', '.join(f'{METHOD_LABELS[method]} {values["epoch_s"]:.2f} s'
                        for method, values in epoch_timing['methods'].items())
  return (f'seconds per epoch of one run: {per_epoch}; each the best over '
          f'{epoch_timing["compiles"]} fresh compiles of the median of '
          f'{epoch_timing["steps"]} interleaved steps x {epoch_timing["steps_per_epoch"]} '
          f'steps per epoch, on {environment()["device"]}')


def _run(config: Config, log: Callable[[str], None], output: _Output) -> Dict[str, Any]:
  start_all = time.perf_counter()
  start = time.perf_counter()
  datasets = load_datasets(config)
  load_time = time.perf_counter() - start
  first = datasets[config.input_scales[0]]
  source = first.source.to_dict() if first.source else None
  model = model_for(config, first.num_classes)
  sizes = dict(train_examples=len(first.train_labels), val_examples=len(first.val_labels),
               test_examples=len(first.test_labels))
  title = report.title(config, sizes['train_examples'], sizes['test_examples'],
                       sizes['val_examples'])
  trials = report.trials_text(config, sizes['val_examples'], sizes['test_examples'])
  env = environment()
  plan = _run_plan(config)
  log(f'{title}\nbudgets {list(config.epochs)} epochs, methods '
      f'{[METHOD_LABELS[m] for m in config.methods]}, {len(plan)} runs in '
      f'{len(_group_plan(config)) * len(config.methods)} vectorised groups (a method and '
      f'budget: {config.seeds} seeds x {len(config.lrs)} lrs; the methods side by side), '
      'augmentation crop '
      f'pad {config.crop_pad} flip {config.flip}; data loaded in {load_time:.1f} s; '
      f'jax {env["jax"]} on {env["platform"]} ({env["device"]})\n{trials}')
  if first.source:
    log(first.source.describe())
  for dataset in datasets.values():
    warning = lam_warning(config, dataset)
    if warning:
      log(warning)
  if _tqdm_missing(config):
    log('note: tqdm is not installed; progress is one line per epoch instead of a bar.')

  optimizers = {method: training.make_optimizer(config, method) for method in config.methods}
  steps = {method: training.make_group_train_step(model, method, config.refresh_every)
           for method in config.methods}
  eval_step = training.make_group_eval_step(model)
  compile_time = _compile(config, first, model, optimizers, steps, eval_step)
  log(f'compiled in {compile_time:.1f} s')

  config_dict = dataclasses.asdict(config)
  results: Dict[str, Any] = dict(
      partial=True, runs_planned=len(plan), config=config_dict, data_source=source,
      environment=env, title=title, trials=trials,
      timing=dict(load_s=load_time, compile_s=compile_time), **sizes, runs=[])
  runs: List[training.Run] = []
  start_runs = time.perf_counter()
  try:
    for scale, budget in _group_plan(config):
      group = training.train_groups(config, datasets[scale], config.methods,
                                    config.seed_list, budget, config.lrs, model, optimizers,
                                    steps, eval_step, log)
      runs.extend(group)
      results['runs'].extend(dict(config=config_dict, **dataclasses.asdict(run),
                                  jax_version=env['jax'], device=env['device'],
                                  platform=env['platform']) for run in group)
      results['runs_done'] = len(runs)
      results['timing']['runs_s'] = time.perf_counter() - start_runs
      output.write_json(results)
    log(f'{len(runs)} runs trained and evaluated in {results["timing"]["runs_s"]:.1f} s')
    epoch_timing = _time_epochs(config, first, model, optimizers, log)
  except KeyboardInterrupt:
    if not runs:
      raise
    raise Interrupted(f'{len(runs)} of {len(plan)} runs finished; they are in '
                      f'{output.path(RESULTS_FILE)} (marked partial, no summary).') from None

  summary = report.summarize(runs, config)
  seconds_table = ''
  if epoch_timing is not None:
    results['timing']['epochs'] = epoch_timing
    summary['seconds'] = report.seconds_speedups(summary, config,
                                                 timing_lib.per_epoch(epoch_timing))
    seconds_table = report.format_seconds_table(summary['seconds'],
                                                _timing_note(config, epoch_timing))
  table = report.format_table(summary, config)
  lr_grid = report.format_lr_grid(summary, config)
  grid = report.format_scale_grid(summary, config)
  heading = ('Tuned comparison: each method at its lr chosen on validation accuracy, '
             'test accuracy of that choice' if config.tuned else
             f'Shared-lr comparison at lr {report.lr_key(config.lrs[0])} (nothing tuned)')
  log(f'\n{title}\n{trials}\n\n{heading}:\n{table}')
  for block in (seconds_table, lr_grid, grid):
    if block:
      log('\n' + block)
  log('')
  for line in summary['lines']:
    log(line)
  if config.paired:
    log(report.VERDICT_RULE)

  results.update(partial=False, summary=summary, table=table, lr_grid=lr_grid,
                 scale_grid=grid, seconds_table=seconds_table)
  results['timing']['total_s'] = time.perf_counter() - start_all
  json_path = output.write_json(results)  # before the plot, so a plot failure loses nothing
  written = [json_path]
  if config.plot:
    plot_path = output.path(PLOT_FILE)
    try:
      report.plot(summary, runs, config, title, plot_path)
    except OSError as error:
      raise RunError(f'cannot write into {config.out}: {error}.') from None
    written.append(plot_path)
  log(f'wrote {" and ".join(written)}; total {results["timing"]["total_s"]:.1f} s')
  return results
