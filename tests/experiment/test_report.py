"""Tests of the comparison's summary: lr choice on validation, tables, the plot (synthetic runs)."""

import pytest

from tract_experiment import cli
from tract_experiment import report
from tract_experiment.training import Run

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _runs(accuracies, input_scale='standardized', lr=0.1, val_shift=0.0):
  """Runs from {(method, budget): [test accuracy per seed]}; validation = test + val_shift."""
  runs = []
  for (method, budget), values in accuracies.items():
    for seed, accuracy in enumerate(values):
      runs.append(Run(method=method, seed=seed, budget=budget, lr=lr,
                      val_accuracy=accuracy + val_shift, test_accuracy=accuracy,
                      val_loss=1.0, test_loss=1.0, train_loss_per_epoch=[1.0] * budget,
                      train_time_s=1.0, eval_time_s=0.1, wall_time_s=1.1, steps=1,
                      input_scale=input_scale))
  return runs


def _config(epochs, *extra, lrs='0.1'):
  return cli.parse_config(['--epochs', ','.join(map(str, epochs)), '--seeds', '3',
                           '--lr', lrs, *extra])


ACCURACIES = {('plain', 1): [0.80, 0.81, 0.79], ('plain', 2): [0.84, 0.85, 0.83],
              ('plain', 3): [0.86, 0.87, 0.85], ('tract', 1): [0.84, 0.86, 0.83],
              ('tract', 2): [0.86, 0.86, 0.84], ('tract', 3): [0.88, 0.89, 0.87]}


def _shifted(accuracies, delta):
  return {key: [a + delta for a in values] for key, values in accuracies.items()}


def test_one_lr_is_a_shared_lr_comparison():
  config = _config((1, 2, 3))
  assert not config.tuned
  summary = report.summarize(_runs(ACCURACIES), config)
  scale = summary['scales']['standardized']
  assert scale['table'][2]['plain']['mean'] == pytest.approx(0.84)
  assert scale['table'][2]['plain']['std'] == pytest.approx(0.01)
  assert scale['table'][2]['plain']['lr'] == 0.1
  difference = scale['differences']['tract'][1]
  assert difference['mean'] == pytest.approx(0.0433333) and difference['first_better'] == 3
  assert difference['beyond_noise']
  first, _, third = scale['speedups']['tract']
  assert first['factor'] == pytest.approx(13 / 6) and first['verdict'] == 'beyond seed noise'
  assert third['kind'] == 'beyond' and third['factor'] is None
  assert scale['shared'] == {'0.1': {'differences': scale['differences'],
                                     'speedups': scale['speedups']}}
  label = 'Shared lr 0.1 (one lr given: nothing tuned)'
  assert summary['lines'][0].startswith(
      f'{label}: TrAct - plain test accuracy: 1 ep +0.0433 (3/3 seeds up, beyond seed noise)')
  assert summary['lines'][1] == (
      f'{label} speedup: TrAct@1 ep (0.8433) matches plain@2.17 ep: 2.17x; per seed 2.17x '
      '+- 0.29 (3/3 seeds interpolated); beyond seed noise.')
  table = report.format_table(summary, config)
  row = [line for line in table.splitlines() if line.startswith('1 ep   | TrAct')][0]
  assert [cell.strip() for cell in row.split(' | ')] == [
      '1 ep', 'TrAct', '0.1', '0.8433', '0.8433 +- 0.0153', '+0.0433 +- 0.0058 (3/3 seeds up)',
      'beyond seed noise', '1.0']
  assert report.format_lr_grid(summary, config) == ''
  assert report.format_scale_grid(summary, config) == ''


def test_each_method_gets_its_own_lr_chosen_on_validation():
  """plain is best at 0.03, TrAct at 0.1 (on validation); the tuned table pairs those."""
  config = _config((1, 2, 3), lrs='0.03,0.1,0.3')
  plain_low = {k: v for k, v in ACCURACIES.items() if k[0] == 'plain'}
  tract = {k: v for k, v in ACCURACIES.items() if k[0] == 'tract'}
  runs = (_runs(plain_low, lr=0.03) + _runs(_shifted(plain_low, -0.05), lr=0.1)
          + _runs(_shifted(plain_low, -0.2), lr=0.3)
          + _runs(_shifted(tract, -0.03), lr=0.03) + _runs(tract, lr=0.1)
          + _runs(_shifted(tract, -0.01), lr=0.3))
  summary = report.summarize(runs, config)
  scale = summary['scales']['standardized']
  for budget in (1, 2, 3):
    assert scale['choices']['plain'][budget]['lr'] == 0.03
    assert scale['choices']['tract'][budget]['lr'] == 0.1
    assert scale['table'][budget]['plain']['lr'] == 0.03
  assert scale['choices']['tract'][1]['val_by_lr'] == pytest.approx(
      {'0.03': 0.8133333, '0.1': 0.8433333, '0.3': 0.8333333})
  # best vs best equals the one-lr comparison of plain@0.03 and TrAct@0.1
  assert scale['differences']['tract'][1]['mean'] == pytest.approx(0.0433333)
  assert scale['speedups']['tract'][0]['factor'] == pytest.approx(13 / 6)
  # the shared-lr comparisons are kept, each labelled
  assert set(scale['shared']) == {'0.03', '0.1', '0.3'}
  assert scale['shared']['0.1']['differences']['tract'][1]['mean'] == pytest.approx(0.0933333)
  assert scale['shared']['0.03']['differences']['tract'][1]['mean'] == pytest.approx(0.04 / 3)
  assert any(line.startswith('Tuned: TrAct - plain test accuracy: 1 ep +0.0433')
             for line in summary['lines'])
  assert any(line.startswith('Shared lr 0.1 (not tuned): TrAct - plain test accuracy: 1 ep '
                             '+0.0933') for line in summary['lines'])
  grid = report.format_lr_grid(summary, config).splitlines()
  assert grid[0].startswith('Learning-rate grid: test accuracy mean +- std over seeds')
  row = [line for line in grid if line.startswith('1 ep   | plain')][0]
  cells = [cell.strip() for cell in row.split(' | ')]
  assert cells[2] == '0.8000 +- 0.0100 (0.8000) *'
  assert cells[3] == '0.7500 +- 0.0100 (0.7500)'
  header = report.format_table(summary, config).splitlines()[0]
  assert 'lr (chosen on val)' in header


def test_choice_reads_validation_never_test():
  """Test accuracy that favours another lr (or is scrambled) changes no choice."""
  config = _config((1, 2), lrs='0.1,0.3')
  low = {('plain', 1): [0.80, 0.81, 0.79], ('plain', 2): [0.84, 0.85, 0.83],
         ('tract', 1): [0.82, 0.83, 0.81], ('tract', 2): [0.85, 0.86, 0.84]}
  # lr 0.3: better on validation (+0.02), far worse on test (-0.3)
  high = _runs(_shifted(low, -0.3), lr=0.3, val_shift=0.32)
  runs = _runs(low, lr=0.1) + high
  choices = report.summarize(runs, config)['scales']['standardized']['choices']
  assert all(choices[m][b]['lr'] == 0.3 for m in ('plain', 'tract') for b in (1, 2))
  for run in runs:  # scramble every test accuracy: the choices stay
    run.test_accuracy = 1.0 - run.test_accuracy
  again = report.summarize(runs, config)['scales']['standardized']['choices']
  assert again == choices
  assert report.choose_lr(runs, 'standardized', 'plain', 1, (0.1, 0.3))['lr'] == 0.3


def test_choice_ties_go_to_the_smaller_lr_and_missing_cells():
  config = _config((1,), lrs='0.1,0.3')
  runs = _runs({('plain', 1): [0.8, 0.8, 0.8]}, lr=0.1) + _runs(
      {('plain', 1): [0.8, 0.8, 0.8]}, lr=0.3)
  assert report.choose_lr(runs, 'standardized', 'plain', 1, config.lrs)['lr'] == 0.1
  assert report.choose_lr(runs, 'standardized', 'tract', 1, config.lrs) == dict(
      lr=None, val_mean=None, val_by_lr={})


def test_trials_text_counts_equal_trials():
  config = _config((1, 2, 3), lrs='0.03,0.1,0.3')
  text = report.trials_text(config, 2000, 5000)
  assert text.startswith('Trials: each method (plain, TrAct) got the same 27 runs: 3 lrs '
                         '(0.03, 0.1, 0.3) per budget, chosen on validation, x 3 budgets x 3 '
                         'seed(s); lam 0.1 fixed for TrAct (not tuned).')
  assert '2000 examples carved from the training data' in text
  assert 'test: 5000 examples, used only to report the choices' in text
  assert 'nothing tuned' in report.trials_text(_config((1,)), 10, 10)


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
  raw = _shifted(accuracies, -0.01)
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
  assert any(line.startswith('Shared lr 0.1 (one lr given: nothing tuned) (raw input) '
                             'speedup: TrAct rel-lam@1 ep') for line in summary['lines'])
  lines = report.format_scale_grid(summary, config).splitlines()
  assert lines[0] == 'test accuracy at 1 ep, mean +- std over 3 seed(s):'
  assert [cell.strip() for cell in lines[1].split(' | ')] == [
      'input scale', 'plain', 'TrAct', 'TrAct rel-lam']
  assert lines[3].startswith('standardized | 0.8000 +- 0.0100 | 0.8433 +- 0.0153 (vs plain '
                             '+0.0433, beyond seed noise)')
  assert lines[4].startswith('raw          | 0.7900 +- 0.0100 |')
  table = report.format_table(summary, config)
  assert 'input scale: standardized' in table and 'input scale: raw' in table


def test_plot_heading_explains_only_what_is_drawn():
  shared = _config((1, 2))
  assert report.plot_heading(shared, 0) == (
      'Test accuracy vs epoch budget (mean \u00b1 std over seeds).')
  assert 'dashed: TrAct@k ep matches plain@x ep' in report.plot_heading(shared, 1)
  tuned = _config((1, 2), lrs='0.1,0.3')
  heading = report.plot_heading(tuned, 0)
  assert 'chosen on validation' in heading and 'Right: accuracy vs peak lr' in heading
  assert 'TrAct@k' not in heading and 'standardized' not in heading
  title = report.title(tuned, 100, 50, 20)
  assert title.count('standardized') == 1 and '100 train / 20 val / 50 test' in title
  assert 'lr grid 0.1,0.3' in title


def test_plot_one_method_two_scales_and_lr_grid(tmp_path):
  config = cli.parse_config(['--epochs', '1,2', '--method', 'tract', '--lr', '0.1'])
  runs = _runs({('tract', 1): [0.8], ('tract', 2): [0.85]})
  summary = report.summarize(runs, config)
  assert summary['lines'] == []
  path = tmp_path / 'one.png'
  report.plot(summary, runs, config, 'title', str(path))
  assert path.read_bytes()[:8] == PNG_SIGNATURE
  config = _config((1, 2, 3), '--input-scale', 'standardized,raw', lrs='0.1,0.3')
  runs = []
  for lr, delta in ((0.1, 0.0), (0.3, -0.02)):
    runs += _runs(_shifted(ACCURACIES, delta), lr=lr)
    runs += _runs(_shifted(ACCURACIES, delta), 'raw', lr=lr)
  path = tmp_path / 'two.png'
  report.plot(report.summarize(runs, config), runs, config, 'title', str(path))
  assert path.read_bytes()[:8] == PNG_SIGNATURE
