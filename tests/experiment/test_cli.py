"""Tests of the tract-optax-train program: a smoke run, every flag check, the entry points."""

import contextlib
import dataclasses
import io
import json
import pathlib
import re
import signal
import subprocess
import sys
import time

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


#: A small tuned comparison on digits: 2 budgets x 2 seeds x 2 lrs x 2 methods.
SMOKE_ARGV = ['--dataset', 'digits', '--model', 'cnn', '--train-examples', '160',
              '--val-examples', '120', '--test-examples', '100', '--epochs', '1,2',
              '--seeds', '2', '--batch-size', '32', '--lr', '0.3,0.03', '--method', 'both',
              '--no-progress', '--timing-compiles', '0']


def _run_main(argv):
  """Runs ``cli.main``; returns (exit status, stdout)."""
  printed = io.StringIO()
  status = 0
  with contextlib.redirect_stdout(printed):
    try:
      assert cli.main(argv) is None  # console scripts exit with main()'s value
    except SystemExit as exit_info:
      status = exit_info.code
  return status, printed.getvalue()


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """The small tuned comparison, at two input scales."""
  out = tmp_path_factory.mktemp('run') / 'out'
  status, printed = _run_main(SMOKE_ARGV + ['--input-scale', 'standardized,raw',
                                            '--timing-compiles', '2', '--timing-steps', '2',
                                            '--out', str(out)])
  assert status == 0
  with open(out / 'results.json') as handle:
    return out, json.load(handle), printed


def test_smoke_run_writes_results_json(smoke_run):
  out, results, _ = smoke_run
  assert results['partial'] is False and results['runs_done'] == results['runs_planned'] == 32
  assert results['config']['dataset'] == 'digits'
  assert results['config']['methods'] == ['plain', 'tract']
  assert results['config']['lrs'] == [0.03, 0.3]
  assert results['config']['input_scales'] == ['standardized', 'raw']
  assert results['config']['epochs'] == [1, 2]
  assert results['train_examples'] == 160 and results['test_examples'] == 100
  assert results['val_examples'] == 120
  assert {'jax', 'flax', 'optax', 'device', 'platform'} <= set(results['environment'])
  assert len(results['runs']) == 32  # 2 scales x 2 budgets x 2 seeds x 2 lrs x 2 methods
  for run in results['runs']:
    assert {'config', 'seed', 'method', 'budget', 'lr', 'input_scale', 'val_accuracy',
            'test_accuracy', 'wall_time_s', 'train_time_s', 'jax_version', 'device'} <= set(run)
    assert run['config'] == results['config'] and run['seed'] in (0, 1)
    assert len(run['train_loss_per_epoch']) == run['budget']
    assert 0.0 <= run['val_accuracy'] <= 1.0 and 0.0 <= run['test_accuracy'] <= 1.0
    assert run['wall_time_s'] > 0 and run['steps'] == 5 * run['budget']  # 160 // 32
    assert run['group_runs'] == 8  # 2 vectorised groups (a method: 2 seeds x 2 lrs) together
  assert sorted({(r['input_scale'], r['method'], r['lr']) for r in results['runs']}) == [
      (scale, method, lr) for scale in ('raw', 'standardized') for method in ('plain', 'tract')
      for lr in (0.03, 0.3)]
  scale = results['summary']['scales']['standardized']
  assert set(scale['table']['1']) == {'plain', 'tract'}
  assert set(scale['shared']) == {'0.03', '0.3'}
  assert scale['differences']['tract']['2']['seeds'] == 2
  (first, second) = scale['speedups']['tract']
  assert first['tract_budget'] == 1 and second['tract_budget'] == 2
  assert set(results['summary']['scale_differences']['raw - standardized']) == {
      'plain', 'tract'}
  assert 'lr (chosen on val)' in results['table'] and '2 ep' in results['table']
  assert results['lr_grid'].startswith('Learning-rate grid')
  assert results['scale_grid'].startswith('test accuracy at 1 ep')
  assert results['trials'].startswith('Trials: each method (plain, TrAct) got the same 8 runs')


def test_smoke_run_reports_speedups_in_seconds(smoke_run):
  """Seconds per epoch: best over fresh compiles; the seconds speedup is the epoch
  speedup times plain's over TrAct's seconds per epoch."""
  _, results, printed = smoke_run
  timing = results['timing']['epochs']
  assert (timing['compiles'], timing['steps'], timing['steps_per_epoch']) == (2, 2, 5)
  epoch_s = {}
  for method in ('plain', 'tract'):
    values = timing['methods'][method]
    assert len(values['per_compile_ms']) == 2 and min(values['per_compile_ms']) > 0
    assert values['best_ms'] == min(values['per_compile_ms'])
    assert values['median_ms'] == pytest.approx(np.median(values['per_compile_ms']))
    assert values['epoch_s'] == pytest.approx(values['best_ms'] * 5 / 1e3)
    epoch_s[method] = values['epoch_s']
  for scale in ('standardized', 'raw'):
    entries = results['summary']['scales'][scale]['speedups']['tract']
    rows = results['summary']['seconds'][scale]['tract']
    assert [row['tract_budget'] for row in rows] == [1, 2]
    for entry, row in zip(entries, rows, strict=True):
      assert row['tract_s'] == pytest.approx(entry['tract_budget'] * epoch_s['tract'])
      if entry['factor'] is not None:
        assert row['plain_s'] == pytest.approx(entry['plain_budget'] * epoch_s['plain'])
        assert row['seconds_factor'] == pytest.approx(
            entry['factor'] * epoch_s['plain'] / epoch_s['tract'])
      else:
        assert row['seconds_factor'] is None and row['plain_s'] is None
        assert row['seconds_bound'] == pytest.approx(
            entry['bound'] * epoch_s['plain'] / epoch_s['tract'])
  assert results['seconds_table'].startswith('Speedup in seconds (tuned curves; ')
  assert 'seconds speedup' in printed and 'tract / plain step time' in printed
  assert 0 < results['timing']['runs_s'] < results['timing']['total_s']


def test_smoke_run_reports_the_choice_made_on_validation(smoke_run):
  """Every chosen lr is the one with the best mean validation accuracy (recomputed here),
  and the table reports the mean test accuracy of exactly those runs."""
  _, results, printed = smoke_run
  for scale in ('standardized', 'raw'):
    summary = results['summary']['scales'][scale]
    for method in ('plain', 'tract'):
      for budget in (1, 2):
        runs = [r for r in results['runs'] if r['input_scale'] == scale
                and r['method'] == method and r['budget'] == budget]
        val = {lr: np.mean([r['val_accuracy'] for r in runs if r['lr'] == lr])
               for lr in (0.03, 0.3)}
        best = max(val, key=lambda lr: (val[lr], -lr))
        choice = summary['choices'][method][str(budget)]
        assert choice['lr'] == best and choice['val_mean'] == pytest.approx(val[best])
        row = summary['table'][str(budget)][method]
        assert row['lr'] == best
        assert row['mean'] == pytest.approx(np.mean(
            [r['test_accuracy'] for r in runs if r['lr'] == best]))
  assert 'Tuned comparison: each method at its lr chosen on validation accuracy' in printed
  assert 'Shared lr 0.3 (not tuned) (standardized input): TrAct - plain' in printed


@pytest.mark.slow  # a training comparison (compiles its steps)
def test_selection_ignores_a_corrupted_test_split(smoke_run, tmp_path, monkeypatch):
  """The same comparison with the test split replaced by noise chooses the same lrs
  (the choice reads validation only) while its test accuracies change."""
  _, results, _ = smoke_run
  load = data_lib.load

  def corrupted(*args, **kwargs):
    dataset = load(*args, **kwargs)
    rng = np.random.default_rng(7)
    return dataclasses.replace(
        dataset, test_images=rng.normal(size=dataset.test_images.shape).astype(np.float32),
        test_labels=rng.integers(0, 10, len(dataset.test_labels)).astype(np.int32))

  monkeypatch.setattr(data_lib, 'load', corrupted)
  # One input scale is enough here (half the runs of the smoke comparison).
  status, _ = _run_main(SMOKE_ARGV + ['--input-scale', 'standardized',
                                      '--out', str(tmp_path / 'out')])
  assert status == 0
  again = json.loads((tmp_path / 'out' / 'results.json').read_text())
  first = results['summary']['scales']['standardized']['choices']
  second = again['summary']['scales']['standardized']['choices']
  assert first == second
  before = [r for r in results['runs'] if r['input_scale'] == 'standardized']
  assert len(before) == len(again['runs']) == 16
  assert [r['val_accuracy'] for r in again['runs']] == [r['val_accuracy'] for r in before]
  assert [r['test_accuracy'] for r in again['runs']] != [r['test_accuracy'] for r in before]


def test_validation_split_is_carved_from_training_data():
  dataset = data_lib.digits()
  split = dataset.split(300, 200, 100, seed=0)
  assert (len(split.train_labels), len(split.val_labels), len(split.test_labels)) == (
      300, 200, 100)
  rows = {image.tobytes() for image in dataset.train_images}
  assert all(image.tobytes() in rows for image in split.val_images)  # from training data
  train_rows = {image.tobytes() for image in split.train_images}
  assert not any(image.tobytes() in train_rows for image in split.val_images)  # disjoint
  test_rows = {image.tobytes() for image in dataset.test_images}
  assert not any(image.tobytes() in test_rows for image in split.val_images)
  again = dataset.split(300, 200, 100, seed=0)
  np.testing.assert_array_equal(again.val_labels, split.val_labels)
  everything = dataset.split(None, 200)
  assert len(everything.train_labels) == len(dataset.train_labels) - 200
  np.testing.assert_array_equal(everything.test_labels, dataset.test_labels)


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
  assert 'Tuned (standardized input) speedup: TrAct@1 ep' in printed
  assert 'TrAct, raw - standardized input (paired by seed, each at its tuned lr)' in printed


def test_smoke_run_writes_png(smoke_run):
  out, _, _ = smoke_run
  content = (out / 'accuracy_vs_budget.png').read_bytes()
  assert len(content) > 1000 and content.startswith(PNG_SIGNATURE)


def test_paired_runs_share_initialisation(smoke_run):
  """Same seed, same initial parameters for both methods (the data order depends
  on (seed, epoch) only)."""
  _, results, _ = smoke_run
  plain, tract = sorted((r for r in results['runs'] if r['budget'] == 1 and r['seed'] == 0
                         and r['lr'] == 0.3 and r['input_scale'] == 'raw'),
                        key=lambda run: run['method'])
  assert plain['steps'] == tract['steps'] and plain['seed'] == tract['seed']
  config = cli.parse_config(['--dataset', 'digits', '--model', 'cnn'])
  model = models_lib.create_model('cnn', 10)
  states = [training.create_state(model, training.make_optimizer(config, method), (8, 8, 1),
                                  seed=3) for method in ('plain', 'tract')]
  for a, b in zip(jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params)):
    np.testing.assert_array_equal(a, b)
  other = training.create_state(model, training.make_optimizer(config, 'plain'), (8, 8, 1),
                                seed=4)
  assert not np.array_equal(other.params['stem']['kernel'], states[0].params['stem']['kernel'])


# ------------------------------------------------------------------ help


def _help_text(capsys, monkeypatch) -> str:
  monkeypatch.setenv('COLUMNS', '2000')  # one line per flag: no hyphen breaks
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['--help'])
  assert exit_info.value.code == 0
  return capsys.readouterr().out


def test_help_lists_every_flag(capsys, monkeypatch):
  text = _help_text(capsys, monkeypatch)
  for flag in ('--dataset', '--model', '--method', '--lam', '--epochs', '--seeds', '--preset',
               '--train-examples', '--test-examples', '--val-examples', '--out', '--overwrite',
               '--optimizer', '--lr', '--weight-decay', '--warmup-epochs', '--batch-size',
               '--data-dir', '--input-scale', '--patch-size', '--no-plot', 'tract_rel'):
    assert flag in text


def test_help_explains_scales_lr_grid_and_exit_status(capsys, monkeypatch):
  text = ' '.join(_help_text(capsys, monkeypatch).split())
  scale_help = text[text.index('--input-scale SCALES comma'):text.index('--lam LAM TrAct')]
  assert 'unit (raw divided by that peak: 0..1)' in scale_help and 'raw (' in scale_help
  lr_help = text[text.index('--lr LRS peak'):text.index('--val-examples VAL_EXAMPLES valid')]
  assert '{' not in lr_help and "'sgd'" not in lr_help  # no Python dict
  assert 'sgd: 0.03,0.1,0.3; adam: 0.0003,0.001,0.003' in lr_help
  assert ('Exit status: 0 on success; 2 for a bad flag or value (also a size the data cannot '
          'satisfy, such as more --train-examples than it holds); 1 when the data is missing '
          'or damaged, --out cannot be written or already holds results (see --overwrite), '
          'or matplotlib is missing (see --no-plot); 130 when interrupted') in text
  assert cli.__doc__.count('- 2: the command line is wrong') == 1  # the module says the same


def test_help_names_no_file_outside_the_repository(capsys, monkeypatch):
  text = ' '.join(_help_text(capsys, monkeypatch).split())
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


def _one_error_line(capsys, start='tract-optax-train: error: '):
  error = capsys.readouterr().err
  assert 'Traceback' not in error and 'usage:' not in error
  lines = error.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(start), error
  return lines[0]


@pytest.mark.parametrize('argv, message', [
    (['--epochs', '0'], 'budgets >= 1'),
    (['--epochs', 'one'], 'comma-separated whole epochs'),
    (['--epochs', '1,,2'], 'none empty'),
    (['--epochs', '1,2,'], 'none empty'),
    (['--epochs', '1,2,1'], 'lists 1 more than once'),
    (['--lam', '0'], '--lam must be a finite number > 0; got 0 (the default preset uses 0.1'),
    (['--preset', 'paper', '--lam', '-1'], 'got -1 (the paper preset uses 0.1'),
    (['--lam', 'nan'], '--lam must be a finite number'),
    (['--lr', '0'], '--lr must be > 0; got 0'),
    (['--lr', '0.1,-1'], '--lr must be > 0; got -1'),
    (['--lr', 'inf'], '--lr must be a finite number'),
    (['--lr', 'nan'], '--lr must be a finite number'),
    (['--lr', 'fast'], '--lr takes a number'),
    (['--lr', '0.1,,0.3'], 'none empty'),
    (['--lr', '0.1,0.10'], '--lr lists a learning rate more than once'),
    (['--momentum', '1'], '--momentum must be >= 0 and < 1'),
    (['--weight-decay', '-0.1'], '--weight-decay must be >= 0'),
    (['--warmup-epochs', '-1'], '--warmup-epochs must be >= 0'),
    (['--train-examples', '0'], '--train-examples must be >= 1 (or "all"'),
    (['--train-examples', '-5'], '--train-examples must be >= 1'),
    (['--test-examples', '0'], '--test-examples must be >= 1'),
    (['--val-examples', '0'], '--val-examples must be >= 1 (or "auto")'),
    (['--val-examples', 'half'], '--val-examples takes a number of examples >= 1 or "auto"'),
    (['--train-examples', 'many'], 'number of examples >= 1 or "all"'),
    (['--seeds', '0'], '--seeds must be >= 1; got 0'),
    (['--batch-size', '0'], '--batch-size must be >= 1'),
    (['--eval-batch-size', '0'], '--eval-batch-size must be >= 1'),
    (['--first-seed', '-1'], '--first-seed must be >= 0'),
    (['--refresh-every', '0'], '--refresh-every must be >= 1'),
    (['--crop-pad', '-1'], '--crop-pad must be >= 0'),
    (['--patch-size', '0'], '--patch-size must be >= 1'),
    (['--model', 'cnn', '--patch-size', '7'], '--patch-size applies to --model vit only'),
    (['--model', 'vgg'], "invalid choice: 'vgg'"),
    (['--method', 'plain,plain'], 'lists plain more than once'),
    (['--method', 'plain,adamw'], "unknown 'adamw'"),
    (['--input-scale', 'percent'], "unknown 'percent'; choose from standardized, raw, unit"),
    (['--dataset', 'digits', '--data-dir', '.'], '--data-dir does not apply to digits'),
    (['--bogus'], 'unrecognized arguments: --bogus'),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_config(argv)
  assert exit_info.value.code == 2
  line = _one_error_line(capsys)
  assert message in line and line.endswith('(see --help)')


def test_presets_and_overrides():
  default = cli.parse_config([])
  assert default.dataset == 'fashion_mnist' and default.model == 'vit'
  assert default.patch_size == 7 and default.optimizer == 'sgd'
  assert default.methods == ('plain', 'tract') and default.lam == 0.1
  assert default.lrs == (0.01, 0.03, 0.1) and default.tuned
  assert default.epochs == (1, 2, 3) and default.seeds == 3
  assert default.train_examples == 5000 and default.val_examples == 2000
  assert default.test_examples == 5000
  assert default.crop_pad == 0 and not default.flip
  assert default.input_scales == ('standardized',)
  paper = cli.parse_config(['--preset', 'paper'])
  assert paper.model == 'resnet18' and paper.epochs == (1, 2, 4, 8) and paper.seeds == 4
  assert paper.train_examples is None and paper.test_examples is None
  assert paper.val_examples == 5000 and paper.lrs == (0.03, 0.1, 0.3) and paper.tuned
  assert paper.optimizer == 'sgd' and paper.patch_size is None
  assert paper.lam == 0.1 and paper.crop_pad == 2 and paper.flip
  custom = cli.parse_config(['--preset', 'paper', '--seeds', '2', '--train-examples', 'all',
                             '--optimizer', 'adam', '--method', 'tract', '--augment', 'none',
                             '--val-examples', 'auto'])
  assert custom.seeds == 2 and custom.train_examples is None and custom.val_examples is None
  assert custom.lrs == (3e-4, 1e-3, 3e-3)
  assert custom.methods == ('tract',) and custom.crop_pad == 0 and not custom.flip
  digits = cli.parse_config(['--dataset', 'digits'])
  assert not digits.flip and digits.train_examples is None  # sizes are fashion_mnist's
  assert digits.val_examples is None and digits.test_examples is None
  assert cli.parse_config(['--model', 'vit', '--preset', 'paper']).patch_size == 4
  assert cli.parse_config(['--patch-size', '14']).patch_size == 14
  shared = cli.parse_config(['--lr', '0.1'])
  assert shared.lrs == (0.1,) and not shared.tuned
  grid = cli.parse_config(['--method', 'tract_rel,plain,tract', '--input-scale', 'raw,standardized',
                           '--epochs', '3,1,2', '--lr', '0.3,0.01'])
  assert grid.methods == ('plain', 'tract', 'tract_rel') and grid.tract_methods == (
      'tract', 'tract_rel')
  assert grid.input_scales == ('standardized', 'raw') and grid.epochs == (1, 2, 3)
  assert grid.lrs == (0.01, 0.3)
  assert cli.parse_config(['--method', 'all']).methods == ('plain', 'tract', 'tract_rel')


def test_tract_rel_method_uses_relative_lambda():
  config = cli.parse_config(['--dataset', 'digits', '--lam', '0.1', '--lr', '0.2'])
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
                               -0.2 * reference['stem']['kernel'], rtol=1e-5)
  assert not np.allclose(updates['tract']['stem']['kernel'],
                         updates['tract_rel']['stem']['kernel'])


# -------------------------------------------- the run cannot proceed (1), sizes (2)


def _offline_without_system_data(monkeypatch):
  monkeypatch.delenv(data_lib.DATA_ENV_VAR, raising=False)
  monkeypatch.setattr(data_lib, 'SYSTEM_FASHION_MNIST_DIRS', ())

  def refuse(*args, **kwargs):
    raise OSError('offline (test)')

  monkeypatch.setattr(data_lib.urllib.request, 'urlopen', refuse)


def _refuse_training(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('nothing may train after a failed check')

  monkeypatch.setattr(training, 'train_groups', refuse)
  monkeypatch.setattr(comparison, '_compile', refuse)


def test_missing_data_dir_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
  _refuse_training(monkeypatch)
  (tmp_path / 'file').write_text('x')
  for folder, problem in ((tmp_path / 'none', 'does not exist'),
                          (tmp_path / 'file', 'is not a folder')):
    with pytest.raises(SystemExit) as exit_info:
      cli.main(['--data-dir', str(folder), '--out', str(tmp_path / 'out')])
    assert exit_info.value.code == 1
    assert _one_error_line(capsys).endswith(f'--data-dir {folder} {problem}.')
  assert not (tmp_path / 'out').exists()


def test_out_under_a_regular_file_exits_1(tmp_path, capsys, monkeypatch):
  _refuse_training(monkeypatch)
  (tmp_path / 'file').write_text('x')
  for out, problem in ((tmp_path / 'file', 'exists and is not a folder'),
                       (tmp_path / 'file' / 'run', f'{tmp_path / "file"} is a file')):
    with pytest.raises(SystemExit) as exit_info:
      cli.main(['--dataset', 'digits', '--out', str(out)])
    assert exit_info.value.code == 1
    assert problem in _one_error_line(capsys)


def test_out_with_results_is_refused_without_overwrite(smoke_run, capsys, monkeypatch):
  out, results, _ = smoke_run
  _refuse_training(monkeypatch)
  before = (out / 'results.json').read_text()
  with pytest.raises(SystemExit) as exit_info:
    cli.main(SMOKE_ARGV + ['--out', str(out)])
  assert exit_info.value.code == 1
  assert _one_error_line(capsys) == (
      f'tract-optax-train: error: --out {out} already holds results (results.json, '
      'accuracy_vs_budget.png); pass --overwrite to replace them, or choose another --out.')
  assert (out / 'results.json').read_text() == before
  with pytest.raises(AssertionError, match='nothing may train'):  # --overwrite goes on
    cli.main(SMOKE_ARGV + ['--out', str(out), '--overwrite'])


def test_data_dir_without_the_files_exits_1_naming_it(tmp_path, monkeypatch, capsys):
  _offline_without_system_data(monkeypatch)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['--data-dir', str(tmp_path / 'empty'), '--out', str(tmp_path / 'out'),
              '--no-progress'])
  assert exit_info.value.code == 1
  assert _one_error_line(capsys).startswith(
      f'tract-optax-train: error: Fashion-MNIST was not found in {tmp_path / "empty"}')
  assert not (tmp_path / 'out').exists()  # a failed run leaves no folder


def test_no_data_anywhere_explains(tmp_path, monkeypatch, capsys):
  _offline_without_system_data(monkeypatch)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['--out', str(tmp_path / 'out'), '--no-progress'])
  assert exit_info.value.code == 1
  assert 'apt-get install dataset-fashion-mnist' in _one_error_line(capsys)


def test_missing_matplotlib_is_found_before_training(tmp_path, monkeypatch, capsys):
  _refuse_training(monkeypatch)
  find_spec = comparison.importlib.util.find_spec
  monkeypatch.setattr(comparison.importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'matplotlib' else find_spec(name, *a))
  with pytest.raises(SystemExit) as exit_info:
    cli.main(SMOKE_ARGV + ['--out', str(tmp_path / 'out')])
  assert exit_info.value.code == 1
  line = _one_error_line(capsys)
  assert 'matplotlib is not installed' in line and '--no-plot' in line
  assert not (tmp_path / 'out').exists()


@pytest.mark.slow  # a training comparison (compiles its steps)
def test_results_json_is_written_before_the_plot(tmp_path, monkeypatch, capsys):
  def broken_plot(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(comparison.report, 'plot', broken_plot)
  argv = SMOKE_ARGV + ['--epochs', '1', '--seeds', '1', '--lr', '0.1',
                       '--out', str(tmp_path / 'out')]
  status, _ = _run_main(argv)
  assert status == 1
  assert 'No space left on device' in _one_error_line(capsys)
  results = json.loads((tmp_path / 'out' / 'results.json').read_text())
  assert results['partial'] is False and len(results['runs']) == 2 and results['summary']
  # --timing-compiles 0: no step timing, no speedup in seconds
  assert 'epochs' not in results['timing'] and results['seconds_table'] == ''
  assert 'seconds' not in results['summary']


@pytest.mark.slow  # a training comparison (compiles its steps)
def test_no_plot_writes_results_only(tmp_path):
  status, printed = _run_main(SMOKE_ARGV + ['--epochs', '1', '--seeds', '1', '--lr', '0.1',
                                            '--no-plot', '--out', str(tmp_path / 'out')])
  assert status == 0
  assert sorted(path.name for path in (tmp_path / 'out').iterdir()) == ['results.json']
  assert 'Shared-lr comparison at lr 0.1 (nothing tuned)' in printed


@pytest.mark.parametrize('extra, message', [
    (['--train-examples', '99999999'],
     '--train-examples 99999999 is more than the 1318 training examples digits has left after '
     'the 120-example validation split (1438 in all); use at most 1318, or "all".'),
    (['--val-examples', '1438'], '--val-examples 1438 leaves no training example'),
    (['--test-examples', '400'], '--test-examples 400 is more than the 359 test examples'),
    (['--batch-size', '200'], '160 training examples are fewer than one batch of 200'),
])
def test_sizes_the_data_cannot_satisfy_exit_2(extra, message, tmp_path, monkeypatch, capsys):
  _refuse_training(monkeypatch)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(SMOKE_ARGV + extra + ['--out', str(tmp_path / 'out')])
  assert exit_info.value.code == 2
  assert message in _one_error_line(capsys)
  assert not (tmp_path / 'out').exists()  # a failed run leaves no folder


def test_patch_size_must_tile_the_images(tmp_path, monkeypatch, capsys):
  _refuse_training(monkeypatch)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['--dataset', 'digits', '--model', 'vit', '--patch-size', '3',
              '--out', str(tmp_path / 'out')])
  assert exit_info.value.code == 2
  assert _one_error_line(capsys).endswith(
      '--patch-size 3 does not tile the 8x8 images of digits; choose a divisor of 8 (2, 4).')


def test_vit_patch_size_reaches_the_model():
  config = cli.parse_config(['--patch-size', '14'])
  model = comparison.model_for(config, 10)
  variables = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 28, 28, 1)))
  assert variables['params']['patch_embed']['kernel'].shape == (14, 14, 1, 64)
  assert variables['params']['position_embedding'].shape == (1, 5, 64)  # 4 tokens + class


def test_huge_lam_warns_with_the_numbers():
  dataset = data_lib.digits()
  config = cli.parse_config(['--dataset', 'digits', '--lam', '1e9', '--method', 'all'])
  warning = comparison.lam_warning(config, dataset)
  mean_square = float(np.mean(np.square(dataset.train_images[:2048], dtype=np.float64)))
  assert warning.startswith(f'warning: --lam 1e+09 dwarfs the first layer\'s input statistic '
                            f'(standardized input, mean eigenvalue about {mean_square:.3g}; '
                            f'TrAct: lam / mean eigenvalue = {1e9 / mean_square:.3g}, '
                            'TrAct rel-lam: lam / mean eigenvalue = 1e+09)')
  assert 'the first layer is frozen in effect' in warning
  assert comparison.lam_warning(cli.parse_config(['--dataset', 'digits']), dataset) is None
  assert comparison.lam_warning(
      cli.parse_config(['--dataset', 'digits', '--lam', '1e9', '--method', 'plain']),
      dataset) is None


def _interrupt_after(monkeypatch, finished):
  """train_groups raises KeyboardInterrupt once ``finished`` calls (budgets) are done."""
  real = training.train_groups
  calls = []

  def interrupting(*args, **kwargs):
    if len(calls) == finished:
      raise KeyboardInterrupt
    calls.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(training, 'train_groups', interrupting)


@pytest.mark.slow  # a training comparison (compiles its steps)
def test_interrupt_keeps_finished_runs_marked_partial(tmp_path, monkeypatch, capsys):
  _interrupt_after(monkeypatch, 1)  # one budget: 2 methods x 2 seeds x 2 lrs
  out = tmp_path / 'out'
  status, printed = _run_main(SMOKE_ARGV + ['--lam', '1e9', '--out', str(out)])
  assert status == 130
  assert _one_error_line(capsys, 'tract-optax-train: interrupted: ') == (
      f'tract-optax-train: interrupted: 8 of 16 runs finished; they are in '
      f'{out / "results.json"} (marked partial, no summary).')
  results = json.loads((out / 'results.json').read_text())
  assert results['partial'] is True and results['runs_done'] == 8
  assert results['runs_planned'] == 16 and len(results['runs']) == 8
  assert 'summary' not in results and not (out / 'accuracy_vs_budget.png').exists()
  assert 'warning: --lam 1e+09 dwarfs the first layer' in printed  # said before training


@pytest.mark.slow  # a training comparison (compiles its steps)
def test_interrupt_before_any_run_leaves_no_folder(tmp_path, monkeypatch, capsys):
  _interrupt_after(monkeypatch, 0)
  status, _ = _run_main(SMOKE_ARGV + ['--out', str(tmp_path / 'out')])
  assert status == 130
  assert _one_error_line(capsys, 'tract-optax-train: interrupted: ').endswith(
      'no run had finished; nothing was written.')
  assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_sigint_ends_with_one_line_and_exit_130(tmp_path):
  """A real Ctrl-C (SIGINT) in the console program once the first runs are written."""
  out = tmp_path / 'out'
  argv = [a for a in SMOKE_ARGV if a != '--no-progress']
  # the second budget long enough that the signal lands inside it: with the runs of a
  # budget trained as one vectorised group, a short second group could finish first
  argv[argv.index('--epochs') + 1] = '1,40'
  process = subprocess.Popen(
      [sys.executable, '-m', 'tract_experiment', *argv, '--seeds', '40', '--no-progress',
       '--out', str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 300
  while not (out / 'results.json').exists():
    assert process.poll() is None and time.monotonic() < deadline
    time.sleep(0.2)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130
  assert 'Traceback' not in stderr
  (line,) = stderr.strip().splitlines()
  assert line.startswith('tract-optax-train: interrupted: ') and 'marked partial' in line
  results = json.loads((out / 'results.json').read_text())
  assert results['partial'] is True and 1 <= len(results['runs']) < results['runs_planned']


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
  assert not (tmp_path / 'out').exists()


# ------------------------------------------------------------ the train step


def test_cosine_learning_rate_schedule():
  values = [float(training.cosine_learning_rate(step, 0.08, 100, 0)) for step in (0, 50, 100)]
  np.testing.assert_allclose(values, [0.08, 0.04, 0.0], atol=1e-7)
  warm = [float(training.cosine_learning_rate(step, 1.0, 20, 10)) for step in (0, 5, 10)]
  np.testing.assert_allclose(warm, [0.0, 0.5, 1.0], atol=1e-7)


def test_amortized_train_step_refreshes_every_k_steps():
  """--refresh-every k: the statistic is captured on steps 0, k, 2k, ... only."""
  config = cli.parse_config(['--dataset', 'digits', '--model', 'cnn', '--refresh-every', '3'])
  assert config.refresh_every == 3
  model = models_lib.create_model('cnn', 10)
  tx = training.make_optimizer(config, 'tract')
  state = training.create_state(model, tx, (8, 8, 1), seed=0)
  step = training.make_train_step(model, 'tract', config.refresh_every)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, size=16).astype(np.int32)
  total, warmup, lr = jax.numpy.asarray(10), jax.numpy.asarray(0), jax.numpy.asarray(0.1)
  kept = []
  for index in range(5):
    state, metrics = step(state, images * (1 + index), labels, total, warmup, lr,
                          step_index=index)
    tract_state = state.opt_state[0]
    kept.append(np.asarray(tract_state.stats_cache['stem'].moment))
    assert np.isfinite(float(metrics['loss']))
  assert int(tract_state.count) == 5 and int(tract_state.refreshes) == 2
  np.testing.assert_array_equal(kept[0], kept[1])  # reused on steps 1 and 2
  np.testing.assert_array_equal(kept[1], kept[2])
  assert not np.allclose(kept[2], kept[3])          # refreshed on step 3 (scaled batch)
