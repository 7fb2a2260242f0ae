"""Tests of the tract-optax-train program: flags, a smoke run, the summary logic."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tract_optax import data as data_lib
from tract_optax import train

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """One small paired run on digits, shared by the tests that inspect it."""
  out = tmp_path_factory.mktemp('run')
  argv = ['--dataset', 'digits', '--train-examples', '320', '--test-examples', '150',
          '--epochs', '1', '--seeds', '1', '--batch-size', '32', '--method', 'both',
          '--out', str(out), '--no-progress']
  assert train.main(argv) is None  # console scripts exit with main()'s return value
  with open(out / 'results.json') as handle:
    return out, json.load(handle)


def test_smoke_run_writes_results_json(smoke_run):
  out, returned = smoke_run
  with open(out / 'results.json') as handle:
    results = json.load(handle)
  assert results['config']['dataset'] == 'digits'
  assert results['config']['methods'] == ['plain', 'tract']
  assert results['config']['epochs'] == [1]
  assert results['train_examples'] == 320 and results['test_examples'] == 150
  assert {'jax', 'flax', 'optax', 'device', 'platform'} <= set(results['environment'])
  assert len(results['runs']) == 2
  for run in results['runs']:
    assert {'config', 'seed', 'method', 'budget', 'test_accuracy_per_epoch', 'final_accuracy',
            'wall_time_s', 'train_time_s', 'jax_version', 'device'} <= set(run)
    assert run['config'] == results['config']
    assert run['budget'] == 1 and run['seed'] == 0
    assert len(run['test_accuracy_per_epoch']) == 1
    assert run['final_accuracy'] == run['test_accuracy_per_epoch'][-1]
    assert 0.0 <= run['final_accuracy'] <= 1.0
    assert run['wall_time_s'] > 0 and run['steps'] == 10  # 320 // 32
    assert all(np.isfinite(run['train_loss_per_epoch']))
  assert sorted(run['method'] for run in results['runs']) == ['plain', 'tract']
  row = results['summary']['table']['1']
  assert set(row) == {'plain', 'tract', 'difference'}
  assert row['difference']['seeds'] == 1
  assert 'text' in results['summary']['speedup']
  assert returned['table'] == results['table']
  assert 'TrAct - plain (paired)' in results['table'] and '1 ep' in results['table']


def test_smoke_run_writes_png(smoke_run):
  out, _ = smoke_run
  path = out / 'accuracy_vs_budget.png'
  content = path.read_bytes()
  assert len(content) > 1000
  assert content.startswith(PNG_SIGNATURE)


def test_paired_runs_share_initialisation(smoke_run):
  """Same seed, same initial parameters for both methods (the data order depends
  on (seed, epoch) only)."""
  _, results = smoke_run
  plain, tract = sorted(results['runs'], key=lambda run: run['method'])
  assert plain['steps'] == tract['steps'] and plain['seed'] == tract['seed']
  config = train.parse_config(['--dataset', 'digits'])
  model = train.models_lib.create_model('cnn', 10)
  states = [train.create_state(model, train.make_optimizer(config, method), (8, 8, 1), seed=3)
            for method in ('plain', 'tract')]
  for a, b in zip(jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params)):
    np.testing.assert_array_equal(a, b)
  other = train.create_state(model, train.make_optimizer(config, 'plain'), (8, 8, 1), seed=4)
  assert not np.array_equal(other.params['stem']['kernel'], states[0].params['stem']['kernel'])


def test_help(capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main(['--help'])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for flag in ('--dataset', '--model', '--method', '--lam', '--epochs', '--seeds', '--preset',
               '--train-examples', '--test-examples', '--out', '--optimizer', '--lr',
               '--weight-decay', '--warmup-epochs', '--batch-size', '--data-dir'):
    assert flag in text


def test_module_entry_point_help():
  result = subprocess.run([sys.executable, '-m', 'tract_optax.train', '--help'],
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert 'tract-optax-train' in result.stdout


@pytest.mark.parametrize('argv, message', [
    (['--epochs', '0'], 'budgets >= 1'),
    (['--epochs', 'one'], 'comma-separated whole epochs'),
    (['--lam', '0'], 'lam must be a finite number > 0'),
    (['--train-examples', '-5'], 'positive number of examples'),
    (['--model', 'vgg'], "invalid choice: 'vgg'"),
    (['--seeds', '0'], '--seeds must be >= 1'),
])
def test_bad_flags(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.parse_config(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_presets_and_overrides():
  default = train.parse_config([])
  assert default.dataset == 'fashion_mnist' and default.model == 'cnn'
  assert default.methods == ('plain', 'tract') and default.lam == 0.05
  assert default.lr == 0.2 and default.epochs == (1, 2) and default.seeds == 3
  assert default.train_examples == 10000 and default.test_examples is None
  assert default.crop_pad == 0 and not default.flip
  paper = train.parse_config(['--preset', 'paper'])
  assert paper.model == 'resnet18' and paper.epochs == (1, 2, 4, 8) and paper.seeds == 4
  assert paper.train_examples is None and paper.lr == 0.08 and paper.optimizer == 'sgd'
  assert paper.lam == 0.1
  assert paper.crop_pad == 2 and paper.flip
  custom = train.parse_config(['--preset', 'paper', '--seeds', '2', '--train-examples', 'all',
                               '--optimizer', 'adam', '--method', 'tract', '--augment', 'none'])
  assert custom.seeds == 2 and custom.train_examples is None and custom.lr == 1e-3
  assert custom.methods == ('tract',) and custom.crop_pad == 0 and not custom.flip
  assert train.parse_config(['--dataset', 'digits']).flip is False


def test_missing_dataset_exits_with_explanation(tmp_path, monkeypatch):
  monkeypatch.delenv(data_lib.DATA_ENV_VAR, raising=False)
  monkeypatch.setattr(data_lib, 'SYSTEM_FASHION_MNIST_DIRS', ())

  def refuse(*args, **kwargs):
    raise OSError('offline (test)')

  monkeypatch.setattr(data_lib.urllib.request, 'urlopen', refuse)
  with pytest.raises(SystemExit, match='apt-get install dataset-fashion-mnist'):
    train.main(['--data-dir', str(tmp_path / 'none'), '--out', str(tmp_path / 'out'),
                '--no-progress'])


def test_cosine_learning_rate_schedule():
  values = [float(train.cosine_learning_rate(step, 0.08, 100, 0)) for step in (0, 50, 100)]
  np.testing.assert_allclose(values, [0.08, 0.04, 0.0], atol=1e-7)
  warm = [float(train.cosine_learning_rate(step, 1.0, 20, 10)) for step in (0, 5, 10)]
  np.testing.assert_allclose(warm, [0.0, 0.5, 1.0], atol=1e-7)


# ---------------------------------------------------------- the summary logic


def _runs(accuracies):
  """Runs from {(method, budget): [accuracy per seed]}."""
  runs = []
  for (method, budget), values in accuracies.items():
    for seed, accuracy in enumerate(values):
      runs.append(train.Run(method=method, seed=seed, budget=budget,
                            test_accuracy_per_epoch=[accuracy], test_loss_per_epoch=[1.0],
                            train_loss_per_epoch=[1.0], final_accuracy=accuracy,
                            train_time_s=1.0, eval_time_s=0.1, wall_time_s=1.1, steps=1))
  return runs


def _config(epochs):
  return train.parse_config(['--epochs', ','.join(map(str, epochs)), '--seeds', '3'])


def test_speedup_reached_earlier():
  config = _config((1, 2, 4))
  runs = _runs({('plain', 1): [0.80, 0.81, 0.79], ('plain', 2): [0.84, 0.85, 0.83],
                ('plain', 4): [0.87, 0.88, 0.86], ('tract', 1): [0.82, 0.83, 0.81],
                ('tract', 2): [0.88, 0.89, 0.87], ('tract', 4): [0.89, 0.90, 0.88]})
  summary = train.summarize(runs, config)
  assert summary['speedup']['budget'] == 2 and summary['speedup']['factor'] == 2.0
  assert 'TrAct reaches plain@4 ep (0.8700) at 2 ep (0.8800): 2.0x fewer epochs' in (
      summary['speedup']['text'])
  assert summary['gain'].startswith(
      'TrAct - plain test accuracy: 1 ep +0.0200 (3/3 seeds up, beyond seed noise); 2 ep')
  difference = summary['table'][1]['difference']
  assert difference['mean'] == pytest.approx(0.02) and difference['tract_better'] == 3
  assert difference['beyond_noise']
  table = train.format_table(summary, config)
  assert 'beyond seed noise' in table and '+0.0200 +- 0.0000 (3/3 seeds up)' in table


def test_speedup_not_reached_and_noise():
  config = _config((1, 2))
  runs = _runs({('plain', 1): [0.80, 0.82, 0.78], ('plain', 2): [0.85, 0.86, 0.84],
                ('tract', 1): [0.81, 0.81, 0.79], ('tract', 2): [0.84, 0.87, 0.83]})
  summary = train.summarize(runs, config)
  assert summary['speedup']['factor'] is None
  assert summary['speedup']['text'].startswith('TrAct does not reach plain@2 ep (0.8500)')
  assert not summary['table'][2]['difference']['beyond_noise']
  assert '2 ep -0.0033 (1/3 seeds up, within seed noise)' in summary['gain']
  assert 'within seed noise' in train.format_table(summary, config)


def test_speedup_same_budget_is_tentative():
  config = _config((1, 2))
  runs = _runs({('plain', 1): [0.80, 0.80, 0.80], ('plain', 2): [0.85, 0.86, 0.84],
                ('tract', 1): [0.80, 0.80, 0.80], ('tract', 2): [0.855, 0.865, 0.845]})
  text = train.summarize(runs, config)['speedup']['text']
  assert 'only at the same budget' in text and 'tentative' in text


def test_plot_with_one_method(tmp_path):
  config = train.parse_config(['--epochs', '1,2', '--method', 'tract'])
  runs = _runs({('tract', 1): [0.8], ('tract', 2): [0.85]})
  summary = train.summarize(runs, config)
  assert 'Only one method' in summary['speedup']['text']
  path = os.path.join(tmp_path, 'plot.png')
  train.plot(summary, runs, config, 'title', path)
  with open(path, 'rb') as handle:
    assert handle.read(8) == PNG_SIGNATURE


def test_amortized_train_step_refreshes_every_k_steps():
  """--refresh-every k: the statistic is captured on steps 0, k, 2k, ... only."""
  config = train.parse_config(['--dataset', 'digits', '--refresh-every', '3'])
  assert config.refresh_every == 3
  model = train.models_lib.create_model('cnn', 10)
  tx = train.make_optimizer(config, 'tract')
  state = train.create_state(model, tx, (8, 8, 1), seed=0)
  step = train.make_train_step(model, 'tract', config.lr, config.refresh_every)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, size=16).astype(np.int32)
  total, warmup = jax.numpy.asarray(10), jax.numpy.asarray(0)
  kept = []
  for index in range(5):
    state, metrics = step(state, images * (1 + index), labels, total, warmup,
                          step_index=index)
    tract_state = state.opt_state[0]
    kept.append(np.asarray(tract_state.stats_cache['stem'].moment))
    assert np.isfinite(float(metrics['loss']))
  assert int(tract_state.count) == 5 and int(tract_state.refreshes) == 2
  np.testing.assert_array_equal(kept[0], kept[1])  # reused on steps 1 and 2
  np.testing.assert_array_equal(kept[1], kept[2])
  assert not np.allclose(kept[2], kept[3])          # refreshed on step 3 (scaled batch)
  with pytest.raises(SystemExit):
    train.parse_config(['--refresh-every', '0'])
