"""Tests of the comparison's summary, tables and plot, on synthetic runs."""

import pytest

from tract_experiment import cli
from tract_experiment import report
from tract_experiment.training import Run

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _runs(accuracies, input_scale='standardized'):
  """Runs from {(method, budget): [accuracy per seed]}."""
  runs = []
  for (method, budget), values in accuracies.items():
    for seed, accuracy in enumerate(values):
      runs.append(Run(method=method, seed=seed, budget=budget,
                      test_accuracy_per_epoch=[accuracy], test_loss_per_epoch=[1.0],
                      train_loss_per_epoch=[1.0], final_accuracy=accuracy, train_time_s=1.0,
                      eval_time_s=0.1, wall_time_s=1.1, steps=1, input_scale=input_scale))
  return runs


def _config(epochs, *extra):
  return cli.parse_config(['--epochs', ','.join(map(str, epochs)), '--seeds', '3', *extra])


ACCURACIES = {('plain', 1): [0.80, 0.81, 0.79], ('plain', 2): [0.84, 0.85, 0.83],
              ('plain', 3): [0.86, 0.87, 0.85], ('tract', 1): [0.84, 0.86, 0.83],
              ('tract', 2): [0.86, 0.86, 0.84], ('tract', 3): [0.88, 0.89, 0.87]}


def test_summary_table_differences_and_speedups():
  config = _config((1, 2, 3))
  summary = report.summarize(_runs(ACCURACIES), config)
  scale = summary['scales']['standardized']
  assert scale['table'][2]['plain']['mean'] == pytest.approx(0.84)
  assert scale['table'][2]['plain']['std'] == pytest.approx(0.01)
  difference = scale['differences']['tract'][1]
  assert difference['mean'] == pytest.approx(0.0433333) and difference['first_better'] == 3
  assert difference['beyond_noise']
  first, second, third = scale['speedups']['tract']
  assert first['factor'] == pytest.approx(13 / 6) and first['verdict'] == 'beyond seed noise'
  assert third['kind'] == 'beyond' and third['factor'] is None
  assert summary['lines'][0].startswith(
      'TrAct - plain test accuracy: 1 ep +0.0433 (3/3 seeds up, beyond seed noise); 2 ep')
  assert summary['lines'][1] == (
      'Speedup: TrAct@1 ep (0.8433) matches plain@2.17 ep: 2.17x; per seed 2.17x +- 0.29 '
      '(3/3 seeds interpolated); beyond seed noise.')
  assert summary['lines'][3].startswith(
      'Speedup: TrAct@3 ep (0.8800) exceeds plain at every budget run (up to 3 ep): > 1.00x '
      '(not extrapolated)')
  assert summary['scale_differences'] == {}
  table = report.format_table(summary, config)
  row = [line for line in table.splitlines() if line.startswith('1 ep   | TrAct')][0]
  assert [cell.strip() for cell in row.split(' | ')] == [
      '1 ep', 'TrAct', '0.8433 +- 0.0153', '+0.0433 +- 0.0058 (3/3 seeds up)',
      'beyond seed noise', '1.0']
  assert report.format_scale_grid(summary, config) == ''


def test_within_noise_and_one_budget():
  config = _config((1,))
  runs = _runs({('plain', 1): [0.80, 0.82, 0.78], ('tract', 1): [0.81, 0.81, 0.79]})
  summary = report.summarize(runs, config)
  assert not summary['scales']['standardized']['differences']['tract'][1]['beyond_noise']
  assert summary['scales']['standardized']['speedups']['tract'] == []
  assert '1 ep +0.0033 (2/3 seeds up, within seed noise)' in summary['lines'][0]
  assert 'speedup needs plain\'s accuracy at two budgets' in summary['lines'][-1]
  assert 'within seed noise' in report.format_table(summary, config)


def test_scale_grid_and_cross_scale_differences():
  config = _config((1, 2, 3), '--input-scale', 'standardized,raw', '--method', 'all')
  accuracies = dict(ACCURACIES)
  accuracies.update({('tract_rel', b): [a + 0.001 for a in accuracies[('tract', b)]]
                     for b in (1, 2, 3)})
  raw = {key: [a - 0.01 for a in values] for key, values in accuracies.items()}
  raw[('tract_rel', 2)] = list(accuracies[('tract_rel', 2)])
  runs = _runs(accuracies) + _runs(raw, 'raw')
  summary = report.summarize(runs, config)
  assert set(summary['scales']) == {'standardized', 'raw'}
  assert set(summary['scales']['raw']['speedups']) == {'tract', 'tract_rel'}
  shift = summary['scale_differences']['raw - standardized']['plain'][1]
  assert shift['mean'] == pytest.approx(-0.01) and shift['first_better'] == 0
  same = summary['scale_differences']['raw - standardized']['tract_rel'][2]
  assert same['mean'] == pytest.approx(0.0) and not same['beyond_noise']
  assert any(line.startswith('TrAct rel-lam, raw - standardized input (paired by seed): '
                             '1 ep -0.0100') for line in summary['lines'])
  assert any(line.startswith('Speedup (raw input): TrAct rel-lam@1 ep')
             for line in summary['lines'])
  grid = report.format_scale_grid(summary, config)
  lines = grid.splitlines()
  assert lines[0] == 'test accuracy at 1 ep, mean +- std over 3 seed(s):'
  assert [cell.strip() for cell in lines[1].split(' | ')] == [
      'input scale', 'plain', 'TrAct', 'TrAct rel-lam']
  assert lines[3].startswith('standardized | 0.8000 +- 0.0100 | 0.8433 +- 0.0153 (vs plain '
                             '+0.0433, beyond seed noise)')
  assert lines[4].startswith('raw          | 0.7900 +- 0.0100 |')
  assert 'test accuracy at 3 ep' in grid
  table = report.format_table(summary, config)
  assert 'input scale: standardized' in table and 'input scale: raw' in table


def test_plot_one_method_and_two_scales(tmp_path):
  config = cli.parse_config(['--epochs', '1,2', '--method', 'tract'])
  runs = _runs({('tract', 1): [0.8], ('tract', 2): [0.85]})
  summary = report.summarize(runs, config)
  assert summary['lines'] == []
  path = tmp_path / 'one.png'
  report.plot(summary, runs, config, 'title', str(path))
  assert path.read_bytes()[:8] == PNG_SIGNATURE
  config = _config((1, 2, 3), '--input-scale', 'standardized,raw')
  runs = _runs(ACCURACIES) + _runs(ACCURACIES, 'raw')
  path = tmp_path / 'two.png'
  report.plot(report.summarize(runs, config), runs, config, 'title', str(path))
  assert path.read_bytes()[:8] == PNG_SIGNATURE
