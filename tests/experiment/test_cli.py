"""Tests of the tract-optax-train program: a smoke run, every flag check, the entry points."""

import contextlib
import io
import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import tract_optax
from tract_experiment import cli
from tract_experiment import comparison
from tract_experiment import data as data_lib
from tract_experiment import models as models_lib
from tract_experiment import training

ROOT = pathlib.Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """One small paired run on digits at both input scales and two budgets."""
  out = tmp_path_factory.mktemp('run')
  argv = ['--dataset', 'digits', '--train-examples', '160', '--test-examples', '100',
          '--epochs', '1,2', '--seeds', '1', '--batch-size', '32', '--method', 'both',
          '--input-scale', 'standardized,raw', '--out', str(out), '--no-progress']
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert cli.main(argv) is None  # console scripts exit with main()'s value
  with open(out / 'results.json') as handle:
    return out, json.load(handle), printed.getvalue()


def test_smoke_run_writes_results_json(smoke_run):
  out, results, _ = smoke_run
  assert results['config']['dataset'] == 'digits'
  assert results['config']['methods'] == ['plain', 'tract']
  assert results['config']['input_scales'] == ['standardized', 'raw']
  assert results['config']['epochs'] == [1, 2]
  assert results['train_examples'] == 160 and results['test_examples'] == 100
  assert {'jax', 'flax', 'optax', 'device', 'platform'} <= set(results['environment'])
  assert len(results['runs']) == 8  # 2 scales x 2 budgets x 2 methods x 1 seed
  for run in results['runs']:
    assert {'config', 'seed', 'method', 'budget', 'input_scale', 'test_accuracy_per_epoch',
            'final_accuracy', 'wall_time_s', 'train_time_s', 'jax_version', 'device'} <= set(run)
    assert run['config'] == results['config'] and run['seed'] == 0
    assert len(run['test_accuracy_per_epoch']) == run['budget']
    assert run['final_accuracy'] == run['test_accuracy_per_epoch'][-1]
    assert 0.0 <= run['final_accuracy'] <= 1.0
    assert run['wall_time_s'] > 0 and run['steps'] == 5 * run['budget']  # 160 // 32
    assert all(np.isfinite(run['train_loss_per_epoch']))
  assert sorted({(r['input_scale'], r['method']) for r in results['runs']}) == [
      ('raw', 'plain'), ('raw', 'tract'), ('standardized', 'plain'), ('standardized', 'tract')]
  scale = results['summary']['scales']['standardized']
  assert set(scale['table']['1']) == {'plain', 'tract'}
  assert scale['differences']['tract']['2']['seeds'] == 1
  (first, second) = scale['speedups']['tract']
  assert first['tract_budget'] == 1 and second['tract_budget'] == 2
  assert first['kind'] in ('interpolated', 'below', 'beyond')
  assert set(results['summary']['scale_differences']['raw - standardized']) == {
      'plain', 'tract'}
  assert 'TrAct' in results['table'] and '2 ep' in results['table']
  assert results['scale_grid'].startswith('test accuracy at 1 ep')


def test_smoke_run_records_and_prints_the_data_source(smoke_run):
  _, results, printed = smoke_run
  source = results['data_source']
  assert source['origin'] == 'scikit-learn'
  (entry,) = source['files']
  assert entry['name'] == 'digits.csv.gz'
  path = pathlib.Path(source['folder']) / entry['name']
  assert entry['sha256'] == data_lib.file_sha256(path)
  assert f'data read from {source["folder"]} (scikit-learn):' in printed
  assert entry['sha256'] in printed
  assert 'Speedup (standardized input): TrAct@1 ep' in printed
  assert 'TrAct, raw - standardized input (paired by seed)' in printed


def test_smoke_run_writes_png(smoke_run):
  out, _, _ = smoke_run
  content = (out / 'accuracy_vs_budget.png').read_bytes()
  assert len(content) > 1000 and content.startswith(PNG_SIGNATURE)


def test_paired_runs_share_initialisation(smoke_run):
  """Same seed, same initial parameters for both methods (the data order depends
  on (seed, epoch) only)."""
  _, results, _ = smoke_run
  plain, tract = sorted((r for r in results['runs'] if r['budget'] == 1
                         and r['input_scale'] == 'raw'), key=lambda run: run['method'])
  assert plain['steps'] == tract['steps'] and plain['seed'] == tract['seed']
  config = cli.parse_config(['--dataset', 'digits'])
  model = models_lib.create_model('cnn', 10)
  states = [training.create_state(model, training.make_optimizer(config, method), (8, 8, 1),
                                  seed=3) for method in ('plain', 'tract')]
  for a, b in zip(jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params)):
    np.testing.assert_array_equal(a, b)
  other = training.create_state(model, training.make_optimizer(config, 'plain'), (8, 8, 1),
                                seed=4)
  assert not np.array_equal(other.params['stem']['kernel'], states[0].params['stem']['kernel'])


# ------------------------------------------------------------------ help


def _help_text(capsys) -> str:
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['--help'])
  assert exit_info.value.code == 0
  return capsys.readouterr().out


def test_help_lists_every_flag(capsys):
  text = _help_text(capsys)
  for flag in ('--dataset', '--model', '--method', '--lam', '--epochs', '--seeds', '--preset',
               '--train-examples', '--test-examples', '--out', '--optimizer', '--lr',
               '--weight-decay', '--warmup-epochs', '--batch-size', '--data-dir',
               '--input-scale', 'tract_rel'):
    assert flag in text


def test_help_names_no_file_outside_the_repository(capsys):
  text = ' '.join(_help_text(capsys).split())
  outputs = {comparison.RESULTS_FILE, comparison.PLOT_FILE}
  names = set(re.findall(r'[\w./-]+\.(?:md|py|json|png|ipynb|txt|toml|cfg|yaml)\b', text))
  assert outputs <= names  # the outputs are named ...
  for name in names - outputs:  # ... and everything else exists in the repository
    assert (ROOT / name).exists(), name
  assert 'TRACT.md' not in text


def test_module_entry_point_help():
  result = subprocess.run([sys.executable, '-m', 'tract_experiment', '--help'],
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert 'tract-optax-train' in result.stdout


def test_module_main_only_forwards():
  import tract_experiment.__main__ as module_main

  assert module_main.main is cli.main


# ------------------------------------------------------------ bad flags (2)


@pytest.mark.parametrize('argv, message', [
    (['--epochs', '0'], 'budgets >= 1'),
    (['--epochs', 'one'], 'comma-separated whole epochs'),
    (['--epochs', '1,,2'], 'none empty'),
    (['--epochs', '1,2,'], 'none empty'),
    (['--epochs', '1,2,1'], 'lists 1 more than once'),
    (['--lam', '0'], '--lam must be a finite number > 0; got 0 (the default preset uses 0.05'),
    (['--preset', 'paper', '--lam', '-1'], 'got -1 (the paper preset uses 0.1'),
    (['--lam', 'nan'], '--lam must be a finite number'),
    (['--lr', '0'], '--lr must be > 0; got 0'),
    (['--lr', '-1'], '--lr must be > 0; got -1'),
    (['--lr', 'inf'], '--lr must be a finite number'),
    (['--lr', 'nan'], '--lr must be a finite number'),
    (['--lr', 'fast'], '--lr takes a number'),
    (['--momentum', '1'], '--momentum must be >= 0 and < 1'),
    (['--weight-decay', '-0.1'], '--weight-decay must be >= 0'),
    (['--warmup-epochs', '-1'], '--warmup-epochs must be >= 0'),
    (['--train-examples', '0'], '--train-examples must be >= 1 (or "all"'),
    (['--train-examples', '-5'], '--train-examples must be >= 1'),
    (['--test-examples', '0'], '--test-examples must be >= 1'),
    (['--train-examples', 'many'], 'number of examples >= 1 or "all"'),
    (['--seeds', '0'], '--seeds must be >= 1; got 0'),
    (['--batch-size', '0'], '--batch-size must be >= 1'),
    (['--eval-batch-size', '0'], '--eval-batch-size must be >= 1'),
    (['--first-seed', '-1'], '--first-seed must be >= 0'),
    (['--refresh-every', '0'], '--refresh-every must be >= 1'),
    (['--crop-pad', '-1'], '--crop-pad must be >= 0'),
    (['--model', 'vgg'], "invalid choice: 'vgg'"),
    (['--method', 'plain,plain'], 'lists plain more than once'),
    (['--method', 'plain,adamw'], "unknown 'adamw'"),
    (['--input-scale', 'percent'], "unknown 'percent'; choose from standardized, raw, unit"),
    (['--dataset', 'digits', '--data-dir', '.'], '--data-dir does not apply to digits'),
])
def test_bad_flags(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_config(argv)
  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  assert message in error
  assert 'Traceback' not in error and error.strip().splitlines()[-1].startswith(
      'tract-optax-train: error:')


def test_missing_data_dir_is_a_flag_error(tmp_path, capsys):
  for folder, problem in ((tmp_path / 'none', 'does not exist'),
                          (tmp_path / 'file', 'is not a folder')):
    if folder.name == 'file':
      folder.write_text('x')
    with pytest.raises(SystemExit) as exit_info:
      cli.main(['--data-dir', str(folder), '--out', str(tmp_path / 'out')])
    assert exit_info.value.code == 2
    assert f'--data-dir {folder} {problem}' in capsys.readouterr().err


def test_out_under_a_regular_file_is_a_flag_error(tmp_path, capsys):
  (tmp_path / 'file').write_text('x')
  for out, problem in ((tmp_path / 'file', 'exists and is not a folder'),
                       (tmp_path / 'file' / 'run', f'{tmp_path / "file"} is a file')):
    with pytest.raises(SystemExit) as exit_info:
      cli.parse_config(['--dataset', 'digits', '--out', str(out)])
    assert exit_info.value.code == 2
    assert problem in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()  # checking creates nothing


def test_presets_and_overrides():
  default = cli.parse_config([])
  assert default.dataset == 'fashion_mnist' and default.model == 'cnn'
  assert default.methods == ('plain', 'tract') and default.lam == 0.05
  assert default.lr == 0.2 and default.epochs == (1, 2) and default.seeds == 3
  assert default.train_examples == 10000 and default.test_examples is None
  assert default.crop_pad == 0 and not default.flip
  assert default.input_scales == ('standardized',)
  paper = cli.parse_config(['--preset', 'paper'])
  assert paper.model == 'resnet18' and paper.epochs == (1, 2, 4, 8) and paper.seeds == 4
  assert paper.train_examples is None and paper.lr == 0.08 and paper.optimizer == 'sgd'
  assert paper.lam == 0.1 and paper.crop_pad == 2 and paper.flip
  custom = cli.parse_config(['--preset', 'paper', '--seeds', '2', '--train-examples', 'all',
                             '--optimizer', 'adam', '--method', 'tract', '--augment', 'none'])
  assert custom.seeds == 2 and custom.train_examples is None and custom.lr == 1e-3
  assert custom.methods == ('tract',) and custom.crop_pad == 0 and not custom.flip
  assert cli.parse_config(['--dataset', 'digits']).flip is False
  grid = cli.parse_config(['--method', 'tract_rel,plain,tract', '--input-scale', 'raw,standardized',
                           '--epochs', '3,1,2'])
  assert grid.methods == ('plain', 'tract', 'tract_rel') and grid.tract_methods == (
      'tract', 'tract_rel')
  assert grid.input_scales == ('standardized', 'raw') and grid.epochs == (1, 2, 3)
  assert cli.parse_config(['--method', 'all']).methods == ('plain', 'tract', 'tract_rel')


def test_tract_rel_method_uses_relative_lambda():
  config = cli.parse_config(['--dataset', 'digits', '--lam', '0.1'])
  assert training.tract_options(config, 'tract') == {}
  assert training.tract_options(config, 'tract_rel') == {'relative_lam': True}
  rng = np.random.default_rng(0)
  x = 255 * rng.random((32, 6)).astype(np.float32)  # raw-pixel scale
  params = {'stem': {'kernel': jax.numpy.zeros((6, 3))}}
  grads = {'stem': {'kernel': jax.numpy.asarray(rng.normal(size=(6, 3)), jax.numpy.float32)}}
  stats = {('stem',): tract_optax.dense_stats(jax.numpy.asarray(x))}
  updates = {}
  for method in ('tract', 'tract_rel'):
    tx = training.make_optimizer(config, method)
    updates[method], _ = tx.update(grads, tx.init(params), params, tract_stats=stats)
  for method, relative in (('tract', False), ('tract_rel', True)):
    reference_tx = tract_optax.tract(0.1, relative_lam=relative)
    reference, _ = reference_tx.update(grads, reference_tx.init(params), params,
                                       tract_stats=stats)
    # First step of SGD with momentum, zero weights (no decay): -lr * the TrAct gradient.
    np.testing.assert_allclose(updates[method]['stem']['kernel'],
                               -config.lr * reference['stem']['kernel'], rtol=1e-5)
  assert not np.allclose(updates['tract']['stem']['kernel'],
                         updates['tract_rel']['stem']['kernel'])


# ------------------------------------------------------------ data errors (1)


def _offline_without_system_data(monkeypatch):
  monkeypatch.delenv(data_lib.DATA_ENV_VAR, raising=False)
  monkeypatch.setattr(data_lib, 'SYSTEM_FASHION_MNIST_DIRS', ())

  def refuse(*args, **kwargs):
    raise OSError('offline (test)')

  monkeypatch.setattr(data_lib.urllib.request, 'urlopen', refuse)


def test_data_dir_without_the_files_exits_1_naming_it(tmp_path, monkeypatch, capsys):
  _offline_without_system_data(monkeypatch)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['--data-dir', str(tmp_path / 'empty'), '--out', str(tmp_path / 'out'),
              '--no-progress'])
  assert exit_info.value.code == 1
  error = capsys.readouterr().err.strip()
  assert len(error.splitlines()) == 1
  assert error.startswith(f'tract-optax-train: error: Fashion-MNIST was not found in '
                          f'{tmp_path / "empty"}')


def test_no_data_anywhere_explains(tmp_path, monkeypatch, capsys):
  _offline_without_system_data(monkeypatch)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['--out', str(tmp_path / 'out'), '--no-progress'])
  assert exit_info.value.code == 1
  assert 'apt-get install dataset-fashion-mnist' in capsys.readouterr().err


def test_out_that_cannot_be_created_exits_1(tmp_path, monkeypatch, capsys):
  def refuse(path, exist_ok=False):
    raise PermissionError(13, 'Permission denied', path)

  monkeypatch.setattr(comparison.os, 'makedirs', refuse)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['--dataset', 'digits', '--out', str(tmp_path / 'out')])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err.strip() == (
      f'tract-optax-train: error: cannot create the output folder {tmp_path / "out"}: '
      'Permission denied.')


def test_too_few_examples_for_a_batch_exits_1(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['--dataset', 'digits', '--train-examples', '10', '--batch-size', '32',
              '--out', str(tmp_path / 'out')])
  assert exit_info.value.code == 1
  assert '10 training examples are fewer than one batch of 32' in capsys.readouterr().err


def test_console_run_prints_one_line_and_no_traceback(tmp_path):
  (tmp_path / 'empty').mkdir()
  result = subprocess.run(
      [sys.executable, '-m', 'tract_experiment', '--data-dir', str(tmp_path / 'empty'),
       '--out', str(tmp_path / 'out')], capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]
  assert str(tmp_path / 'empty') in result.stderr


# ------------------------------------------------------------ the train step


def test_cosine_learning_rate_schedule():
  values = [float(training.cosine_learning_rate(step, 0.08, 100, 0)) for step in (0, 50, 100)]
  np.testing.assert_allclose(values, [0.08, 0.04, 0.0], atol=1e-7)
  warm = [float(training.cosine_learning_rate(step, 1.0, 20, 10)) for step in (0, 5, 10)]
  np.testing.assert_allclose(warm, [0.0, 0.5, 1.0], atol=1e-7)


def test_amortized_train_step_refreshes_every_k_steps():
  """--refresh-every k: the statistic is captured on steps 0, k, 2k, ... only."""
  config = cli.parse_config(['--dataset', 'digits', '--refresh-every', '3'])
  assert config.refresh_every == 3
  model = models_lib.create_model('cnn', 10)
  tx = training.make_optimizer(config, 'tract')
  state = training.create_state(model, tx, (8, 8, 1), seed=0)
  step = training.make_train_step(model, 'tract', config.lr, config.refresh_every)
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
