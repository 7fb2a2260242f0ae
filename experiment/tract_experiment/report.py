"""Summary of a comparison: tables of mean +- std, paired differences, the plot.

Every TrAct run is paired with the plain run of the same input scale, seed and
budget (same initialisation, data order and augmentation), so differences are
taken per seed. Part of the experiment application (``tract-optax-train``),
not of the library.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Dict, List, Sequence, Tuple

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


def _by_seed(runs: Sequence[Run], scale: str, method: str, budget: int) -> Dict[int, float]:
  return {r.seed: r.final_accuracy for r in runs
          if r.input_scale == scale and r.method == method and r.budget == budget}


def _difference_text(difference: Dict[str, Any]) -> str:
  return (f'{difference["mean"]:+.4f} ({difference["first_better"]}/{difference["seeds"]} '
          f'seeds up, {verdict(difference)})')


def summarize(runs: Sequence[Run], config: Config) -> Dict[str, Any]:
  """Mean +- std per input scale, budget and method; paired differences; speedups.

  Returns:
    A JSON-ready dict (integer budgets become strings in JSON):

    - ``scales[scale]['table'][budget][method]``: ``mean``, ``std``,
      ``seeds``, ``train_time_s``, ``wall_time_s``;
    - ``scales[scale]['differences'][method][budget]``: TrAct - plain, paired
      (see :func:`paired_difference`; ``first_better`` counts TrAct wins);
    - ``scales[scale]['speedups'][method]``: one
      :func:`~tract_experiment.speedup.speedup_at` per TrAct budget;
    - ``scale_differences['<scale> - <first scale>'][method][budget]``: each
      input scale against the first one listed, paired by seed;
    - ``lines``: the sentences printed under the tables.
  """
  scales: Dict[str, Any] = {}
  lines: List[str] = []
  for scale in config.input_scales:
    table: Dict[int, Dict[str, Any]] = {}
    for budget in config.epochs:
      row = {}
      for method in config.methods:
        chosen = [r for r in runs if r.input_scale == scale and r.method == method
                  and r.budget == budget]
        if chosen:
          mean, std = mean_std([r.final_accuracy for r in chosen])
          row[method] = dict(mean=mean, std=std, seeds=len(chosen),
                             train_time_s=float(np.mean([r.train_time_s for r in chosen])),
                             wall_time_s=float(np.mean([r.wall_time_s for r in chosen])))
      table[budget] = row
    differences: Dict[str, Dict[int, Any]] = {}
    found: Dict[str, List[Dict[str, Any]]] = {}
    suffix = f' ({scale} input)' if len(config.input_scales) > 1 else ''
    if config.paired:
      plain_curves = {
          seed: [_by_seed(runs, scale, BASELINE, b).get(seed) for b in config.epochs]
          for seed in config.seed_list}
      plain_curves = {s: c for s, c in plain_curves.items() if None not in c}
      for method in config.tract_methods:
        label = METHOD_LABELS[method]
        differences[method] = {
            b: paired_difference(_by_seed(runs, scale, method, b),
                                 _by_seed(runs, scale, BASELINE, b)) for b in config.epochs}
        lines.append(f'{label} - plain test accuracy{suffix}: ' + '; '.join(
            f'{b} ep {_difference_text(d)}' for b, d in differences[method].items()
            if d['seeds']) + '.')
        by_budget = {b: _by_seed(runs, scale, method, b) for b in config.epochs}
        found[method] = speedup_lib.speedups(config.epochs, plain_curves, by_budget, label)
        lines.extend(f'Speedup{suffix}: {entry["text"]}' for entry in found[method])
      reason = speedup_lib.no_speedup_text(config.epochs)
      if reason:
        lines.append(reason)
    scales[scale] = dict(table=table, differences=differences, speedups=found)
  scale_differences: Dict[str, Dict[str, Dict[int, Any]]] = {}
  reference, *others = config.input_scales
  for scale in others:  # each scale against the first one listed
    for method in config.methods:
      differences = {
          b: paired_difference(_by_seed(runs, scale, method, b),
                               _by_seed(runs, reference, method, b))
          for b in config.epochs}
      scale_differences.setdefault(f'{scale} - {reference}', {})[method] = differences
      lines.append(f'{METHOD_LABELS[method]}, {scale} - {reference} input (paired by seed): '
                   + '; '.join(f'{b} ep {_difference_text(d)}'
                               for b, d in differences.items()) + '.')
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
  """One row per budget and method (per input scale): accuracy, paired difference.

  Example:
    >>> from tract_experiment import cli, report, training
    >>> config = cli.parse_config(['--dataset', 'digits', '--epochs', '1', '--seeds', '1'])
    >>> runs = [training.Run(m, 0, 1, [a], [1.0], [1.0], a, 2.0, 0.1, 2.1, 10)
    ...         for m, a in (('plain', 0.80), ('tract', 0.82))]
    >>> table = report.format_table(report.summarize(runs, config), config)
    >>> print(' '.join(table.splitlines()[0].split()))  # the header, spaces squeezed
    budget | method | test acc (mean +- std) | - plain (paired) | verdict | train s
    >>> print(table.splitlines()[3])
    1 ep   | TrAct  | 0.8200                 | +0.0200 (1/1 seeds up) | noise unknown (1 seed) | 2.0
  """
  blocks = []
  for scale, scale_summary in summary['scales'].items():
    rows = [['budget', 'method', 'test acc (mean +- std)', '- plain (paired)', 'verdict',
             'train s']]
    for budget, row in scale_summary['table'].items():
      for method in config.methods:
        if method not in row:
          continue
        stats = row[method]
        line = [f'{budget} ep', METHOD_LABELS[method],
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


def format_scale_grid(summary: Dict[str, Any], config: Config) -> str:
  """Rows = input scale, columns = methods, one table per budget.

  Each cell is the mean +- std test accuracy over seeds; TrAct cells add the
  paired difference to plain of the same scale. Empty when only one scale ran.
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
        difference = scale_summary['differences'].get(method, {}).get(budget)
        if difference and difference['seeds']:
          cell += f' (vs plain {difference["mean"]:+.4f}, {verdict(difference)})'
        line.append(cell)
      rows.append(line)
    seeds = config.seeds
    blocks.append(f'test accuracy at {budget} ep, mean +- std over {seeds} seed(s):\n'
                  + _align(rows))
  return '\n\n'.join(blocks)


def title(config: Config, train_examples: int, test_examples: int) -> str:
  """One line naming the dataset, model, sizes, optimizer and lambda."""
  optimizer = (f'SGD m={config.momentum}' if config.optimizer == 'sgd' else 'AdamW')
  scales = '/'.join(config.input_scales)
  return (f'{config.dataset} ({scales} input), {config.model}, {train_examples} train / '
          f'{test_examples} test, {optimizer} lr {config.lr:g} cosine, '
          f'batch {config.batch_size}, lam {config.lam:g}, {config.seeds} seed(s)'
          + (f', TrAct statistic refreshed every {config.refresh_every} steps'
             if config.refresh_every > 1 else ''))


_COLORS = {'plain': 'tab:gray', 'tract': 'tab:blue', 'tract_rel': 'tab:orange'}


def _annotate_speedups(axes, entries: Sequence[Dict[str, Any]], color: str,
                       budgets: np.ndarray) -> None:
  """Dashed line from TrAct@k to where plain's mean curve reaches it, with x/k."""
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
    elif entry['kind'] == speedup_lib.BEYOND and k < budgets.max():
      axes.annotate(f'> {entry["bound"]:.2f}x (beyond plain@{budgets.max():g})',
                    (k, accuracy), textcoords='offset points', xytext=(4, 4), fontsize=7,
                    color=color)


def plot(summary: Dict[str, Any], runs: Sequence[Run], config: Config, title_text: str,
         path: str) -> None:
  """Test accuracy against the epoch budget, one panel per input scale.

  Mean line, +-std band and seeds as dots per method; for each TrAct budget,
  a dashed line to where plain's interpolated mean curve reaches the same
  accuracy, labelled with the speedup factor (and its seed spread).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  panels = len(config.input_scales)
  figure, all_axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.6), squeeze=False)
  budgets = np.asarray(config.epochs)
  for axes, scale in zip(all_axes[0], config.input_scales):
    scale_summary = summary['scales'][scale]
    for method in config.methods:
      points = [(b, scale_summary['table'][b][method]) for b in config.epochs
                if method in scale_summary['table'][b]]
      if not points:
        continue
      x = np.asarray([b for b, _ in points])
      mean = np.asarray([s['mean'] for _, s in points])
      std = np.asarray([s['std'] for _, s in points])
      label = METHOD_LABELS[method] + (f' (lam={config.lam:g})' if method != BASELINE else '')
      axes.plot(x, mean, marker='o', color=_COLORS[method], label=label)
      axes.fill_between(x, mean - std, mean + std, color=_COLORS[method], alpha=0.2,
                        linewidth=0)
      seeds = [(r.budget, r.final_accuracy) for r in runs
               if r.method == method and r.input_scale == scale]
      axes.scatter(*zip(*seeds), s=10, color=_COLORS[method], alpha=0.5)
      _annotate_speedups(axes, scale_summary['speedups'].get(method, []), _COLORS[method],
                         budgets)
    if len(budgets) > 1 and budgets.max() / budgets.min() >= 4:
      axes.set_xscale('log', base=2)
    axes.set_xticks(budgets, [str(b) for b in budgets])
    axes.set_xlabel('epoch budget (each a full run with its own cosine schedule)')
    axes.set_ylabel('test accuracy')
    axes.set_title(f'{scale} input', fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
  # wrapped to the figure's width (about 16 characters per inch at this size)
  width = int(16 * 6.4 * panels)
  lines = textwrap.wrap('Test accuracy vs epoch budget: mean \u00b1 std over seeds; dashed: '
                        'TrAct@k ep matches plain@x ep (x/k)', width)
  lines += textwrap.wrap(title_text, width)
  figure.suptitle('\n'.join(lines), fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
