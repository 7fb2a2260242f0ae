"""``benchmarks/gpu_check.sh --smoke`` runs every part on CPU and writes its records.

The smoke mode is the GPU check's pipeline at tiny sizes: the same parts,
records, summary and exit status. It checks the pipeline, not the clock: the
smoke parts run without a time limit and no test here sets a wall-clock limit
that a busy machine could trip; the limit mechanism itself is tested with a
part that cannot finish in one second.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'gpu_check.sh'
sys.path.insert(0, str(ROOT / 'benchmarks'))

import gpu_check_report  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ('bash', 'timeout', 'tail', 'awk')),
    reason='gpu_check.sh needs bash, timeout, tail and awk')

#: The device tool brings back at most 8 files from its output folder.
MAX_FILES = 8
PART_FILES = {part: f'{part}_{name}.json' for part, (name, _) in gpu_check_report.PARTS.items()}


def run_check(out_dir, *args, **env):
  """Runs the script with this interpreter; returns the completed process (no time limit)."""
  environment = {key: value for key, value in os.environ.items()
                 if not key.startswith('GPU_CHECK_LIMIT_')}
  environment.update(PYTHON=sys.executable, **env)
  return subprocess.run(['bash', str(SCRIPT), *args, str(out_dir)], cwd=ROOT,
                        env=environment, capture_output=True, text=True, check=False)


def _record(out_dir, part):
  return json.loads((out_dir / PART_FILES[part]).read_text())


def test_smoke_run_writes_every_record_and_the_summary(tmp_path):
  # One test for the one smoke run: under pytest-xdist a shared fixture would
  # run it once per worker.
  out_dir = tmp_path / 'out'
  completed = run_check(out_dir, '--smoke')
  assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
  _check_summary(out_dir, completed.stdout)
  for part in sorted(PART_FILES):
    _check_record_fields(_record(out_dir, part), part)
  _check_tests_part(_record(out_dir, 'a')['results'])
  _check_overhead_part(_record(out_dir, 'b')['results']['rows'])
  _check_scaling_part(_record(out_dir, 'c')['results']['rows'])
  _check_main_job_part(_record(out_dir, 'd'), out_dir)
  files = [path for path in out_dir.rglob('*') if path.is_file()]
  assert len(files) <= MAX_FILES, files  # what the device tool brings back
  assert all(len(path.relative_to(out_dir).parts) <= 2 for path in files)


def _check_summary(out_dir, stdout):
  summary = (out_dir / 'summary.md').read_text()
  assert summary in stdout
  assert '| part | status | wall s | limit s | result |' in summary
  assert summary.count('| none |') == 4  # no part of the smoke run has a time limit
  for part, name in (('a', 'tests'), ('b', 'overhead'), ('c', 'scaling'), ('d', 'main_job')):
    assert f'| ({part}) {name} |' in summary


def _check_record_fields(record, part):
  assert set(gpu_check_report.RECORD_FIELDS) <= set(record)
  assert record['part'] == part and record['mode'] == 'smoke'
  assert record['status'] in ('ok', 'skipped'), (part, record['reason'])
  assert record['limit_s'] == 0 and record['wall_time_s'] >= 0  # smoke: no time limit
  environment = record['environment']
  assert environment['platform'] == 'cpu' and environment['device_kind']
  for package in ('jax', 'jaxlib', 'flax', 'optax'):
    assert environment['versions'][package]


def _check_tests_part(results):
  assert results['counts']['passed'] > 0
  assert results['counts']['failed'] == results['counts']['errors'] == 0
  assert results['modules']


def _check_overhead_part(rows):
  assert [row['precision'] for row in rows] == ['default', 'highest']
  for row in rows:
    assert row['ratio'] > 0 and row['amortized_ratio'] > 0 and row['refresh_every'] == 2
    assert row['peak_ratio'] > 0


def _check_scaling_part(rows):
  assert [row['precision'] for row in rows] == ['default', 'highest']
  assert all(row['chunked_over_stem'] > 0 and row['n'] == 147 for row in rows)


def _check_main_job_part(record, out_dir):
  if record['status'] == 'skipped':  # no Fashion-MNIST on this machine
    assert 'Fashion-MNIST not found' in record['reason']
    return
  results = record['results']
  assert results['runs'] == results['runs_planned'] == 8  # 1 seed x 2 budgets, lrs, methods
  assert not results['partial'] and results['val_examples'] == 128
  (table,) = results['accuracy'].values()
  assert set(table) == {'1', '2'}
  assert all(set(row) == {'plain', 'tract'} for row in table.values())
  assert all(stats['lr'] in (0.03, 0.3) and 0 <= stats['val_mean'] <= 1
             for row in table.values() for stats in row.values())
  assert results['trials'].startswith('Trials: each method (plain, TrAct) got the same 4 runs')
  assert results['lr_grid'].startswith('Learning-rate grid')
  (speedups,) = results['speedups'].values()
  assert len(speedups['tract']) == 2
  assert results['group_runs'] == 4  # vectorised: 1 seed x 2 lrs per method, 2 methods
  assert results['seconds_table'].startswith('Speedup in seconds')
  assert 'at the lr chosen on validation' in record['headline']
  assert (out_dir / 'main_job' / 'results.json').is_file()
  assert (out_dir / 'main_job' / 'accuracy_vs_budget.png').is_file()


def test_missing_data_is_skipped_and_a_timeout_fails(tmp_path):
  empty = tmp_path / 'no_data'
  empty.mkdir()
  completed = run_check(tmp_path / 'out', '--smoke', '--parts', 'c,d', GPU_CHECK_DATA=str(empty),
                        GPU_CHECK_LIMIT_C='1')
  assert completed.returncode == 1, completed.stdout[-3000:]
  timed_out = _record(tmp_path / 'out', 'c')
  assert timed_out['status'] == 'timeout' and 'time limit of 1 s' in timed_out['reason']
  skipped = _record(tmp_path / 'out', 'd')
  assert skipped['status'] == 'skipped' and skipped['exit_code'] is None
  assert f'$GPU_CHECK_DATA={empty}' in skipped['reason'] and '--stage-data' in skipped['reason']
  assert not (tmp_path / 'out' / PART_FILES['a']).exists()
  assert '| (d) main_job | skipped |' in completed.stdout


@pytest.mark.parametrize('args', [['--parts', 'b,x'], ['--bogus'], []])
def test_bad_usage_exits_2(tmp_path, args):
  completed = subprocess.run(['bash', str(SCRIPT), *args] + ([str(tmp_path)] if args else []),
                             cwd=ROOT, capture_output=True, text=True, check=False)
  assert completed.returncode == 2


def test_junit_report_is_summarised(tmp_path):
  suite = ElementTree.fromstring(
      '<testsuites><testsuite>'
      '<testcase classname="tests.test_stats" name="test_ok"/>'
      '<testcase classname="tests.test_stats" name="test_bad"><failure message="boom"/></testcase>'
      '<testcase classname="tests.test_parity_torch" name="test_parity">'
      '<skipped message="could not import \'torch_tract\'"/></testcase>'
      '</testsuite></testsuites>')
  junit = tmp_path / 'a.xml'
  ElementTree.ElementTree(suite).write(junit)
  results = gpu_check_report._tests_results(str(junit), None)  # pylint: disable=protected-access
  assert results['counts'] == {'passed': 1, 'failed': 1, 'errors': 0, 'skipped': 1}
  assert results['modules']['test_stats'] == {'passed': 1, 'failed': 1, 'errors': 0,
                                              'skipped': 0}
  assert results['failures'] == [{'test': 'tests.test_stats::test_bad', 'message': 'boom'}]
  assert results['skip_reasons'] == {"could not import 'torch_tract'": 1}


def test_tests_stopped_early_are_counted_from_the_progress_dots(tmp_path):
  output = tmp_path / 'a.out'
  output.write_text('bringing up nodes...\n' + '.' * 72 + ' [ 25%]\n' + '....F..s\n')
  results = gpu_check_report._tests_results(None, str(output))  # pylint: disable=protected-access
  assert results['progress'] == {'passed': 78, 'failed': 1, 'errors': 0, 'skipped': 1}
  assert gpu_check_report._tests_headline(results).startswith(  # pylint: disable=protected-access
      'no test report; so far 78 passed, 1 failed')
