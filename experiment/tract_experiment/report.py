"""Summary of a comparison: tables of mean +- std, paired differences, the plot.

Every TrAct run is paired with the plain run of the same input scale, seed and
budget (same initialisation, data order and augmentation), so differences are
taken per seed. Part of the experiment application (``tract-optax-train``),
not of the library.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tract_experiment import speedup as speedup_lib
from tract_experiment.config import BASELINE, METHOD_LABELS, Config
from tract_experiment.training import Run

#: How a paired difference is judged, printed under the tables.
VERDICT_RULE = ('Verdict rule: a paired difference (or a speedup factor vs 1) is "beyond '
                'seed noise" when |mean| > 2 standard errors of the per-seed values '
                '(rough; weak with few seeds).')


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value).

  Example:
    >>> from tract_experiment.report import mean_std
    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
  """
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def paired_difference(first: Dict[int, float], second: Dict[int, float]) -> Dict[str, Any]:
  """``first - second`` per seed (seeds in both), with its spread and verdict.

  Args:
    first: accuracy per seed.
    second: accuracy per seed.

  Returns:
    ``mean``, ``std``, ``seeds``, ``first_better`` (seeds where first >
    second) and ``beyond_noise`` (``|mean| > 2`` standard errors; False with
    one seed).

  Example:
    >>> from tract_experiment.report import paired_difference
    >>> d = paired_difference({0: 0.82, 1: 0.83}, {0: 0.80, 1: 0.81})
    >>> round(d['mean'], 4), d['first_better'], d['beyond_noise']
    (0.02, 2, True)
  """
  seeds = sorted(set(first) & set(second))
  diffs = [first[s] - second[s] for s in seeds]
  if not diffs:
    return dict(mean=None, std=None, seeds=0, first_better=0, beyond_noise=False)
  mean, std = mean_std(diffs)
  error = std / math.sqrt(len(diffs)) if len(diffs) > 1 else float('inf')
  return dict(mean=mean, std=std, seeds=len(diffs),
              first_better=int(sum(d > 0 for d in diffs)),
              beyond_noise=bool(len(diffs) > 1 and abs(mean) > 2 * error))


def verdict(difference: Dict[str, Any]) -> str:
  """``'beyond seed noise'``, ``'within seed noise'`` or ``'noise unknown (1 seed)'``."""
  if difference['seeds'] < 2:
    return 'noise unknown (1 seed)'
  return 'beyond seed noise' if difference['beyond_noise'] else 'within seed noise'


def _by_seed(runs: Sequence[Run], scale: str, method: str, budget: int, lr: float,
             split: str = 'test') -> Dict[int, float]:
  """Accuracy per seed on ``split`` (``'test'`` or ``'val'``) of one grid cell."""
  field = 'val_accuracy' if split == 'val' else 'test_accuracy'
  return {r.seed: getattr(r, field) for r in runs
          if r.input_scale == scale and r.method == method and r.budget == budget
          and r.lr == lr}


def choose_lr(runs: Sequence[Run], scale: str, method: str, budget: int,
              lrs: Sequence[float]) -> Dict[str, Any]:
  """The lr of the grid with the best mean validation accuracy over seeds.

  Reads the runs' ``val_accuracy`` only, never their test accuracy: the test
  split reports the choice, it does not make it. Ties go to the smaller lr.

  Args:
    runs: every run of the comparison.
    scale: the input scale.
    method: the method whose lr is chosen.
    budget: the epoch budget.
    lrs: the grid, increasing.

  Returns:
    ``lr`` (the choice; ``None`` when no lr has a run), ``val_mean`` (its mean
    validation accuracy) and ``val_by_lr`` (mean validation accuracy per lr).

  Example:
    >>> from tract_experiment import report
    >>> from tract_experiment.training import Run
    >>> runs = [Run('plain', 0, 1, lr, val, test, 1.0, 1.0, [1.0], 1.0, 0.1, 1.1, 10)
    ...         for lr, val, test in ((0.1, 0.80, 0.90), (0.3, 0.85, 0.70))]
    >>> report.choose_lr(runs, 'standardized', 'plain', 1, (0.1, 0.3))['lr']
    0.3
  """
  val_by_lr = {}
  for lr in lrs:
    by_seed = _by_seed(runs, scale, method, budget, lr, split='val')
    if by_seed:
      val_by_lr[lr] = float(np.mean(list(by_seed.values())))
  if not val_by_lr:
    return dict(lr=None, val_mean=None, val_by_lr={})
  best = max(val_by_lr, key=lambda lr: (val_by_lr[lr], -lr))
  return dict(lr=best, val_mean=val_by_lr[best], val_by_lr=val_by_lr)


def _difference_text(difference: Dict[str, Any]) -> str:
  return (f'{difference["mean"]:+.4f} ({difference["first_better"]}/{difference["seeds"]} '
          f'seeds up, {verdict(difference)})')


def _cell(runs: Sequence[Run], scale: str, method: str, budget: int,
          lr: float) -> Optional[Dict[str, Any]]:
  """Mean +- std of validation and test accuracy over seeds at one lr, or None."""
  chosen = [r for r in runs if r.input_scale == scale and r.method == method
            and r.budget == budget and r.lr == lr]
  if not chosen:
    return None
  test_mean, test_std = mean_std([r.test_accuracy for r in chosen])
  val_mean, val_std = mean_std([r.val_accuracy for r in chosen])
  return dict(lr=lr, mean=test_mean, std=test_std, val_mean=val_mean, val_std=val_std,
              seeds=len(chosen),
              train_time_s=float(np.mean([r.train_time_s for r in chosen])),
              wall_time_s=float(np.mean([r.wall_time_s for r in chosen])))


def _comparison(runs: Sequence[Run], config: Config, scale: str,
                lr_of: Callable[[str, int], Optional[float]], label: str,
                lines: List[str]) -> Dict[str, Any]:
  """Paired differences and speedups, each method at ``lr_of(method, budget)``."""
  differences: Dict[str, Dict[int, Any]] = {}
  found: Dict[str, List[Dict[str, Any]]] = {}
  if not config.paired:
    return dict(differences=differences, speedups=found)

  def accuracies(method, budget):
    lr = lr_of(method, budget)
    return {} if lr is None else _by_seed(runs, scale, method, budget, lr)

  plain_curves = {seed: [accuracies(BASELINE, b).get(seed) for b in config.epochs]
                  for seed in config.seed_list}
  plain_curves = {s: c for s, c in plain_curves.items() if None not in c}
  for method in config.tract_methods:
    name = METHOD_LABELS[method]
    differences[method] = {b: paired_difference(accuracies(method, b),
                                                accuracies(BASELINE, b))
                           for b in config.epochs}
    lines.append(f'{label}: {name} - plain test accuracy: ' + '; '.join(
        f'{b} ep {_difference_text(d)}' for b, d in differences[method].items()
        if d['seeds']) + '.')
    by_budget = {b: accuracies(method, b) for b in config.epochs}
    found[method] = (speedup_lib.speedups(config.epochs, plain_curves, by_budget, name)
                     if plain_curves else [])
    lines.extend(f'{label} speedup: {entry["text"]}' for entry in found[method])
  return dict(differences=differences, speedups=found)


def lr_key(lr: float) -> str:
  """How an lr names an entry of ``summary['scales'][scale]['shared']``: ``'0.1'``."""
  return format(lr, 'g')


def trials_text(config: Config, val_examples: int, test_examples: int) -> str:
  """One sentence: the trials each method got and what the splits are used for."""
  per_method = len(config.lrs) * len(config.epochs) * config.seeds
  methods = ', '.join(METHOD_LABELS[m] for m in config.methods)
  lam = (f'; lam {config.lam:g} fixed for TrAct (not tuned)' if config.tract_methods else '')
  tuned = (f'{len(config.lrs)} lrs ({", ".join(map(lr_key, config.lrs))}) per budget, '
           'chosen on validation' if config.tuned else
           f'one lr ({lr_key(config.lrs[0])}): nothing tuned, a shared-lr comparison')
  return (f'Trials: each method ({methods}) got the same {per_method} runs: {tuned}, x '
          f'{len(config.epochs)} budgets x {config.seeds} seed(s){lam}. Validation: '
          f'{val_examples} examples carved from the training data; test: {test_examples} '
          'examples, used only to report the choices.')


def summarize(runs: Sequence[Run], config: Config) -> Dict[str, Any]:
  """Chosen lrs, tuned and shared-lr comparisons, per input scale; speedups.

  Each method's lr is chosen per budget (and input scale) on mean validation
  accuracy (:func:`choose_lr`); the test accuracy of that choice is reported.

  Returns:
    A JSON-ready dict (integer budgets become strings in JSON):

    - ``scales[scale]['table'][budget][method]``: the tuned choice: ``lr``,
      test ``mean``/``std``, ``val_mean``/``val_std``, ``seeds``,
      ``train_time_s``, ``wall_time_s``;
    - ``scales[scale]['choices'][method][budget]``: ``lr``, ``val_mean``,
      ``val_by_lr``;
    - ``scales[scale]['grid'][method][budget][lr]``: the same statistics at
      every lr of the grid (keys :func:`lr_key`);
    - ``scales[scale]['differences'][method][budget]``: tuned TrAct - tuned
      plain, paired by seed (see :func:`paired_difference`);
    - ``scales[scale]['speedups'][method]``: the tuned speedups (best vs best),
      one :func:`~tract_experiment.speedup.speedup_at` per TrAct budget;
    - ``scales[scale]['shared'][lr]``: ``differences`` and ``speedups`` with
      both methods at that one lr (not tuned);
    - ``scale_differences['<scale> - <first scale>'][method][budget]``: each
      input scale against the first one listed (tuned choices), paired by seed;
    - ``lines``: the sentences printed under the tables.
  """
  scales: Dict[str, Any] = {}
  lines: List[str] = []
  for scale in config.input_scales:
    suffix = f' ({scale} input)' if len(config.input_scales) > 1 else ''
    grid: Dict[str, Dict[int, Dict[str, Any]]] = {}
    choices: Dict[str, Dict[int, Dict[str, Any]]] = {}
    table: Dict[int, Dict[str, Any]] = {b: {} for b in config.epochs}
    for method in config.methods:
      for budget in config.epochs:
        cells = {lr_key(lr): _cell(runs, scale, method, budget, lr) for lr in config.lrs}
        grid.setdefault(method, {})[budget] = {k: c for k, c in cells.items() if c}
        choice = choose_lr(runs, scale, method, budget, config.lrs)
        choices.setdefault(method, {})[budget] = dict(
            lr=choice['lr'], val_mean=choice['val_mean'],
            val_by_lr={lr_key(lr): v for lr, v in choice['val_by_lr'].items()})
        if choice['lr'] is not None:
          table[budget][method] = cells[lr_key(choice['lr'])]

    def tuned_lr(method, budget):
      return choices[method][budget]['lr']

    label = ('Tuned' if config.tuned
             else f'Shared lr {lr_key(config.lrs[0])} (one lr given: nothing tuned)') + suffix
    tuned = _comparison(runs, config, scale, tuned_lr, label, lines)
    shared = {}
    for lr in config.lrs if config.tuned else ():
      shared[lr_key(lr)] = _comparison(
          runs, config, scale, lambda method, budget, lr=lr: lr,
          f'Shared lr {lr_key(lr)} (not tuned){suffix}', lines)
    if not config.tuned:
      shared[lr_key(config.lrs[0])] = tuned
    scales[scale] = dict(table=table, choices=choices, grid=grid, shared=shared, **tuned)
  if config.paired:
    reason = speedup_lib.no_speedup_text(config.epochs)
    if reason:
      lines.append(reason)
  scale_differences: Dict[str, Dict[str, Dict[int, Any]]] = {}
  reference, *others = config.input_scales

  def tuned_by_seed(scale, method, budget):
    lr = scales[scale]['choices'][method][budget]['lr']
    return {} if lr is None else _by_seed(runs, scale, method, budget, lr)

  for scale in others:  # each scale against the first one listed
    for method in config.methods:
      differences = {b: paired_difference(tuned_by_seed(scale, method, b),
                                          tuned_by_seed(reference, method, b))
                     for b in config.epochs}
      scale_differences.setdefault(f'{scale} - {reference}', {})[method] = differences
      lines.append(f'{METHOD_LABELS[method]}, {scale} - {reference} input (paired by seed'
                   + (', each at its tuned lr' if config.tuned else '') + '): '
                   + '; '.join(f'{b} ep {_difference_text(d)}'
                               for b, d in differences.items() if d['seeds']) + '.')
  return dict(scales=scales, scale_differences=scale_differences, lines=lines)


def _mean_std_text(mean: float, std: float, seeds: int, spec: str = '.4f') -> str:
  if seeds < 2:
    return format(mean, spec)
  return f'{format(mean, spec)} +- {std:.4f}'


def _align(rows: List[List[str]]) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = [' | '.join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
  lines.insert(1, '-+-'.join('-' * w for w in widths))
  return '\n'.join(lines)


def format_table(summary: Dict[str, Any], config: Config) -> str:
  """The headline: per budget and method, the lr chosen, its validation and test accuracy.

  TrAct rows add the paired difference to plain (each at its own chosen lr)
  and its verdict. With one lr the same table is the shared-lr comparison.

  Example:
    >>> from tract_experiment import cli, report, training
    >>> config = cli.parse_config(['--dataset', 'digits', '--epochs', '1', '--seeds', '1',
    ...                            '--lr', '0.1'])
    >>> runs = [training.Run(m, 0, 1, 0.1, a, a, 1.0, 1.0, [1.0], 2.0, 0.1, 2.1, 10)
    ...         for m, a in (('plain', 0.80), ('tract', 0.82))]
    >>> table = report.format_table(report.summarize(runs, config), config)
    >>> print(' '.join(table.splitlines()[0].split()))  # the header, spaces squeezed
    budget | method | lr | val acc | test acc (mean +- std) | - plain (paired) | verdict | train s
    >>> print(' '.join(table.splitlines()[3].split()))
    1 ep | TrAct | 0.1 | 0.8200 | 0.8200 | +0.0200 (1/1 seeds up) | noise unknown (1 seed) | 2.0
  """
  blocks = []
  lr_header = 'lr (chosen on val)' if config.tuned else 'lr'
  for scale, scale_summary in summary['scales'].items():
    rows = [['budget', 'method', lr_header, 'val acc', 'test acc (mean +- std)',
             '- plain (paired)', 'verdict', 'train s']]
    for budget, row in scale_summary['table'].items():
      for method in config.methods:
        if method not in row:
          continue
        stats = row[method]
        line = [f'{budget} ep', METHOD_LABELS[method], lr_key(stats['lr']),
                _mean_std_text(stats['val_mean'], stats['val_std'], 1),
                _mean_std_text(stats['mean'], stats['std'], stats['seeds'])]
        difference = scale_summary['differences'].get(method, {}).get(budget)
        if difference and difference['seeds']:
          line += [_mean_std_text(difference['mean'], difference['std'], difference['seeds'],
                                  '+.4f')
                   + f' ({difference["first_better"]}/{difference["seeds"]} seeds up)',
                   verdict(difference)]
        else:
          line += ['', '']
        line.append(f'{stats["train_time_s"]:.1f}')
        rows.append(line)
    table = _align(rows)
    if len(summary['scales']) > 1:
      table = f'input scale: {scale}\n{table}'
    blocks.append(table)
  return '\n\n'.join(blocks)


def format_lr_grid(summary: Dict[str, Any], config: Config) -> str:
  """Every lr of the grid: test accuracy mean +- std, validation mean, ``*`` = chosen.

  Empty with one lr (the headline table says it all).
  """
  if not config.tuned:
    return ''
  blocks = []
  for scale, scale_summary in summary['scales'].items():
    rows = [['budget', 'method'] + [f'lr {lr_key(lr)}: test (val)' for lr in config.lrs]]
    for budget in config.epochs:
      for method in config.methods:
        cells = scale_summary['grid'][method][budget]
        chosen = scale_summary['choices'][method][budget]['lr']
        line = [f'{budget} ep', METHOD_LABELS[method]]
        for lr in config.lrs:
          cell = cells.get(lr_key(lr))
          line.append('-' if cell is None else
                      _mean_std_text(cell['mean'], cell['std'], cell['seeds'])
                      + f' ({cell["val_mean"]:.4f})' + (' *' if lr == chosen else ''))
        rows.append(line)
    heading = ('Learning-rate grid: test accuracy mean +- std over seeds (validation mean); '
               '* = chosen on validation' + (f', {scale} input' if len(summary['scales']) > 1
                                              else '') + ':')
    blocks.append(heading + '\n' + _align(rows))
  return '\n\n'.join(blocks)


def format_scale_grid(summary: Dict[str, Any], config: Config) -> str:
  """Rows = input scale, columns = methods, one table per budget.

  Each cell is the mean +- std test accuracy over seeds (at the method's
  chosen lr); TrAct cells add the paired difference to plain of the same
  scale. Empty when only one scale ran.
  """
  if len(config.input_scales) < 2:
    return ''
  blocks = []
  for budget in config.epochs:
    rows = [['input scale'] + [METHOD_LABELS[m] for m in config.methods]]
    for scale in config.input_scales:
      scale_summary = summary['scales'][scale]
      line = [scale]
      for method in config.methods:
        stats = scale_summary['table'][budget].get(method)
        cell = _mean_std_text(stats['mean'], stats['std'], stats['seeds']) if stats else '-'
        if stats and config.tuned:
          cell += f' @ lr {lr_key(stats["lr"])}'
        difference = scale_summary['differences'].get(method, {}).get(budget)
        if difference and difference['seeds']:
          cell += f' (vs plain {difference["mean"]:+.4f}, {verdict(difference)})'
        line.append(cell)
      rows.append(line)
    seeds = config.seeds
    blocks.append(f'test accuracy at {budget} ep, mean +- std over {seeds} seed(s):\n'
                  + _align(rows))
  return '\n\n'.join(blocks)


def title(config: Config, train_examples: int, test_examples: int,
          val_examples: Optional[int] = None) -> str:
  """One line naming the dataset, model, sizes, optimizer, lr grid and lambda."""
  optimizer = (f'SGD m={config.momentum}' if config.optimizer == 'sgd' else 'AdamW')
  scales = '/'.join(config.input_scales)
  model = config.model + (f' ({config.patch_size}x{config.patch_size} patches)'
                          if config.patch_size else '')
  sizes = f'{train_examples} train / '
  if val_examples is not None:
    sizes += f'{val_examples} val / '
  lrs = ','.join(map(lr_key, config.lrs))
  lr_text = f'lr grid {lrs}' if config.tuned else f'lr {lrs}'
  return (f'{config.dataset} ({scales} input), {model}, {sizes}{test_examples} test, '
          f'{optimizer} {lr_text} cosine, batch {config.batch_size}, lam {config.lam:g}, '
          f'{config.seeds} seed(s)'
          + (f', TrAct statistic refreshed every {config.refresh_every} steps'
             if config.refresh_every > 1 else ''))


_COLORS = {'plain': 'tab:gray', 'tract': 'tab:blue', 'tract_rel': 'tab:orange'}


def _annotate_speedups(axes, entries: Sequence[Dict[str, Any]], color: str,
                       budgets: np.ndarray) -> int:
  """Dashed line from TrAct@k to where plain's mean curve reaches it, with x/k.

  Returns the number of dashed lines drawn.
  """
  drawn = 0
  for entry in entries:
    k, accuracy = entry['tract_budget'], entry['tract_accuracy']
    if entry['kind'] == speedup_lib.INTERPOLATED:
      x = entry['plain_budget']
      axes.plot([k, x], [accuracy, accuracy], linestyle='--', color=color, linewidth=1)
      axes.plot([x], [accuracy], marker='x', color=color)
      label = f'{entry["factor"]:.2f}x'
      if entry['factor_std'] is not None:
        label += f' \u00b1 {entry["factor_std"]:.2f}'
      axes.annotate(label, (x, accuracy), textcoords='offset points', xytext=(4, 4),
                    fontsize=7, color=color)
      drawn += 1
    elif entry['kind'] == speedup_lib.BEYOND and k < budgets.max():
      axes.annotate(f'> {entry["bound"]:.2f}x (beyond plain@{budgets.max():g})',
                    (k, accuracy), textcoords='offset points', xytext=(4, 4), fontsize=7,
                    color=color)
  return drawn


def _budget_panel(axes, summary_scale: Dict[str, Any], runs: Sequence[Run], config: Config,
                  scale: str) -> int:
  """Test accuracy of each method's choice against the budget; returns dashed lines drawn."""
  budgets = np.asarray(config.epochs)
  drawn = 0
  for method in config.methods:
    points = [(b, summary_scale['table'][b][method]) for b in config.epochs
              if method in summary_scale['table'][b]]
    if not points:
      continue
    x = np.asarray([b for b, _ in points])
    mean = np.asarray([s['mean'] for _, s in points])
    std = np.asarray([s['std'] for _, s in points])
    label = METHOD_LABELS[method] + (f' (lam={config.lam:g})' if method != BASELINE else '')
    axes.plot(x, mean, marker='o', color=_COLORS[method], label=label)
    axes.fill_between(x, mean - std, mean + std, color=_COLORS[method], alpha=0.2,
                      linewidth=0)
    seeds = [(r.budget, r.test_accuracy) for r in runs
             if r.method == method and r.input_scale == scale
             and r.lr == summary_scale['table'][r.budget].get(method, {}).get('lr')]
    axes.scatter(*zip(*seeds), s=10, color=_COLORS[method], alpha=0.5)
    drawn += _annotate_speedups(axes, summary_scale['speedups'].get(method, []),
                                _COLORS[method], budgets)
  if len(budgets) > 1 and budgets.max() / budgets.min() >= 4:
    axes.set_xscale('log', base=2)
  axes.set_xticks(budgets, [str(b) for b in budgets])
  axes.set_xlabel('epoch budget (each a full run)')
  axes.set_ylabel('test accuracy' + (' at the chosen lr' if config.tuned else ''))
  axes.grid(alpha=0.3)
  axes.legend(fontsize=7)
  return drawn


def _lr_panel(axes, summary_scale: Dict[str, Any], config: Config, budget: int) -> None:
  """Test (solid, +-std) and validation (dashed) accuracy against the lr at one budget."""
  lrs = np.asarray(config.lrs)
  for method in config.methods:
    cells = summary_scale['grid'][method][budget]
    present = [lr for lr in config.lrs if lr_key(lr) in cells]
    if not present:
      continue
    color = _COLORS[method]
    test = np.asarray([cells[lr_key(lr)]['mean'] for lr in present])
    std = np.asarray([cells[lr_key(lr)]['std'] for lr in present])
    val = np.asarray([cells[lr_key(lr)]['val_mean'] for lr in present])
    axes.plot(present, test, marker='o', color=color, label=METHOD_LABELS[method])
    axes.fill_between(present, test - std, test + std, color=color, alpha=0.15, linewidth=0)
    axes.plot(present, val, linestyle='--', color=color, linewidth=1)
    chosen = summary_scale['choices'][method][budget]['lr']
    if chosen is not None:
      axes.plot([chosen], [cells[lr_key(chosen)]['val_mean']], marker='*', markersize=10,
                color=color, linestyle='none')
  axes.set_xscale('log')
  axes.set_xticks(lrs, [lr_key(lr) for lr in lrs])
  axes.minorticks_off()
  axes.set_xlabel('peak learning rate')
  axes.set_title(f'{budget} ep', fontsize=8)
  axes.grid(alpha=0.3)


def plot_heading(config: Config, dashed_lines: int) -> str:
  """What the figure draws, in one sentence or two; dashed matches only when drawn.

  Example:
    >>> from tract_experiment import cli, report
    >>> config = cli.parse_config(['--lr', '0.1', '--epochs', '1,2'])
    >>> report.plot_heading(config, dashed_lines=0)
    'Test accuracy vs epoch budget (mean \u00b1 std over seeds).'
  """
  head = ('Left: test accuracy vs epoch budget, each method at its lr chosen on validation '
          '(mean \u00b1 std over seeds)' if config.tuned else
          'Test accuracy vs epoch budget (mean \u00b1 std over seeds)')
  if dashed_lines:
    head += '; dashed: TrAct@k ep matches plain@x ep (x/k)'
  if config.tuned:
    head += ('. Right: accuracy vs peak lr per budget (solid: test \u00b1 std, dashed: '
             'validation, star: chosen)')
  return head + '.'


def plot(summary: Dict[str, Any], runs: Sequence[Run], config: Config, title_text: str,
         path: str) -> None:
  """Accuracy vs budget and, with an lr grid, accuracy vs lr per budget, one row per scale.

  Left: each method's test accuracy at its chosen lr against the epoch budget
  (mean line, +-std band, seeds as dots), with a dashed line from TrAct@k to
  where plain's interpolated curve reaches it, labelled with the speedup.
  Right (lr grid only), one panel per budget: test accuracy (solid, +-std)
  and validation accuracy (dashed) against the peak lr; a star marks the
  chosen lr. The title explains only what is drawn.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = len(config.input_scales)
  columns = 1 + (len(config.epochs) if config.tuned else 0)
  figure, all_axes = plt.subplots(rows, columns, figsize=(4.4 * columns + 1.6, 3.8 * rows),
                                  squeeze=False)
  drawn = 0
  for axes_row, scale in zip(all_axes, config.input_scales):
    scale_summary = summary['scales'][scale]
    drawn += _budget_panel(axes_row[0], scale_summary, runs, config, scale)
    if rows > 1:
      axes_row[0].set_title(f'{scale} input', fontsize=8)
    for axes, budget in zip(axes_row[1:], config.epochs):
      _lr_panel(axes, scale_summary, config, budget)
      if rows > 1:
        axes.set_title(f'{scale} input, {budget} ep', fontsize=8)
  # wrapped to the figure's width (about 16 characters per inch at this size)
  width = int(16 * figure.get_figwidth())
  lines = (textwrap.wrap(plot_heading(config, drawn), width)
           + textwrap.wrap(title_text, width))
  figure.suptitle('\n'.join(lines), fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def seconds_speedups(summary: Dict[str, Any], config: Config,
                     epoch_s: Dict[str, float]) -> Dict[str, Any]:
  """The tuned speedups in wall-clock seconds, from each method's seconds per epoch.

  For TrAct at ``k`` epochs reaching an accuracy that plain's tuned curve
  reaches at ``p`` epochs (interpolated; :func:`~tract_experiment.speedup.speedup_at`),
  TrAct needs ``k * epoch_s[tract]`` seconds and plain ``p * epoch_s[plain]``;
  the seconds speedup is their ratio (the epoch speedup times plain's over
  TrAct's seconds per epoch). Where plain's curve does not interpolate, the
  epoch bound becomes a seconds bound.

  Args:
    summary: :func:`summarize`'s result.
    config: the comparison's settings.
    epoch_s: seconds per epoch of one run of each method (e.g.
      :func:`tract_experiment.timing.per_epoch`).

  Returns:
    ``{scale: {method: [entry per TrAct budget]}}``, each entry with
    ``tract_budget``, ``tract_accuracy``, ``tract_s``, ``plain_budget``
    (or None), ``plain_s`` (or None), ``epoch_factor`` and ``seconds_factor``
    (None unless interpolated), ``bound`` and ``seconds_bound`` (else),
    ``kind``.

  Example:
    >>> from tract_experiment import cli
    >>> config = cli.parse_config(['--dataset', 'digits', '--epochs', '1,2', '--seeds', '1',
    ...                            '--lr', '0.1'])
    >>> runs = [Run(m, 0, b, 0.1, a, a, 1.0, 1.0, [1.0] * b, 2.0, 0.1, 2.1, 10)
    ...         for m, b, a in (('plain', 1, 0.80), ('plain', 2, 0.84),
    ...                         ('tract', 1, 0.82), ('tract', 2, 0.85))]
    >>> summary = summarize(runs, config)
    >>> (first, _), = seconds_speedups(summary, config, {'plain': 2.0, 'tract': 2.5}
    ...                                )['standardized'].values()
    >>> [round(first[key], 6) for key in ('plain_budget', 'plain_s', 'tract_s',
    ...                                   'seconds_factor')]
    [1.5, 3.0, 2.5, 1.2]
  """
  result: Dict[str, Any] = {}
  for scale, scale_summary in summary['scales'].items():
    by_method: Dict[str, List[Dict[str, Any]]] = {}
    for method, entries in scale_summary.get('speedups', {}).items():
      rows = []
      for entry in entries:
        tract_s = entry['tract_budget'] * epoch_s[method]
        plain_budget = entry['plain_budget']
        plain_s = None if plain_budget is None else plain_budget * epoch_s[BASELINE]
        bound = entry['bound']
        rows.append(dict(
            tract_budget=entry['tract_budget'], tract_accuracy=entry['tract_accuracy'],
            kind=entry['kind'], tract_s=tract_s, plain_budget=plain_budget, plain_s=plain_s,
            epoch_factor=entry['factor'],
            seconds_factor=None if plain_s is None else plain_s / tract_s,
            bound=bound,
            seconds_bound=None if bound is None else bound * epoch_s[BASELINE] / epoch_s[method],
            tract_epoch_s=epoch_s[method], plain_epoch_s=epoch_s[BASELINE]))
      by_method[method] = rows
    result[scale] = by_method
  return result


def format_seconds_table(seconds: Dict[str, Any], timing_note: str) -> str:
  """The seconds speedups as a table, one row per TrAct method and budget.

  Args:
    seconds: :func:`seconds_speedups`'s result.
    timing_note: how the seconds per epoch were measured (printed above).
  """
  blocks = []
  for scale, by_method in seconds.items():
    rows = [['TrAct budget', 'method', 'test acc', 'TrAct s', 'plain ep to it', 'plain s',
             'epoch speedup', 'seconds speedup']]
    for method, entries in by_method.items():
      for entry in entries:
        if entry['seconds_factor'] is not None:
          plain_epochs = f'{entry["plain_budget"]:.2f}'
          plain_s = f'{entry["plain_s"]:.1f}'
          epoch_factor = f'{entry["epoch_factor"]:.2f}x'
          seconds_factor = f'{entry["seconds_factor"]:.2f}x'
        else:
          relation = '<' if entry['kind'] == speedup_lib.BELOW else '>'
          plain_epochs = f'{entry["kind"]} the budgets run'
          plain_s = ''
          epoch_factor = f'{relation} {entry["bound"]:.2f}x'
          seconds_factor = f'{relation} {entry["seconds_bound"]:.2f}x'
        rows.append([f'{entry["tract_budget"]} ep', METHOD_LABELS[method],
                     f'{entry["tract_accuracy"]:.4f}', f'{entry["tract_s"]:.1f}', plain_epochs,
                     plain_s, epoch_factor, seconds_factor])
    if len(rows) > 1:
      table = _align(rows)
      if len(seconds) > 1:
        table = f'input scale: {scale}\n{table}'
      blocks.append(table)
  if not blocks:
    return ''
  return (f'Speedup in seconds (tuned curves; {timing_note}):\n' + '\n\n'.join(blocks))
