"""``tract-optax-train``: plain vs TrAct training, accuracy against epoch budget.

Every epoch budget is a separate run with its own cosine schedule. For each
seed, the plain and the TrAct run share the model initialisation, the data
order and the augmentation, so their accuracies are paired. The program prints
mean +- std test accuracy per budget and method, the paired difference, and the
epoch saving read off the curves, and writes ``results.json`` and
``accuracy_vs_budget.png`` to ``--out``.

Run ``python -m tract_optax.train --help`` for the flags; without flags it runs
a CPU-sized Fashion-MNIST comparison in a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import tract_optax
from tract_optax import data as data_lib
from tract_optax import linen as tract_linen
from tract_optax import models as models_lib

METHODS = ('plain', 'tract')
METHOD_LABELS = {'plain': 'plain', 'tract': 'TrAct'}

#: Peak learning rate when neither ``--lr`` nor the preset (for its optimizer) sets it.
DEFAULT_LR = {'sgd': 0.08, 'adam': 1e-3}

#: Settings of each preset; flags given on the command line win.
PRESETS: Dict[str, Dict[str, Any]] = {
    # Sized for a 2-core CPU (a few minutes), chosen by measurement: on 10k
    # examples without augmentation, lr 0.2 and lam 0.05 gave the clearest
    # paired gain at 2 epochs among lr 0.08/0.2/0.4 and lam 0.01-0.1.
    'default': dict(dataset='fashion_mnist', model='cnn', epochs=(1, 2), seeds=3,
                    train_examples=10000, test_examples=None, batch_size=128,
                    optimizer='sgd', lr=0.2, weight_decay=5e-4, warmup_epochs=0.0,
                    lam=0.05, augment='none'),
    # TRACT.md's GPU calibration: ResNet-18 on the full Fashion-MNIST.
    'paper': dict(dataset='fashion_mnist', model='resnet18', epochs=(1, 2, 4, 8),
                  seeds=4, train_examples=None, test_examples=None, batch_size=128,
                  optimizer='sgd', lr=0.08, weight_decay=5e-4, warmup_epochs=0.0,
                  lam=0.1, augment='auto'),
}

#: Augmentation used with ``--augment auto``: (crop padding, horizontal flip).
AUTO_AUGMENT = {'fashion_mnist': (2, True), 'cifar10': (4, True), 'digits': (0, False)}
AUGMENTATIONS = {'none': (0, False), 'crop': (None, False), 'flip': (0, True),
                 'crop_flip': (None, True)}


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a comparison (the resolved command line)."""

  dataset: str
  data_dir: Optional[str]
  model: str
  methods: Tuple[str, ...]
  lam: float
  optimizer: str
  lr: float
  momentum: float
  nesterov: bool
  weight_decay: float
  warmup_epochs: float
  batch_size: int
  epochs: Tuple[int, ...]
  seeds: int
  first_seed: int
  train_examples: Optional[int]
  test_examples: Optional[int]
  augment: str
  crop_pad: int
  flip: bool
  eval_batch_size: int
  out: str
  preset: str
  progress: bool
  refresh_every: int = 1


# ---------------------------------------------------------------- command line


def _budgets(text: str) -> Tuple[int, ...]:
  try:
    values = tuple(int(part) for part in text.split(',') if part.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'--epochs takes comma-separated whole epochs, e.g. 1,2,4; got {text!r}') from None
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f'--epochs needs budgets >= 1; got {text!r}')
  return tuple(sorted(set(values)))


def _count_or_all(text: str) -> Any:
  if text.lower() in ('all', 'full', '0'):
    return 'all'
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'expected a number of examples or "all"; got {text!r}') from None
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected a positive number of examples; got {value}')
  return value


def _positive_lam(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'--lam takes a number > 0; got {text!r}') from None
  try:
    tract_optax.transform.validate_lam(value, '--lam')
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None
  return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults, except ``None`` (meaning: taken from the preset)."""

  def _get_help_string(self, action):
    if action.default is None:
      return action.help
    return super()._get_help_string(action)


def _preset_text(name: str) -> str:
  def show(value):
    if value is None:
      return 'all'
    return ','.join(map(str, value)) if isinstance(value, tuple) else str(value)

  return ', '.join(f'{key}={show(value)}' for key, value in PRESETS[name].items())


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of ``tract-optax-train``."""
  parser = argparse.ArgumentParser(
      prog='tract-optax-train',
      description='Train plain vs TrAct on a small image dataset and compare test '
                  'accuracy against the epoch budget (each budget is a full run '
                  'with its own cosine schedule). Flags marked [preset] take the '
                  'value of --preset when left out.',
      epilog='presets: ' + '; '.join(f'{name}: {_preset_text(name)}' for name in PRESETS),
      formatter_class=_HelpFormatter)
  add = parser.add_argument
  add('--preset', choices=sorted(PRESETS), default='default',
      help='settings for the flags left out (listed below); default is CPU-sized, '
           'paper is the ResNet-18 GPU calibration of TRACT.md')
  add('--dataset', choices=sorted(data_lib.LOADERS), help='dataset [preset]')
  add('--data-dir',
      help=f'folder with the dataset files (then ${data_lib.DATA_ENV_VAR}, then '
           'system folders)')
  add('--model', choices=sorted(models_lib.MODELS), help='model [preset]')
  add('--method', choices=('plain', 'tract', 'both'), default='both',
      help='train without TrAct, with it, or both (paired by seed)')
  add('--lam', type=_positive_lam, help='TrAct ridge strength lambda > 0 [preset]')
  add('--optimizer', choices=('sgd', 'adam'),
      help='sgd: momentum with coupled weight decay; adam: AdamW [preset]')
  add('--lr', type=float,
      help='peak learning rate [preset; with another optimizer than the preset\'s: '
           f'{DEFAULT_LR}]')
  add('--momentum', type=float, default=0.9, help='SGD momentum')
  add('--nesterov', action=argparse.BooleanOptionalAction, default=False,
      help='Nesterov momentum for SGD')
  add('--weight-decay', type=float, help='weight decay of the kernels [preset]')
  add('--warmup-epochs', type=float,
      help='linear warm-up before the cosine decay, in epochs [preset]')
  add('--batch-size', type=int, help='training batch size [preset]')
  add('--epochs', type=_budgets,
      help='comma-separated epoch budgets, e.g. 1,2,4; each is a separate run [preset]')
  add('--seeds', type=int, help='seeds per budget and method [preset]')
  add('--first-seed', type=int, default=0, help='seeds are first_seed, first_seed+1, ...')
  add('--train-examples', type=_count_or_all,
      help='training examples (a fixed random subset) or "all" [preset]')
  add('--test-examples', type=_count_or_all, help='test examples or "all" [preset]')
  add('--augment', choices=('auto',) + tuple(AUGMENTATIONS),
      help='training augmentation; auto: crop+flip for fashion_mnist and cifar10, '
           'none for digits [preset]')
  add('--crop-pad', type=int,
      help='padding of random crops (default: 2 for fashion_mnist and digits, 4 for cifar10)')
  add('--eval-batch-size', type=int, default=500, help='evaluation batch size')
  add('--out', default='runs/tract_optax', help='output folder')
  add('--refresh-every', type=int, default=1,
      help='TrAct runs: refresh the first-layer statistic every k steps and reuse '
           'it in between (opt-in amortisation; 1 = every batch, as in the paper)')
  add('--progress', action=argparse.BooleanOptionalAction, default=True,
      help='tqdm progress bar per run (on a terminal; else one log line per epoch)')
  return parser


def _learning_rate(flag: Optional[float], optimizer: str, preset: Dict[str, Any]) -> float:
  if flag is not None:
    return flag
  if optimizer == preset['optimizer']:
    return preset['lr']
  return DEFAULT_LR[optimizer]


def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
  """Parses the command line and fills what it leaves out from the preset.

  Example:
    >>> config = tract_optax.train.parse_config(['--dataset', 'digits', '--epochs', '2,1'])
    >>> config.epochs, config.methods, config.model
    ((1, 2), ('plain', 'tract'), 'cnn')
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  preset = PRESETS[args.preset]

  def pick(name):
    value = getattr(args, name)
    if value is None:
      return preset[name]
    return None if value == 'all' else value

  optimizer = pick('optimizer')
  dataset = pick('dataset')
  augment = pick('augment')
  crop_pad, flip = AUTO_AUGMENT[dataset] if augment == 'auto' else AUGMENTATIONS[augment]
  if crop_pad is None:  # 'crop' or 'crop_flip' asked explicitly
    crop_pad = AUTO_AUGMENT[dataset][0] or 2
  if args.crop_pad is not None:
    if args.crop_pad < 0:
      parser.error(f'--crop-pad must be >= 0; got {args.crop_pad}')
    crop_pad = args.crop_pad if augment in ('auto', 'crop', 'crop_flip') else 0
  for name in ('batch_size', 'seeds', 'refresh_every'):
    value = args.refresh_every if name == 'refresh_every' else pick(name)
    if value < 1:
      parser.error(f'--{name.replace("_", "-")} must be >= 1; got {value}')
  return Config(
      dataset=dataset, data_dir=args.data_dir, model=pick('model'),
      methods=METHODS if args.method == 'both' else (args.method,),
      lam=pick('lam'), optimizer=optimizer,
      lr=_learning_rate(args.lr, optimizer, preset),
      momentum=args.momentum, nesterov=args.nesterov,
      weight_decay=pick('weight_decay'), warmup_epochs=pick('warmup_epochs'),
      batch_size=pick('batch_size'), epochs=tuple(pick('epochs')), seeds=pick('seeds'),
      first_seed=args.first_seed, train_examples=pick('train_examples'),
      test_examples=pick('test_examples'), augment=augment, crop_pad=crop_pad,
      flip=flip, eval_batch_size=args.eval_batch_size, out=args.out,
      preset=args.preset, progress=args.progress, refresh_every=args.refresh_every)


# ------------------------------------------------------------- optimisation


def _kernel_mask(params):
  """True for kernels (weight decay), False for biases and norm parameters."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def base_optimizer(config: Config) -> optax.GradientTransformation:
  """The optimizer without TrAct; its learning rate is set every step.

  The last element is ``inject_hyperparams(scale_by_learning_rate)``, so the
  learning rate is a value in the optimizer state (see
  :func:`set_learning_rate`) and one compiled step serves every budget.
  SGD adds the weight decay to the gradient before momentum (as
  ``torch.optim.SGD`` does); Adam decouples it (AdamW).
  """
  learning_rate = optax.inject_hyperparams(optax.scale_by_learning_rate)(
      learning_rate=config.lr)
  decay = optax.add_decayed_weights(config.weight_decay, mask=_kernel_mask)
  if config.optimizer == 'sgd':
    return optax.chain(decay, optax.trace(config.momentum, nesterov=config.nesterov),
                       learning_rate)
  return optax.chain(optax.scale_by_adam(), decay, learning_rate)


def make_optimizer(config: Config, method: str) -> optax.GradientTransformation:
  """``optax.chain(tract(lam), base)`` for TrAct, ``base`` for plain.

  With ``refresh_every > 1`` TrAct keeps the first layer's statistic in its
  state and refreshes it every ``refresh_every`` steps.
  """
  base = base_optimizer(config)
  if method == 'tract':
    if config.refresh_every > 1:
      layer = models_lib.FIRST_LAYER[config.model]
      return optax.chain(tract_optax.tract(config.lam, layers=[layer],
                                           refresh_every=config.refresh_every), base)
    return optax.chain(tract_optax.tract(config.lam), base)
  return base


def set_learning_rate(opt_state, learning_rate: jax.Array):
  """Returns ``opt_state`` with the injected learning rate replaced."""
  return optax.tree_utils.tree_set(opt_state, learning_rate=learning_rate)


def cosine_learning_rate(step: jax.Array, peak: float, total_steps: jax.Array,
                         warmup_steps: jax.Array) -> jax.Array:
  """Linear warm-up to ``peak``, then cosine decay to 0 at ``total_steps``.

  Example:
    >>> [round(float(tract_optax.train.cosine_learning_rate(s, 1.0, 10, 2)), 3)
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


#: Train state: Flax's TrainState with ``batch_stats``, forwarding ``tract_stats``.
TrainState = tract_linen.TractTrainState


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


def make_train_step(model: nn.Module, method: str, peak_lr: float,
                    refresh_every: int = 1) -> Callable:
  """A ``step(state, images, labels, total_steps, warmup_steps, step_index=0)``.

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
  use_tract = method == 'tract'

  def step(state, images, labels, total_steps, warmup_steps, capture=True):
    def loss_fn(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      if use_tract and not capture:
        logits, updates = model.apply(variables, images, train=True,
                                      mutable=['batch_stats'])
        tract_stats = {}
      elif use_tract:
        (logits, updates), tract_stats = tract_linen.apply_with_stats(
            model, variables, images, train=True, mutable=['batch_stats'])
      else:
        logits, updates = model.apply(variables, images, train=True,
                                      mutable=['batch_stats'])
        tract_stats = None
      return _cross_entropy(logits, labels), (logits, updates, tract_stats)

    (loss, (logits, updates, tract_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    learning_rate = cosine_learning_rate(state.step, peak_lr, total_steps, warmup_steps)
    state = state.replace(opt_state=set_learning_rate(state.opt_state, learning_rate))
    state = state.apply_gradients(grads=grads, tract_stats=tract_stats,
                                  batch_stats=updates.get('batch_stats', state.batch_stats))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return state, {'loss': loss, 'accuracy': accuracy}

  jitted = jax.jit(step, donate_argnums=(0,), static_argnames=('capture',))

  def run_step(state, images, labels, total_steps, warmup_steps, step_index=0):
    capture = not use_tract or refresh_every == 1 or step_index % refresh_every == 0
    return jitted(state, images, labels, total_steps, warmup_steps, capture=capture)

  return run_step


def make_eval_step(model: nn.Module) -> Callable:
  """A jitted ``step(params, batch_stats, images, labels, mask) -> (correct, loss sum)``."""

  def step(params, batch_stats, images, labels, mask):
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return jnp.sum(correct), jnp.sum(jnp.where(mask, losses, 0.0))

  return jax.jit(step)


def evaluate(eval_step: Callable, state: TrainState, images: np.ndarray,
             labels: np.ndarray, batch_size: int) -> Tuple[float, float]:
  """Accuracy and mean loss over all examples (last batch padded and masked)."""
  totals = []
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
    totals.append(eval_step(state.params, state.batch_stats, batch_images, batch_labels,
                            mask))
  correct, loss_sum = np.sum(jax.device_get(totals), axis=0)
  return float(correct) / len(labels), float(loss_sum) / len(labels)


# ---------------------------------------------------------------- the runs


@dataclasses.dataclass
class Run:
  """Result of one training run (one method, seed and budget)."""

  method: str
  seed: int
  budget: int
  test_accuracy_per_epoch: List[float]
  test_loss_per_epoch: List[float]
  train_loss_per_epoch: List[float]
  final_accuracy: float
  train_time_s: float
  eval_time_s: float
  wall_time_s: float
  steps: int


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


def train_run(config: Config, dataset: data_lib.Dataset, method: str, seed: int,
              budget: int, model: nn.Module, tx: optax.GradientTransformation,
              train_step: Callable, eval_step: Callable,
              log: Callable[[str], None]) -> Run:
  """Trains one model for ``budget`` epochs, evaluating after every epoch.

  The data order and augmentation depend on ``(seed, epoch)`` only, never on
  the method, so plain and TrAct runs of a seed see the same batches. ``tx``
  is the method's optimizer, built once: the jitted step treats it as static,
  so a new optimizer object per run would recompile the step.
  """
  state = create_state(model, tx, dataset.image_shape, seed)
  steps_per_epoch = len(dataset.train_labels) // config.batch_size
  total_steps = budget * steps_per_epoch
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  total_array, warmup_array = jnp.asarray(total_steps), jnp.asarray(warmup_steps)
  progress = _Progress(config.progress, total_steps,
                       f'{METHOD_LABELS[method]:5s} seed {seed} budget {budget} ep', log)
  accuracies, test_losses, train_losses = [], [], []
  train_time = eval_time = 0.0
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
      state, metrics = train_step(state, images, labels, total_array, warmup_array,
                                  step_index=step_index)
      step_index += 1
      losses.append(metrics['loss'])
      progress.update()
    train_loss = float(np.mean(jax.device_get(losses)))
    train_time += time.perf_counter() - start
    start = time.perf_counter()
    accuracy, test_loss = evaluate(eval_step, state, dataset.test_images,
                                   dataset.test_labels, config.eval_batch_size)
    eval_time += time.perf_counter() - start
    accuracies.append(accuracy)
    test_losses.append(test_loss)
    train_losses.append(train_loss)
    elapsed = time.perf_counter() - start_run
    progress.epoch_done(epoch=epoch + 1, train_loss=f'{train_loss:.3f}',
                        test_acc=f'{accuracy:.4f}', seconds=f'{elapsed:.1f}')
    if not math.isfinite(train_loss):
      log(f'  {method} seed {seed} budget {budget}: the training loss is {train_loss} '
          f'at epoch {epoch + 1}; lower --lr.')
  progress.close()
  log(f'  {METHOD_LABELS[method]:5s} seed {seed} budget {budget} ep: test accuracy '
      f'{accuracies[-1]:.4f} (per epoch {", ".join(f"{a:.4f}" for a in accuracies)}), '
      f'train {train_time:.1f} s')
  return Run(method=method, seed=seed, budget=budget, test_accuracy_per_epoch=accuracies,
             test_loss_per_epoch=test_losses, train_loss_per_epoch=train_losses,
             final_accuracy=accuracies[-1], train_time_s=train_time, eval_time_s=eval_time,
             wall_time_s=time.perf_counter() - start_run, steps=total_steps)


# ------------------------------------------------------------------ summary


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: Sequence[Run], config: Config) -> Dict[str, Any]:
  """Mean +- std per budget and method, paired differences, the epoch saving.

  A paired difference counts as beyond seed noise when its mean exceeds two
  standard errors of the per-seed differences (a rough rule, not a test; with
  two seeds it says little).
  """
  table = {}
  for budget in config.epochs:
    row = {}
    for method in config.methods:
      chosen = [r for r in runs if r.method == method and r.budget == budget]
      if not chosen:
        continue
      mean, std = _mean_std([r.final_accuracy for r in chosen])
      row[method] = dict(mean=mean, std=std, seeds=len(chosen),
                         train_time_s=float(np.mean([r.train_time_s for r in chosen])),
                         wall_time_s=float(np.mean([r.wall_time_s for r in chosen])))
    if len(row) == 2:
      by_seed = {r.seed: r.final_accuracy for r in runs
                 if r.method == 'plain' and r.budget == budget}
      diffs = [r.final_accuracy - by_seed[r.seed] for r in runs
               if r.method == 'tract' and r.budget == budget and r.seed in by_seed]
      mean, std = _mean_std(diffs)
      error = std / math.sqrt(len(diffs)) if len(diffs) > 1 else float('inf')
      row['difference'] = dict(mean=mean, std=std, seeds=len(diffs),
                               tract_better=int(sum(d > 0 for d in diffs)),
                               beyond_noise=bool(abs(mean) > 2 * error))
    table[budget] = row
  return dict(table=table, speedup=_speedup(table, config), gain=_gain_text(table))


def _gain_text(table: Dict[int, Dict[str, Any]]) -> str:
  """One line: the paired TrAct - plain difference per budget and its verdict."""
  parts = []
  for budget, row in table.items():
    if 'difference' not in row:
      return ''
    diff = row['difference']
    if diff['seeds'] < 2:
      verdict = 'one seed, noise unknown'
    else:
      verdict = 'beyond seed noise' if diff['beyond_noise'] else 'within seed noise'
    parts.append(f'{budget} ep {diff["mean"]:+.4f} ({diff["tract_better"]}/{diff["seeds"]} '
                 f'seeds up, {verdict})')
  return 'TrAct - plain test accuracy: ' + '; '.join(parts) + '.'


def _speedup(table: Dict[int, Dict[str, Any]], config: Config) -> Dict[str, Any]:
  """Smallest TrAct budget whose mean accuracy reaches plain's at the largest budget."""
  if set(config.methods) != set(METHODS):
    return dict(text='Only one method was run; no comparison.', factor=None)
  largest = max(config.epochs)
  target = table[largest]['plain']['mean']
  reached = [b for b in config.epochs if table[b]['tract']['mean'] >= target]
  if not reached:
    best = max(config.epochs, key=lambda b: table[b]['tract']['mean'])
    text = (f'TrAct does not reach plain@{largest} ep ({target:.4f}) at any budget '
            f'(best TrAct: {table[best]["tract"]["mean"]:.4f} at {best} ep).')
    return dict(text=text, factor=None, target=target, budget=None)
  budget = min(reached)
  accuracy = table[budget]['tract']['mean']
  if budget == largest:
    text = (f'TrAct reaches plain@{largest} ep ({target:.4f}) only at the same budget '
            f'({accuracy:.4f}): no epoch saving among the budgets run.')
  else:
    text = (f'TrAct reaches plain@{largest} ep ({target:.4f}) at {budget} ep '
            f'({accuracy:.4f}): {largest / budget:.1f}x fewer epochs.')
  plain_spread = table[largest]['plain']['std']
  tract_spread = table[budget]['tract']['std']
  if table[budget]['tract']['seeds'] < 2:
    text += ' (One seed: there is no spread to judge the margin by.)'
  elif accuracy - target <= max(plain_spread, tract_spread):
    text += (f' The margin ({accuracy - target:+.4f}) is within the seed spread '
             f'(std {plain_spread:.4f} / {tract_spread:.4f}), so treat this as tentative.')
  return dict(text=text, factor=largest / budget, target=target, budget=budget)


def _mean_std_text(mean: float, std: float, seeds: int, spec: str) -> str:
  if seeds < 2:
    return format(mean, spec)
  return f'{format(mean, spec)} +- {std:.4f}'


def format_table(summary: Dict[str, Any], config: Config) -> str:
  """The budget x method table as printed."""
  methods = list(config.methods)
  header = ['budget'] + [f'{METHOD_LABELS[m]} acc (mean +- std)' for m in methods]
  paired = len(methods) == 2
  if paired:
    header += ['TrAct - plain (paired)', 'verdict']
  header += [f'{METHOD_LABELS[m]} train s' for m in methods]
  rows = [header]
  for budget, row in summary['table'].items():
    line = [f'{budget} ep']
    line += [_mean_std_text(row[m]['mean'], row[m]['std'], row[m]['seeds'], '.4f')
             for m in methods]
    if paired:
      diff = row['difference']
      line.append(_mean_std_text(diff['mean'], diff['std'], diff['seeds'], '+.4f') +
                  f' ({diff["tract_better"]}/{diff["seeds"]} seeds up)')
      if diff['seeds'] < 2:
        line.append('noise unknown (1 seed)')
      else:
        line.append('beyond seed noise' if diff['beyond_noise'] else 'within seed noise')
    line += [f'{row[m]["train_time_s"]:.1f}' for m in methods]
    rows.append(line)
  widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
  lines = [' | '.join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, '-+-'.join('-' * w for w in widths))
  return '\n'.join(lines)


def _title(config: Config, dataset: data_lib.Dataset) -> str:
  optimizer = (f'SGD m={config.momentum}' if config.optimizer == 'sgd' else 'AdamW')
  return (f'{config.dataset}, {config.model}, {len(dataset.train_labels)} train / '
          f'{len(dataset.test_labels)} test, {optimizer} lr {config.lr:g} cosine, '
          f'batch {config.batch_size}, lam {config.lam:g}, {config.seeds} seed(s)'
          + (f', TrAct statistic refreshed every {config.refresh_every} steps'
             if config.refresh_every > 1 else ''))


def plot(summary: Dict[str, Any], runs: Sequence[Run], config: Config, title: str,
         path: str) -> None:
  """Test accuracy against the epoch budget: mean line, +-std band, seeds as dots."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  figure, axes = plt.subplots(figsize=(6.4, 4.4))
  budgets = np.asarray(config.epochs)
  colors = {'plain': 'tab:gray', 'tract': 'tab:blue'}
  for method in config.methods:
    mean = np.asarray([summary['table'][b][method]['mean'] for b in config.epochs])
    std = np.asarray([summary['table'][b][method]['std'] for b in config.epochs])
    label = METHOD_LABELS[method] + (f' (lam={config.lam:g})' if method == 'tract' else '')
    axes.plot(budgets, mean, marker='o', color=colors[method], label=label)
    axes.fill_between(budgets, mean - std, mean + std, color=colors[method], alpha=0.2,
                      linewidth=0)
    seeds = [(r.budget, r.final_accuracy) for r in runs if r.method == method]
    axes.scatter(*zip(*seeds), s=10, color=colors[method], alpha=0.5)
  if len(budgets) > 1 and budgets.max() / budgets.min() >= 4:
    axes.set_xscale('log', base=2)
  axes.set_xticks(budgets, [str(b) for b in budgets])
  axes.set_xlabel('epoch budget (each a full run with its own cosine schedule)')
  axes.set_ylabel('test accuracy')
  axes.set_title('Test accuracy vs epoch budget: mean \u00b1 std over seeds\n' + title,
                 fontsize=8)
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def environment() -> Dict[str, Any]:
  """Versions and the device the runs used."""
  device = jax.devices()[0]
  return dict(jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
              optax=optax.__version__, numpy=np.__version__,
              tract_optax=tract_optax.__version__, python=platform.python_version(),
              platform=device.platform, device=str(getattr(device, 'device_kind', device)),
              device_count=jax.device_count(), cpu_count=os.cpu_count(),
              machine=platform.machine())


# ------------------------------------------------------------------- main


def _compile(config: Config, dataset: data_lib.Dataset, model: nn.Module,
             optimizers: Dict[str, optax.GradientTransformation],
             steps: Dict[str, Callable], eval_step: Callable) -> float:
  """Compiles every step once on throwaway states, so run times exclude it."""
  start = time.perf_counter()
  batch = dataset.train_images[:config.batch_size], dataset.train_labels[:config.batch_size]
  for method, step in steps.items():
    state = create_state(model, optimizers[method], dataset.image_shape, 0)
    state, _ = step(state, *batch, jnp.asarray(1), jnp.asarray(0))
    jax.block_until_ready(state)
  evaluate(eval_step, state, dataset.test_images[:config.eval_batch_size],
           dataset.test_labels[:config.eval_batch_size], config.eval_batch_size)
  return time.perf_counter() - start


def _log(message: str) -> None:
  print(message, flush=True)


def run_comparison(config: Config, log: Callable[[str], None] = _log) -> Dict[str, Any]:
  """Runs every (budget, seed, method), prints the summary, writes the outputs.

  Args:
    config: the resolved settings (:func:`parse_config`).
    log: where progress lines and the summary go.

  Returns:
    The dict written to ``results.json``.
  """
  start_all = time.perf_counter()
  os.makedirs(config.out, exist_ok=True)

  start = time.perf_counter()
  try:
    dataset = data_lib.load(config.dataset, config.data_dir)
  except data_lib.DatasetError as error:
    raise SystemExit(f'tract-optax-train: {error}') from None
  dataset = dataset.subset(config.train_examples, config.test_examples, seed=0)
  if len(dataset.train_labels) < config.batch_size:
    raise SystemExit(
        f'tract-optax-train: {len(dataset.train_labels)} training examples are fewer '
        f'than one batch of {config.batch_size}; lower --batch-size.')
  load_time = time.perf_counter() - start
  model = models_lib.create_model(config.model, dataset.num_classes)
  title = _title(config, dataset)
  env = environment()
  log(f'{title}\nbudgets {list(config.epochs)} epochs, methods '
      f'{[METHOD_LABELS[m] for m in config.methods]}, augmentation crop pad '
      f'{config.crop_pad} flip {config.flip}; data loaded in {load_time:.1f} s; '
      f'jax {env["jax"]} on {env["platform"]} ({env["device"]})')

  optimizers = {method: make_optimizer(config, method) for method in config.methods}
  steps = {method: make_train_step(model, method, config.lr, config.refresh_every)
           for method in config.methods}
  eval_step = make_eval_step(model)
  compile_time = _compile(config, dataset, model, optimizers, steps, eval_step)
  log(f'compiled in {compile_time:.1f} s')

  runs: List[Run] = []
  for budget in config.epochs:
    for seed in range(config.first_seed, config.first_seed + config.seeds):
      for method in config.methods:
        runs.append(train_run(config, dataset, method, seed, budget, model,
                              optimizers[method], steps[method], eval_step, log))

  summary = summarize(runs, config)
  table = format_table(summary, config)
  log('\n' + title + '\n' + table)
  if summary['gain']:
    log(summary['gain'])
  log(summary['speedup']['text'])
  if len(config.methods) == 2:
    log('Verdict rule: a paired difference is "beyond seed noise" when |mean| > 2 '
        'standard errors of the per-seed differences (rough; weak with few seeds).')

  config_dict = dataclasses.asdict(config)
  results = dict(
      config=config_dict, environment=env, title=title,
      timing=dict(load_s=load_time, compile_s=compile_time),
      train_examples=len(dataset.train_labels), test_examples=len(dataset.test_labels),
      runs=[dict(config=config_dict, **dataclasses.asdict(run), jax_version=env['jax'],
                 device=env['device'], platform=env['platform']) for run in runs],
      summary=dict(table={str(k): v for k, v in summary['table'].items()},
                   speedup=summary['speedup'], gain=summary['gain']),
      table=table)
  plot_path = os.path.join(config.out, 'accuracy_vs_budget.png')
  plot(summary, runs, config, title, plot_path)
  results['timing']['total_s'] = time.perf_counter() - start_all
  json_path = os.path.join(config.out, 'results.json')
  with open(json_path, 'w') as handle:
    json.dump(results, handle, indent=1)
  log(f'wrote {json_path} and {plot_path}; total {results["timing"]["total_s"]:.1f} s')
  return results


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Entry point of ``tract-optax-train`` and ``python -m tract_optax.train``.

  Args:
    argv: command-line arguments (default: ``sys.argv[1:]``).
  """
  run_comparison(parse_config(argv))


if __name__ == '__main__':
  main()
