"""The command line of ``tract-optax-train``: flags, their checks, ``main``.

Every bad input ends in one line on stderr and a non-zero exit status, never a
traceback: 2 for a bad flag (argparse's convention, checked before anything
runs), 1 when the run cannot proceed (missing or damaged data, an output folder
that cannot be written). Part of the experiment application, not of the library.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import tract_optax
from tract_experiment import data as data_lib
from tract_experiment import models as models_lib
from tract_experiment.comparison import PLOT_FILE, RESULTS_FILE, RunError, run_comparison
from tract_experiment.config import (AUGMENTATIONS, AUTO_AUGMENT, DEFAULT_LR, INPUT_SCALES,
                                           METHOD_LABELS, METHOD_SETS, METHODS, PRESETS, Config)

PROG = 'tract-optax-train'


# ------------------------------------------------------------- flag types


def _number(text: str, flag: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{flag} takes a number; got {text!r}') from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f'{flag} must be a finite number; got {text!r}')
  return value


def _whole(text: str, flag: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{flag} takes a whole number; got {text!r}') from None


def _float_type(flag: str, minimum: float, inclusive: bool,
                maximum: Optional[float] = None) -> Callable[[str], float]:
  """A finite float >= (or >) ``minimum`` and < ``maximum``."""

  def parse(text: str) -> float:
    value = _number(text, flag)
    low_ok = value >= minimum if inclusive else value > minimum
    if not low_ok or (maximum is not None and value >= maximum):
      bound = f'{">=" if inclusive else ">"} {minimum:g}'
      if maximum is not None:
        bound += f' and < {maximum:g}'
      raise argparse.ArgumentTypeError(f'{flag} must be {bound}; got {text}')
    return value

  return parse


def _int_type(flag: str, minimum: int) -> Callable[[str], int]:
  def parse(text: str) -> int:
    value = _whole(text, flag)
    if value < minimum:
      raise argparse.ArgumentTypeError(f'{flag} must be >= {minimum}; got {value}')
    return value

  return parse


def _examples_type(flag: str) -> Callable[[str], Any]:
  """A number of examples >= 1, or ``'all'``."""

  def parse(text: str) -> Any:
    if text.strip().lower() == 'all':
      return 'all'
    value = _whole(text, flag) if text.strip().lstrip('-').isdigit() else None
    if value is None:
      raise argparse.ArgumentTypeError(
          f'{flag} takes a number of examples >= 1 or "all"; got {text!r}')
    if value < 1:
      raise argparse.ArgumentTypeError(
          f'{flag} must be >= 1 (or "all" for every example); got {value}')
    return value

  return parse


def _items(text: str, flag: str) -> Tuple[str, ...]:
  """Comma-separated items: no empty item, no repeated item."""
  items = tuple(part.strip() for part in text.split(','))
  if not text.strip() or any(not item for item in items):
    raise argparse.ArgumentTypeError(
        f'{flag} takes comma-separated items with none empty; got {text!r}')
  repeated = sorted({item for item in items if items.count(item) > 1})
  if repeated:
    raise argparse.ArgumentTypeError(f'{flag} lists {", ".join(repeated)} more than once; '
                                     f'got {text!r}')
  return items


def _budgets(text: str) -> Tuple[int, ...]:
  """``'1,2,4'`` -> ``(1, 2, 4)``: whole epochs >= 1, none empty or repeated, sorted."""
  items = _items(text, '--epochs')
  try:
    values = tuple(int(item) for item in items)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'--epochs takes comma-separated whole epochs, e.g. 1,2,4; got {text!r}') from None
  if min(values) < 1:
    raise argparse.ArgumentTypeError(f'--epochs needs budgets >= 1; got {text!r}')
  if len(set(values)) != len(values):
    raise argparse.ArgumentTypeError(f'--epochs lists a budget more than once; got {text!r}')
  return tuple(sorted(values))


def _choices_type(flag: str, allowed: Sequence[str],
                  shorthands: Dict[str, Tuple[str, ...]]) -> Callable[[str], Tuple[str, ...]]:
  """A shorthand or comma-separated names from ``allowed``, returned in ``allowed`` order."""

  def parse(text: str) -> Tuple[str, ...]:
    if text.strip() in shorthands:
      return shorthands[text.strip()]
    items = _items(text, flag)
    unknown = [item for item in items if item not in allowed]
    if unknown:
      raise argparse.ArgumentTypeError(
          f'{flag}: unknown {", ".join(map(repr, unknown))}; choose from '
          f'{", ".join(list(shorthands) + list(allowed))}')
    return tuple(name for name in allowed if name in items)

  return parse


# ------------------------------------------------------------- the parser


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
  methods = ', '.join(f'{name} ({label})' for name, label in METHOD_LABELS.items())
  parser = argparse.ArgumentParser(
      prog=PROG,
      description='Train plain vs TrAct on a small image dataset and compare test '
                  'accuracy against the epoch budget (each budget is a full run '
                  'with its own cosine schedule; plain and TrAct runs of a seed share '
                  f'initialisation and data order). Writes {RESULTS_FILE} and {PLOT_FILE} '
                  'into --out. Flags marked [preset] take the value of --preset when '
                  'left out.',
      epilog='presets: ' + '; '.join(f'{name}: {_preset_text(name)}' for name in PRESETS)
             + '. Exit status: 0 on success, 2 for a bad flag, 1 when the data is '
             'missing or damaged or --out cannot be written.',
      formatter_class=_HelpFormatter)
  add = parser.add_argument
  add('--preset', choices=sorted(PRESETS), default='default',
      help='settings for the flags left out (listed below); default is CPU-sized, '
           'paper is a ResNet-18 protocol for a GPU')
  add('--dataset', choices=sorted(data_lib.LOADERS), help='dataset [preset]')
  add('--data-dir',
      help='folder with the dataset files, the only place then read (fashion_mnist, '
           f'cifar10). Without it: ${data_lib.DATA_ENV_VAR}, then (fashion_mnist) the '
           "folder of Debian's package dataset-fashion-mnist, then a download into "
           'the user cache folder')
  add('--model', choices=sorted(models_lib.MODELS), help='model [preset]')
  add('--method', type=_choices_type('--method', METHODS, METHOD_SETS), default='both',
      metavar='METHODS', help=f'methods to train, comma-separated: {methods}; "both" is plain,tract, '
           '"all" every method. TrAct runs are paired with the plain run of the same seed')
  add('--input-scale', type=_choices_type('--input-scale', INPUT_SCALES, {}),
      default='standardized', dest='input_scales', metavar='SCALES',
      help='comma-separated input scales: standardized (per channel, mean 0 and std 1) '
           'and/or raw (the stored pixel values as float: 0..255 for fashion_mnist and '
           'cifar10, 0..16 for digits); every method runs at every scale')
  add('--lam', type=lambda text: _number(text, '--lam'),
      help='TrAct ridge strength lambda > 0; with tract_rel relative to the mean '
           'eigenvalue of the first layer\'s input statistic [preset]')
  add('--optimizer', choices=('sgd', 'adam'),
      help='sgd: momentum with coupled weight decay; adam: AdamW [preset]')
  add('--lr', type=_float_type('--lr', 0.0, inclusive=False),
      help='peak learning rate > 0 [preset; with another optimizer than the preset\'s: '
           f'{DEFAULT_LR}]')
  add('--momentum', type=_float_type('--momentum', 0.0, True, 1.0), default=0.9,
      help='SGD momentum')
  add('--nesterov', action=argparse.BooleanOptionalAction, default=False,
      help='Nesterov momentum for SGD')
  add('--weight-decay', type=_float_type('--weight-decay', 0.0, True),
      help='weight decay of the kernels [preset]')
  add('--warmup-epochs', type=_float_type('--warmup-epochs', 0.0, True),
      help='linear warm-up before the cosine decay, in epochs [preset]')
  add('--batch-size', type=_int_type('--batch-size', 1), help='training batch size [preset]')
  add('--epochs', type=_budgets,
      help='comma-separated epoch budgets, e.g. 1,2,3; each is a separate run; with two '
           'or more, the speedup is read off plain\'s interpolated curve [preset]')
  add('--seeds', type=_int_type('--seeds', 1), help='seeds per budget and method [preset]')
  add('--first-seed', type=_int_type('--first-seed', 0), default=0,
      help='seeds are first_seed, first_seed+1, ...')
  add('--train-examples', type=_examples_type('--train-examples'),
      help='training examples (a fixed random subset, >= 1) or "all" [preset]')
  add('--test-examples', type=_examples_type('--test-examples'),
      help='test examples (>= 1) or "all" [preset]')
  add('--augment', choices=('auto',) + tuple(AUGMENTATIONS),
      help='training augmentation; auto: crop+flip for fashion_mnist and cifar10, '
           'none for digits [preset]')
  add('--crop-pad', type=_int_type('--crop-pad', 0),
      help='padding of random crops (default: 2 for fashion_mnist and digits, 4 for cifar10)')
  add('--eval-batch-size', type=_int_type('--eval-batch-size', 1), default=500,
      help='evaluation batch size')
  add('--out', default='runs/tract_optax', help='output folder (created if needed)')
  add('--refresh-every', type=_int_type('--refresh-every', 1), default=1,
      help='TrAct runs: refresh the first-layer statistic every k steps and reuse '
           'it in between (opt-in amortisation; 1 = every batch, as in the paper)')
  add('--progress', action=argparse.BooleanOptionalAction, default=True,
      help='tqdm progress bar per run (on a terminal; else one log line per epoch)')
  return parser


# ------------------------------------------------------ checks after parsing


def _learning_rate(flag: Optional[float], optimizer: str, preset: Dict[str, Any]) -> float:
  if flag is not None:
    return flag
  if optimizer == preset['optimizer']:
    return preset['lr']
  return DEFAULT_LR[optimizer]


def _out_problem(out: str) -> Optional[str]:
  """Why the folder ``out`` cannot be created or written, or None."""
  path = Path(out)
  if path.exists():
    if not path.is_dir():
      return f'--out {out} exists and is not a folder'
    return None if os.access(path, os.W_OK | os.X_OK) else f'--out {out} is not writable'
  parent = path.absolute().parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    return f'--out {out} cannot be created: {parent} is a file, not a folder'
  if not os.access(parent, os.W_OK | os.X_OK):
    return f'--out {out} cannot be created: {parent} is not writable'
  return None


def _supports_relative_lam() -> bool:
  return 'relative_lam' in inspect.signature(tract_optax.tract).parameters


def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
  """Parses and checks the command line; fills what it leaves out from the preset.

  A bad flag exits with status 2 and one line naming it (argparse style).

  Example:
    >>> from tract_experiment import cli
    >>> config = cli.parse_config(['--dataset', 'digits', '--epochs', '2,1'])
    >>> config.epochs, config.methods, config.model, config.input_scales
    ((1, 2), ('plain', 'tract'), 'cnn', ('standardized',))
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  preset_name = args.preset
  preset = PRESETS[preset_name]

  def pick(name):
    value = getattr(args, name)
    if value is None:
      return preset[name]
    return None if value == 'all' else value

  lam = pick('lam')
  if not lam > 0:
    parser.error(f'--lam must be a finite number > 0; got {args.lam:g} (the {preset_name} '
                 f'preset uses {preset["lam"]:g}; the paper\'s default is 0.1)')
  optimizer = pick('optimizer')
  dataset = pick('dataset')
  if args.data_dir is not None:
    if dataset not in data_lib.FOLDER_DATASETS:
      parser.error(f'--data-dir does not apply to {dataset}: scikit-learn ships it')
    if not os.path.exists(args.data_dir):
      parser.error(f'--data-dir {args.data_dir} does not exist')
    if not os.path.isdir(args.data_dir):
      parser.error(f'--data-dir {args.data_dir} is not a folder')
  problem = _out_problem(args.out)
  if problem:
    parser.error(problem)
  if 'tract_rel' in args.method and not _supports_relative_lam():
    parser.error('--method tract_rel needs tract_optax.tract(..., relative_lam=True), '
                 'which this version of tract_optax does not have')
  augment = pick('augment')
  crop_pad, flip = AUTO_AUGMENT[dataset] if augment == 'auto' else AUGMENTATIONS[augment]
  if crop_pad is None:  # 'crop' or 'crop_flip' asked explicitly
    crop_pad = AUTO_AUGMENT[dataset][0] or 2
  if args.crop_pad is not None:
    crop_pad = args.crop_pad if augment in ('auto', 'crop', 'crop_flip') else 0
  return Config(
      dataset=dataset, data_dir=args.data_dir, model=pick('model'), methods=args.method,
      lam=lam, optimizer=optimizer, lr=_learning_rate(args.lr, optimizer, preset),
      momentum=args.momentum, nesterov=args.nesterov,
      weight_decay=pick('weight_decay'), warmup_epochs=pick('warmup_epochs'),
      batch_size=pick('batch_size'), epochs=tuple(pick('epochs')), seeds=pick('seeds'),
      first_seed=args.first_seed, train_examples=pick('train_examples'),
      test_examples=pick('test_examples'), augment=augment, crop_pad=crop_pad,
      flip=flip, eval_batch_size=args.eval_batch_size, out=args.out,
      preset=preset_name, progress=args.progress, refresh_every=args.refresh_every,
      input_scales=args.input_scales)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Entry point of ``tract-optax-train`` and ``python -m tract_experiment``.

  Args:
    argv: command-line arguments (default: ``sys.argv[1:]``).

  Raises:
    SystemExit: status 2 for a bad flag, 1 when the run cannot proceed; the
      reason is one line on stderr.
  """
  config = parse_config(argv)
  try:
    run_comparison(config)
  except RunError as error:
    print(f'{PROG}: error: {error}', file=sys.stderr)
    raise SystemExit(1) from None
