"""The command line of ``tract-optax-train``: flags, their checks, ``main``.

Every problem ends in one line on stderr (``tract-optax-train: error: ...``)
and a documented exit status, never a traceback or a usage block:

- 0: the comparison ran to the end;
- 2: the command line is wrong: a bad flag or value, checked before anything
  runs, or a size the data cannot satisfy (``--train-examples`` or
  ``--val-examples`` beyond the training file, a ``--patch-size`` that does not
  divide the images), found once the data is read;
- 1: the run cannot proceed: the data is missing or damaged, ``--out`` cannot
  be written or already holds results (``--overwrite`` replaces them), or an
  optional dependency the run needs (matplotlib) is not installed;
- 130: interrupted (Ctrl-C); the runs that finished are in ``results.json``,
  marked partial.

Part of the experiment application, not of the library.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import tract_optax
from tract_experiment import data as data_lib
from tract_experiment import models as models_lib
from tract_experiment.comparison import (PLOT_FILE, RESULTS_FILE, Interrupted, RunError,
                                         run_comparison)
from tract_experiment.config import (AUGMENTATIONS, AUTO_AUGMENT, DEFAULT_LRS, INPUT_SCALES,
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


def _lr_grid(text: str) -> Tuple[float, ...]:
  """``'0.3,0.03,0.1'`` -> ``(0.03, 0.1, 0.3)``: finite lrs > 0, none repeated, sorted."""
  values = tuple(_number(item, '--lr') for item in _items(text, '--lr'))
  for item, value in zip(text.split(','), values):
    if not value > 0:
      raise argparse.ArgumentTypeError(f'--lr must be > 0; got {item.strip()}')
  if len(set(values)) != len(values):
    raise argparse.ArgumentTypeError(f'--lr lists a learning rate more than once; got {text!r}')
  return tuple(sorted(values))


def _val_examples(text: str) -> Any:
  """A number of validation examples >= 1, or ``'auto'``."""
  if text.strip().lower() == 'auto':
    return 'auto'
  value = _whole(text, '--val-examples') if text.strip().lstrip('-').isdigit() else None
  if value is None:
    raise argparse.ArgumentTypeError(
        f'--val-examples takes a number of examples >= 1 or "auto"; got {text!r}')
  if value < 1:
    raise argparse.ArgumentTypeError(f'--val-examples must be >= 1 (or "auto"); got {value}')
  return value


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


class _Parser(argparse.ArgumentParser):
  """argparse, except that a bad flag is one line on stderr (status 2), no usage block."""

  def error(self, message: str):
    self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


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

  return ', '.join(f'{key}={show(value)}' for key, value in PRESETS[name].items()
                   if value is not None or key != 'patch_size')


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of ``tract-optax-train``."""
  methods = ', '.join(f'{name} ({label})' for name, label in METHOD_LABELS.items())
  lr_grids = '; '.join(f'{name}: {",".join(map(str, grid))}'
                       for name, grid in DEFAULT_LRS.items())
  parser = _Parser(
      prog=PROG,
      description='Train plain vs TrAct on a small image dataset and compare test '
                  'accuracy against the epoch budget (each budget is a full run '
                  'with its own cosine schedule; plain and TrAct runs of a seed share '
                  'initialisation and data order). Each method gets its own learning '
                  'rate per budget, the one of the --lr grid with the best accuracy on a '
                  'validation split carved from the training data (never the test set); '
                  'the table reports the test accuracy of that choice and the speedup '
                  'read off the tuned curves, and lists the shared-lr comparison at each '
                  f'lr of the grid apart. Writes {RESULTS_FILE} (after every finished run) '
                  f'and {PLOT_FILE} into --out. Flags marked [preset] take the value of '
                  '--preset when left out.',
      epilog='presets: ' + '; '.join(f'{name}: {_preset_text(name)}' for name in PRESETS)
             + '. Exit status: 0 on success; 2 for a bad flag or value (also a size the '
             'data cannot satisfy, such as more --train-examples than it holds); 1 when '
             'the data is missing or damaged, --out cannot be written or already holds '
             'results (see --overwrite), or matplotlib is missing (see --no-plot); 130 '
             'when interrupted (finished runs are kept, marked partial). Every error is '
             'one line on stderr.',
      formatter_class=_HelpFormatter)
  add = parser.add_argument
  add('--preset', choices=sorted(PRESETS), default='default',
      help='settings for the flags left out (listed below); default is CPU-sized '
           '(about 5 minutes on 2 cores), paper is a ResNet-18 protocol for a GPU')
  add('--dataset', choices=sorted(data_lib.LOADERS), help='dataset [preset]')
  add('--data-dir',
      help='folder with the dataset files, the only place then read (fashion_mnist, '
           f'cifar10). Without it: ${data_lib.DATA_ENV_VAR}, then (fashion_mnist) the '
           "folder of Debian's package dataset-fashion-mnist, then a download into "
           'the user cache folder')
  add('--model', choices=sorted(models_lib.MODELS), help='model [preset]')
  add('--patch-size', type=_int_type('--patch-size', 1),
      help='vit only: side of the square patches of the first layer (it must divide '
           'the image side: 4, 7 or 14 for 28-pixel images) [preset; else 4]')
  add('--method', type=_choices_type('--method', METHODS, METHOD_SETS), default='both',
      metavar='METHODS', help=f'methods to train, comma-separated: {methods}; "both" is plain,tract, '
           '"all" every method. TrAct runs are paired with the plain run of the same seed')
  add('--input-scale', type=_choices_type('--input-scale', INPUT_SCALES, {}),
      default='standardized', dest='input_scales', metavar='SCALES',
      help='comma-separated input scales: standardized (per channel, mean 0 and std 1), '
           'raw (the stored pixel values as float: 0..255 for fashion_mnist and cifar10, '
           '0..16 for digits) and/or unit (raw divided by that peak: 0..1); every method '
           'runs at every scale')
  add('--lam', type=lambda text: _number(text, '--lam'),
      help='TrAct ridge strength lambda > 0 (fixed, not tuned); with tract_rel relative '
           'to the mean eigenvalue of the first layer\'s input statistic [preset]')
  add('--optimizer', choices=('sgd', 'adam'),
      help='sgd: momentum with coupled weight decay; adam: AdamW [preset]')
  add('--lr', type=_lr_grid, metavar='LRS',
      help='peak learning rate, or a comma-separated grid (e.g. 0.03,0.1,0.3) that each '
           'method is tuned over, per budget, on validation accuracy; one value is a '
           'shared-lr comparison [preset; with another optimizer than the preset\'s: '
           f'{lr_grids}]')
  add('--val-examples', type=_val_examples,
      help='validation examples carved from the training data (disjoint from '
           '--train-examples), on which the lr is chosen, or "auto" (a sixth of the '
           'training data, at most 5000) [preset, for its dataset; else auto]')
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
  add('--seeds', type=_int_type('--seeds', 1), help='seeds per budget, lr and method [preset]')
  add('--first-seed', type=_int_type('--first-seed', 0), default=0,
      help='seeds are first_seed, first_seed+1, ...')
  add('--train-examples', type=_examples_type('--train-examples'),
      help='training examples (a fixed random subset, >= 1) or "all" left after the '
           'validation split; more than the data holds is an error [preset, for its '
           'dataset; else all]')
  add('--test-examples', type=_examples_type('--test-examples'),
      help='test examples (>= 1) or "all" [preset, for its dataset; else all]')
  add('--augment', choices=('auto',) + tuple(AUGMENTATIONS),
      help='training augmentation; auto: crop+flip for fashion_mnist and cifar10, '
           'none for digits [preset]')
  add('--crop-pad', type=_int_type('--crop-pad', 0),
      help='padding of random crops (default: 2 for fashion_mnist and digits, 4 for cifar10)')
  add('--eval-batch-size', type=_int_type('--eval-batch-size', 1), default=500,
      help='evaluation batch size')
  add('--out', default='runs/tract_optax',
      help='output folder (created when the first run finishes)')
  add('--overwrite', action='store_true',
      help='replace the results of an earlier comparison in --out (without it, an --out '
           'that holds them is refused)')
  add('--plot', action=argparse.BooleanOptionalAction, default=True,
      help=f'draw {PLOT_FILE} (needs matplotlib, checked before training)')
  add('--refresh-every', type=_int_type('--refresh-every', 1), default=1,
      help='TrAct runs: refresh the first-layer statistic every k steps and reuse '
           'it in between (opt-in amortisation; 1 = every batch, as in the paper)')
  add('--progress', action=argparse.BooleanOptionalAction, default=True,
      help='tqdm progress bar per group of runs (a method and budget: every seed and lr, '
           'trained as one vectorised program; on a terminal, else one log line per epoch)')
  add('--timing-compiles', type=_int_type('--timing-compiles', 0), default=3,
      help='after the runs, time one run\'s train step of each method, built afresh this '
           'many times and interleaved; the best over compiles gives the seconds per epoch '
           'of the speedup in seconds (0: no timing, no seconds speedup)')
  add('--timing-steps', type=_int_type('--timing-steps', 1), default=20,
      help='timed steps per method and compile of --timing-compiles')
  return parser


# ------------------------------------------------------ checks after parsing


def _learning_rates(flag: Optional[Tuple[float, ...]], optimizer: str,
                    preset: Dict[str, Any]) -> Tuple[float, ...]:
  if flag is not None:
    return flag
  if optimizer == preset['optimizer']:
    return tuple(preset['lr'])
  return DEFAULT_LRS[optimizer]


#: Flags whose preset value is for the preset's dataset (another one gets all / auto).
_SIZE_FLAGS = ('train_examples', 'val_examples', 'test_examples')


def _supports_relative_lam() -> bool:
  return 'relative_lam' in inspect.signature(tract_optax.tract).parameters


def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
  """Parses and checks the command line; fills what it leaves out from the preset.

  A bad flag exits with status 2 and one line naming it. Paths (``--data-dir``,
  ``--out``) are checked when the comparison starts (status 1).

  Example:
    >>> from tract_experiment import cli
    >>> config = cli.parse_config(['--dataset', 'digits', '--model', 'cnn',
    ...                            '--epochs', '2,1', '--lr', '0.3,0.1'])
    >>> config.epochs, config.methods, config.lrs, config.tuned
    ((1, 2), ('plain', 'tract'), (0.1, 0.3), True)
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  preset_name = args.preset
  preset = PRESETS[preset_name]

  def pick(name):
    value = getattr(args, name)
    if value is None:
      if name in _SIZE_FLAGS and pick('dataset') != preset['dataset']:
        return None  # the preset's sizes are for its own dataset
      return preset[name]
    return None if value in ('all', 'auto') else value

  lam = pick('lam')
  if not lam > 0:
    parser.error(f'--lam must be a finite number > 0; got {args.lam:g} (the {preset_name} '
                 f'preset uses {preset["lam"]:g}; the paper\'s default is 0.1)')
  optimizer = pick('optimizer')
  dataset = pick('dataset')
  model = pick('model')
  if args.data_dir is not None and dataset not in data_lib.FOLDER_DATASETS:
    parser.error(f'--data-dir does not apply to {dataset}: scikit-learn ships it')
  if args.patch_size is not None and model != 'vit':
    parser.error(f'--patch-size applies to --model vit only; got --model {model}')
  patch_size = (args.patch_size or preset['patch_size'] or models_lib.VIT_PATCH_SIZE
                if model == 'vit' else None)
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
      dataset=dataset, data_dir=args.data_dir, model=model, methods=args.method,
      lam=lam, optimizer=optimizer, lrs=_learning_rates(args.lr, optimizer, preset),
      momentum=args.momentum, nesterov=args.nesterov,
      weight_decay=pick('weight_decay'), warmup_epochs=pick('warmup_epochs'),
      batch_size=pick('batch_size'), epochs=tuple(pick('epochs')), seeds=pick('seeds'),
      first_seed=args.first_seed, train_examples=pick('train_examples'),
      test_examples=pick('test_examples'), augment=augment, crop_pad=crop_pad,
      flip=flip, eval_batch_size=args.eval_batch_size, out=args.out,
      preset=preset_name, progress=args.progress, refresh_every=args.refresh_every,
      input_scales=args.input_scales, val_examples=pick('val_examples'),
      patch_size=patch_size, plot=args.plot, overwrite=args.overwrite,
      timing_compiles=args.timing_compiles, timing_steps=args.timing_steps)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Entry point of ``tract-optax-train`` and ``python -m tract_experiment``.

  Args:
    argv: command-line arguments (default: ``sys.argv[1:]``).

  Raises:
    SystemExit: status 2 for a bad flag or value, 1 when the run cannot
      proceed, 130 when interrupted; the reason is one line on stderr.
  """
  config = parse_config(argv)
  try:
    run_comparison(config)
  except Interrupted as error:
    print(f'{PROG}: interrupted: {error}', file=sys.stderr)
    raise SystemExit(130) from None
  except RunError as error:
    print(f'{PROG}: error: {error}', file=sys.stderr)
    raise SystemExit(error.status) from None
