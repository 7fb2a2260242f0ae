"""Optimizers, the jitted train and eval steps, and one training run.

Part of the experiment application (``tract-optax-train``), not of the library.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tract_optax
from tract_experiment import data as data_lib
from tract_experiment import models as models_lib
from tract_experiment.config import BASELINE, METHOD_LABELS, Config
from tract_optax import linen as tract_linen


def _kernel_mask(params):
  """True for kernels (weight decay), False for biases and norm parameters."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def base_optimizer(config: Config) -> optax.GradientTransformation:
  """The optimizer without TrAct; its learning rate is set every step.

  The last element is ``inject_hyperparams(scale_by_learning_rate)``, so the
  learning rate is a value in the optimizer state (see
  :func:`set_learning_rate`) and one compiled step serves every budget and
  every peak learning rate of the grid.
  SGD adds the weight decay to the gradient before momentum (as
  ``torch.optim.SGD`` does); Adam decouples it (AdamW).
  """
  learning_rate = optax.inject_hyperparams(optax.scale_by_learning_rate)(
      learning_rate=config.lrs[0])
  decay = optax.add_decayed_weights(config.weight_decay, mask=_kernel_mask)
  if config.optimizer == 'sgd':
    return optax.chain(decay, optax.trace(config.momentum, nesterov=config.nesterov),
                       learning_rate)
  return optax.chain(optax.scale_by_adam(), decay, learning_rate)


def tract_options(config: Config, method: str) -> Dict[str, Any]:
  """Keyword arguments of ``tract_optax.tract`` for a TrAct method.

  ``'tract_rel'`` adds ``relative_lam=True``; ``refresh_every > 1`` names the
  model's first layer and the refresh period (the amortised statistic).

  Example:
    >>> from tract_experiment import cli, training
    >>> config = cli.parse_config(['--dataset', 'digits', '--model', 'cnn',
    ...                            '--refresh-every', '4'])
    >>> training.tract_options(config, 'tract_rel')
    {'relative_lam': True, 'layers': [('stem',)], 'refresh_every': 4}
  """
  options: Dict[str, Any] = {}
  if method == 'tract_rel':
    options['relative_lam'] = True
  if config.refresh_every > 1:
    options.update(layers=[models_lib.FIRST_LAYER[config.model]],
                   refresh_every=config.refresh_every)
  return options


def make_optimizer(config: Config, method: str) -> optax.GradientTransformation:
  """``optax.chain(tract(lam, per_lane_stats=True, ...), base)`` for TrAct, ``base`` for plain.

  See :func:`tract_options` for what the TrAct methods pass to ``tract``;
  ``per_lane_stats`` lets :func:`make_group_train_step` run independent
  models in the lanes of a ``jax.vmap`` (it changes nothing outside one).
  """
  base = base_optimizer(config)
  if method == BASELINE:
    return base
  # per_lane_stats: under the vmap of make_group_train_step each lane is its own
  # model with its own batch, so each lane is preconditioned with its own statistic.
  return optax.chain(tract_optax.tract(config.lam, per_lane_stats=True,
                                       **tract_options(config, method)), base)


def set_learning_rate(opt_state, learning_rate: jax.Array):
  """Returns ``opt_state`` with the injected learning rate replaced."""
  return optax.tree_utils.tree_set(opt_state, learning_rate=learning_rate)


def cosine_learning_rate(step: jax.Array, peak: float, total_steps: jax.Array,
                         warmup_steps: jax.Array) -> jax.Array:
  """Linear warm-up to ``peak``, then cosine decay to 0 at ``total_steps``.

  Example:
    >>> from tract_experiment import training
    >>> [round(float(training.cosine_learning_rate(s, 1.0, 10, 2)), 3)
    ...  for s in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
  """
  step = jnp.asarray(step, jnp.float32)
  total = jnp.asarray(total_steps, jnp.float32)
  warmup = jnp.asarray(warmup_steps, jnp.float32)
  warm = peak * step / jnp.maximum(warmup, 1.0)
  progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
  cosine = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warmup, warm, cosine)


# ---------------------------------------------------------------- the steps


class TrainState(tract_linen.TractTrainState):
  """Flax's TrainState with ``batch_stats``, forwarding ``tract_stats``."""

  batch_stats: Any


@functools.lru_cache(maxsize=None)
def _jitted_init(model: nn.Module) -> Callable:
  # Un-jitted, init dispatches op by op: many seconds for the small CNN on a CPU.
  return jax.jit(functools.partial(model.init, train=False))


def create_state(model: nn.Module, tx: optax.GradientTransformation,
                 image_shape: Sequence[int], seed: int) -> TrainState:
  """Initialises the model with ``jax.random.key(seed)`` and the optimizer."""
  variables = _jitted_init(model)(jax.random.key(seed),
                                  jnp.zeros((1, *image_shape), jnp.float32))
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables.get('batch_stats', {}))


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _step_function(model: nn.Module, use_tract: bool) -> Callable:
  """The un-jitted train step of one run (see :func:`make_train_step`)."""

  def step(state, images, labels, total_steps, warmup_steps, peak_lr, capture=True):
    def loss_fn(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      if use_tract and capture:
        (logits, updates), tract_stats = tract_linen.apply_with_stats(
            model, variables, images, train=True, mutable=['batch_stats'])
      else:
        logits, updates = model.apply(variables, images, train=True,
                                      mutable=['batch_stats'])
        tract_stats = {} if use_tract else None
      return _cross_entropy(logits, labels), (logits, updates, tract_stats)

    (loss, (logits, updates, tract_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    learning_rate = cosine_learning_rate(state.step, peak_lr, total_steps, warmup_steps)
    state = state.replace(opt_state=set_learning_rate(state.opt_state, learning_rate))
    state = state.apply_gradients(grads=grads, tract_stats=tract_stats,
                                  batch_stats=updates.get('batch_stats', state.batch_stats))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return state, {'loss': loss, 'accuracy': accuracy}

  return step


def _with_refresh(jitted: Callable, use_tract: bool, refresh_every: int) -> Callable:
  """``run_step(..., step_index=0)``: picks the capturing or the reusing executable."""

  def run_step(state, images, labels, total_steps, warmup_steps, peak_lr, step_index=0):
    capture = not use_tract or refresh_every == 1 or step_index % refresh_every == 0
    return jitted(state, images, labels, total_steps, warmup_steps, peak_lr,
                  capture=capture)

  return run_step


def make_train_step(model: nn.Module, method: str, refresh_every: int = 1) -> Callable:
  """A ``step(state, images, labels, total_steps, warmup_steps, peak_lr, step_index=0)``.

  ``total_steps``, ``warmup_steps`` and ``peak_lr`` (of the cosine schedule)
  are arrays, so one compiled step serves every budget and learning rate.

  The plain and the TrAct step run the same code except that the TrAct step
  captures the first layer's input statistic with
  ``tract_optax.linen.apply_with_stats`` and hands it to the optimizer.

  With ``refresh_every > 1`` (TrAct only) two steps are compiled: one that
  captures the statistic, used when ``step_index % refresh_every == 0``, and
  one that runs the plain forward pass and lets TrAct reuse its kept
  statistic; ``step_index`` is the step count of the run, known on the host.

  Returns:
    ``step -> (new_state, {'loss', 'accuracy'})``; the state is donated.
  """
  use_tract = method != BASELINE
  jitted = jax.jit(_step_function(model, use_tract), donate_argnums=(0,),
                   static_argnames=('capture',))
  return _with_refresh(jitted, use_tract, refresh_every)


def make_group_train_step(model: nn.Module, method: str, refresh_every: int = 1) -> Callable:
  """The step of :func:`make_train_step` for a group of runs at once (``jax.vmap``).

  A group is every (seed, peak lr) pair of one method and budget: its state
  is a :class:`TrainState` whose arrays have two leading axes ``(seeds,
  lrs)`` (:func:`create_group_state`), and each run computes exactly what
  its own :func:`make_train_step` would (its own parameters, BatchNorm
  statistics, optimizer state and TrAct statistic). The images
  ``(seeds, batch, ...)`` and labels ``(seeds, batch)`` are one batch per
  seed, shared by that seed's lrs; ``peak_lrs`` is ``(lrs,)``;
  ``total_steps`` and ``warmup_steps`` are scalars shared by the group.
  One compiled program runs the whole group, so small models use the cores
  far better than one run at a time.

  Returns:
    ``step(states, images, labels, total_steps, warmup_steps, peak_lrs,
    step_index=0) -> (new_states, {'loss', 'accuracy'})``, the metrics of
    shape ``(seeds, lrs)``; the states are donated.
  """
  use_tract = method != BASELINE
  one_run = _step_function(model, use_tract)

  def group_step(states, images, labels, total_steps, warmup_steps, peak_lrs, capture=True):
    run = functools.partial(one_run, capture=capture)
    over_lrs = jax.vmap(run, in_axes=(0, None, None, None, None, 0))
    over_seeds = jax.vmap(over_lrs, in_axes=(0, 0, 0, None, None, None))
    return over_seeds(states, images, labels, total_steps, warmup_steps, peak_lrs)

  jitted = jax.jit(group_step, donate_argnums=(0,), static_argnames=('capture',))
  return _with_refresh(jitted, use_tract, refresh_every)


def create_group_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: Sequence[int], seeds: Sequence[int],
                       lanes_per_seed: int) -> TrainState:
  """States of a group: :func:`create_state` per seed, repeated for each lr.

  Returns:
    A :class:`TrainState` whose arrays have leading axes ``(len(seeds),
    lanes_per_seed)``; the runs of a seed start from the same parameters.
  """
  states = [create_state(model, tx, image_shape, seed) for seed in seeds]

  def stack(*leaves):
    return jnp.repeat(jnp.stack(leaves)[:, None], lanes_per_seed, axis=1)

  return jax.tree.map(stack, *states)


def _eval_function(model: nn.Module) -> Callable:
  def step(params, batch_stats, images, labels, mask):
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return jnp.sum(correct), jnp.sum(jnp.where(mask, losses, 0.0))

  return step


def make_eval_step(model: nn.Module) -> Callable:
  """A jitted ``step(params, batch_stats, images, labels, mask) -> (correct, loss sum)``."""
  return jax.jit(_eval_function(model))


def make_group_eval_step(model: nn.Module) -> Callable:
  """:func:`make_eval_step` for a group's states (leading axes ``(seeds, lrs)``).

  The batch is shared by every run; ``correct`` and ``loss sum`` have shape
  ``(seeds, lrs)``.
  """
  over_lrs = jax.vmap(_eval_function(model), in_axes=(0, 0, None, None, None))
  return jax.jit(jax.vmap(over_lrs, in_axes=(0, 0, None, None, None)))


def _padded_batches(images: np.ndarray, labels: np.ndarray, batch_size: int):
  """Every example once, in order; the last batch padded, with its validity mask."""
  for start in range(0, len(labels), batch_size):
    batch_images = images[start:start + batch_size]
    batch_labels = labels[start:start + batch_size]
    valid = len(batch_labels)
    mask = np.arange(batch_size) < valid
    if valid < batch_size:
      pad = batch_size - valid
      batch_images = np.concatenate([batch_images, np.zeros((pad,) + images.shape[1:],
                                                            images.dtype)])
      batch_labels = np.concatenate([batch_labels, np.zeros(pad, labels.dtype)])
    yield batch_images, batch_labels, mask


def _dispatch_eval(eval_step: Callable, state: TrainState, images: np.ndarray,
                   labels: np.ndarray, batch_size: int) -> List[Any]:
  """Starts the evaluation of every batch; the results stay on the device until collected."""
  return [eval_step(state.params, state.batch_stats, batch_images, batch_labels, mask)
          for batch_images, batch_labels, mask in _padded_batches(images, labels, batch_size)]


def _collect_eval(totals: List[Any], examples: int) -> Tuple[np.ndarray, np.ndarray]:
  """Accuracy and mean loss from :func:`_dispatch_eval`'s per-batch sums."""
  totals = jax.device_get(totals)
  correct = np.sum([np.asarray(count) for count, _ in totals], axis=0)
  loss_sum = np.sum([np.asarray(loss) for _, loss in totals], axis=0)
  return correct / examples, loss_sum / examples


def _evaluate_sums(eval_step: Callable, state: TrainState, images: np.ndarray,
                   labels: np.ndarray, batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
  return _collect_eval(_dispatch_eval(eval_step, state, images, labels, batch_size),
                       len(labels))


def evaluate(eval_step: Callable, state: TrainState, images: np.ndarray,
             labels: np.ndarray, batch_size: int) -> Tuple[float, float]:
  """Accuracy and mean loss over all examples (last batch padded and masked)."""
  accuracy, loss = _evaluate_sums(eval_step, state, images, labels, batch_size)
  return float(accuracy), float(loss)


def evaluate_group(eval_step: Callable, states: TrainState, images: np.ndarray,
                   labels: np.ndarray, batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """:func:`evaluate` for a group (:func:`make_group_eval_step`): arrays ``(seeds, lrs)``."""
  return _evaluate_sums(eval_step, states, images, labels, batch_size)


# ---------------------------------------------------------------- the runs


@dataclasses.dataclass
class Run:
  """Result of one training run (one input scale, budget, seed, lr and method).

  Validation and test accuracy are measured once, after the last epoch: the
  validation accuracy chooses the learning rate, the test accuracy is reported.
  A run trained with ``group_runs - 1`` others (:func:`train_groups`)
  gets the group's training, evaluation and wall times divided by
  ``group_runs``: its share of the programs that trained them side by side.
  """

  method: str
  seed: int
  budget: int
  lr: float
  val_accuracy: float
  test_accuracy: float
  val_loss: float
  test_loss: float
  train_loss_per_epoch: List[float]
  train_time_s: float
  eval_time_s: float
  wall_time_s: float
  steps: int
  input_scale: str = 'standardized'
  group_runs: int = 1


class _Progress:
  """A tqdm bar per run when stderr is a terminal; otherwise one log line per epoch."""

  def __init__(self, enabled: bool, total: int, description: str,
               log: Callable[[str], None]):
    self.bar = None
    self.description = description
    self.log = log if enabled else None
    if enabled and sys.stderr.isatty():
      try:
        from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      except ImportError:
        return
      self.bar = tqdm(total=total, desc=description, unit='step', leave=False,
                      dynamic_ncols=True, file=sys.stderr)

  def update(self, count: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(count)

  def epoch_done(self, **values) -> None:
    if self.bar is not None:
      self.bar.set_postfix(values)
    elif self.log is not None:
      self.log(f'    {self.description}: ' + ', '.join(f'{k} {v}' for k, v in values.items()))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _schedule(config: Config, dataset: data_lib.Dataset,
              budget: int) -> Tuple[int, jax.Array, jax.Array]:
  """A ``budget``-epoch run's step count, and its cosine schedule's total and warm-up steps
  as arrays (so one compiled step serves every budget)."""
  steps_per_epoch = len(dataset.train_labels) // config.batch_size
  total_steps = budget * steps_per_epoch
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  return total_steps, jnp.asarray(total_steps), jnp.asarray(warmup_steps)


def _input_note(dataset: data_lib.Dataset) -> str:
  """What a run's progress name says about a non-standardised input scale."""
  return '' if dataset.input_scale == 'standardized' else f' ({dataset.input_scale} input)'


def train_run(config: Config, dataset: data_lib.Dataset, method: str, seed: int,
              budget: int, lr: float, model: nn.Module, tx: optax.GradientTransformation,
              train_step: Callable, eval_step: Callable,
              log: Callable[[str], None]) -> Run:
  """Trains one model for ``budget`` epochs at peak learning rate ``lr``.

  The data order and augmentation depend on ``(seed, epoch)`` only, never on
  the method or the lr, so plain and TrAct runs of a seed see the same
  batches. ``tx`` is the method's optimizer, built once: the jitted step
  treats it as static, so a new optimizer object per run would recompile the
  step. The validation and test splits are evaluated after the last epoch.
  """
  state = create_state(model, tx, dataset.image_shape, seed)
  name = f'{METHOD_LABELS[method]:13s} seed {seed} budget {budget} ep lr {lr:g}'
  name += _input_note(dataset)
  total_steps, total_array, warmup_array = _schedule(config, dataset, budget)
  lr_array = jnp.asarray(lr, jnp.float32)
  progress = _Progress(config.progress, total_steps, name, log)
  train_losses = []
  train_time = 0.0
  start_run = time.perf_counter()
  step_index = 0
  for epoch in range(budget):
    start = time.perf_counter()
    augment_rng = np.random.default_rng([seed, epoch, 1])
    losses = []
    for images, labels in data_lib.batches(dataset.train_images, dataset.train_labels,
                                           config.batch_size, seed=(seed, epoch, 0),
                                           drop_remainder=True):
      if config.crop_pad or config.flip:
        images = data_lib.random_crop_flip(images, augment_rng, pad=config.crop_pad,
                                           flip=config.flip)
      state, metrics = train_step(state, images, labels, total_array, warmup_array, lr_array,
                                  step_index=step_index)
      step_index += 1
      losses.append(metrics['loss'])
      progress.update()
    train_loss = float(np.mean(jax.device_get(losses)))
    train_time += time.perf_counter() - start
    train_losses.append(train_loss)
    elapsed = time.perf_counter() - start_run
    progress.epoch_done(epoch=epoch + 1, train_loss=f'{train_loss:.3f}',
                        seconds=f'{elapsed:.1f}')
    if not math.isfinite(train_loss):
      log(f'  {name}: the training loss is {train_loss} at epoch {epoch + 1}; this lr is '
          'too large for this method (the choice on validation passes over it).')
  progress.close()
  start = time.perf_counter()
  val_accuracy, val_loss = evaluate(eval_step, state, dataset.val_images, dataset.val_labels,
                                    config.eval_batch_size)
  test_accuracy, test_loss = evaluate(eval_step, state, dataset.test_images,
                                      dataset.test_labels, config.eval_batch_size)
  eval_time = time.perf_counter() - start
  log(f'  {name}: val accuracy {val_accuracy:.4f}, test accuracy {test_accuracy:.4f}, '
      f'train {train_time:.1f} s')
  return Run(method=method, seed=seed, budget=budget, lr=lr, val_accuracy=val_accuracy,
             test_accuracy=test_accuracy, val_loss=val_loss, test_loss=test_loss,
             train_loss_per_epoch=train_losses, train_time_s=train_time,
             eval_time_s=eval_time, wall_time_s=time.perf_counter() - start_run,
             steps=total_steps, input_scale=dataset.input_scale)


def group_batches(dataset: data_lib.Dataset, config: Config, seeds: Sequence[int],
                   epoch: int):
  """Per step, the stacked batches ``(seeds, batch, ...)`` of every seed (as in train_run)."""
  iterators = [data_lib.batches(dataset.train_images, dataset.train_labels, config.batch_size,
                                seed=(seed, epoch, 0), drop_remainder=True)
               for seed in seeds]
  augment_rngs = [np.random.default_rng([seed, epoch, 1]) for seed in seeds]
  for per_seed in zip(*iterators, strict=True):
    images = []
    for (seed_images, _), rng in zip(per_seed, augment_rngs, strict=True):
      if config.crop_pad or config.flip:
        seed_images = data_lib.random_crop_flip(seed_images, rng, pad=config.crop_pad,
                                                flip=config.flip)
      images.append(seed_images)
    yield np.stack(images), np.stack([labels for _, labels in per_seed])


def train_groups(config: Config, dataset: data_lib.Dataset, methods: Sequence[str],
                 seeds: Sequence[int], budget: int, lrs: Sequence[float], model: nn.Module,
                 optimizers: Dict[str, optax.GradientTransformation],
                 group_steps: Dict[str, Callable], group_eval_step: Callable,
                 log: Callable[[str], None]) -> List[Run]:
  """Trains every (seed, lr) run of each method at one budget, a vectorised program per method.

  Each run is the run :func:`train_run` would train (same initialisation,
  data order and augmentation per seed, same schedule and lr), computed
  with :func:`make_group_train_step` and :func:`make_group_eval_step`. The
  methods' programs advance side by side, step by step on the same batches,
  and are dispatched without waiting for each other, so the runtime may run
  them at the same time on different cores; each program only reads its own
  state, so its results do not depend on that.

  Returns:
    One :class:`Run` per (method, seed, lr): methods outer, then seeds, then
    lrs. The group's times are shared equally by its runs.
  """
  methods, seeds, lrs = tuple(methods), tuple(seeds), tuple(lrs)
  per_method = len(seeds) * len(lrs)
  count = per_method * len(methods)
  states = {method: create_group_state(model, optimizers[method], dataset.image_shape, seeds,
                                       len(lrs))
            for method in methods}
  name = (f'{" + ".join(METHOD_LABELS[m] for m in methods)}, budget {budget} ep: '
          f'{len(seeds)} seeds x {len(lrs)} lrs each')
  name += _input_note(dataset)
  total_steps, total_array, warmup_array = _schedule(config, dataset, budget)
  lr_array = jnp.asarray(lrs, jnp.float32)
  progress = _Progress(config.progress, total_steps, name, log)
  train_losses: Dict[str, List[np.ndarray]] = {method: [] for method in methods}
  train_time = 0.0
  start_run = time.perf_counter()
  step_index = 0
  for epoch in range(budget):
    start = time.perf_counter()
    losses: Dict[str, List[jax.Array]] = {method: [] for method in methods}
    for images, labels in group_batches(dataset, config, seeds, epoch):
      for method in methods:
        states[method], metrics = group_steps[method](
            states[method], images, labels, total_array, warmup_array, lr_array,
            step_index=step_index)
        losses[method].append(metrics['loss'])
      step_index += 1
      progress.update()
    epoch_losses = {method: np.mean(np.asarray(jax.device_get(values)), axis=0)
                    for method, values in losses.items()}
    train_time += time.perf_counter() - start
    text = {}
    for method in methods:
      train_losses[method].append(epoch_losses[method])
      finite = epoch_losses[method][np.isfinite(epoch_losses[method])]
      text[f'{method} loss'] = (f'{finite.min():.3f}..{finite.max():.3f}' if finite.size
                                else 'nan')
    progress.epoch_done(epoch=epoch + 1, **text,
                        seconds=f'{time.perf_counter() - start_run:.1f}')
  progress.close()
  start = time.perf_counter()
  splits = ((dataset.val_images, dataset.val_labels),
            (dataset.test_images, dataset.test_labels))
  pending = {method: [_dispatch_eval(group_eval_step, states[method], images, labels,
                                     config.eval_batch_size) for images, labels in splits]
             for method in methods}  # every method's evaluation dispatched, then collected
  evaluated = {method: tuple(_collect_eval(totals, len(labels))
                             for totals, (_, labels) in zip(pending[method], splits,
                                                            strict=True))
               for method in methods}
  eval_time = time.perf_counter() - start
  wall_time = time.perf_counter() - start_run
  runs = []
  for method in methods:
    (val_accuracy, val_loss), (test_accuracy, test_loss) = evaluated[method]
    for i, seed in enumerate(seeds):
      for j, lr in enumerate(lrs):
        seed_losses = [float(losses[i, j]) for losses in train_losses[method]]
        run_name = f'{METHOD_LABELS[method]:13s} seed {seed} budget {budget} ep lr {lr:g}'
        if not all(math.isfinite(loss) for loss in seed_losses):
          epoch = next(e for e, loss in enumerate(seed_losses) if not math.isfinite(loss))
          log(f'  {run_name}: the training loss is {seed_losses[epoch]} at epoch '
              f'{epoch + 1}; this lr is too large for this method (the choice on validation '
              'passes over it).')
        log(f'  {run_name}: val accuracy {val_accuracy[i, j]:.4f}, test accuracy '
            f'{test_accuracy[i, j]:.4f}')
        runs.append(Run(method=method, seed=seed, budget=budget, lr=lr,
                        val_accuracy=float(val_accuracy[i, j]),
                        test_accuracy=float(test_accuracy[i, j]),
                        val_loss=float(val_loss[i, j]), test_loss=float(test_loss[i, j]),
                        train_loss_per_epoch=seed_losses, train_time_s=train_time / count,
                        eval_time_s=eval_time / count, wall_time_s=wall_time / count,
                        steps=total_steps, input_scale=dataset.input_scale,
                        group_runs=count))
  log(f'  {name}: trained in {train_time:.1f} s ({train_time / budget:.1f} s per epoch for '
      f'the {count} runs), evaluated in {eval_time:.1f} s')
  return runs
