"""The overhead benchmark runs end to end on tiny settings and writes its JSON."""

import json
import pathlib
import statistics
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

import overhead  # pylint: disable=g-import-not-at-top

FIELDS = {'model', 'batch', 'image_size', 'precision', 'plain_ms', 'tract_ms', 'ratio',
          'amortized_ms', 'amortized_ratio', 'refresh_every', 'plain_peak_bytes',
          'tract_peak_bytes', 'peak_ratio', 'amortized_peak_bytes', 'amortized_peak_ratio',
          'rounds', 'steps_per_round', 'compile_s', 'device', 'platform', 'compiles',
          'plain_ms_median', 'tract_ms_median', 'ratio_median', 'route_ratio_median',
          'plain_ms_per_compile', 'tract_ms_per_compile'}
SCALING_FIELDS = {'batch', 'image_size', 'N', 'n', 'flops_2Nn2', 'precision', 'stem_fwd_ms',
                  'stem_fwd_bwd_ms', 'stats_chunked_ms', 'stats_explicit_ms',
                  'chunked_over_stem', 'explicit_over_stem', 'chunked_peak_bytes',
                  'explicit_peak_bytes', 'device'}


def test_overhead_mode_writes_the_documented_fields(tmp_path, capsys):
  out = tmp_path / 'overhead.json'
  overhead.main(['--device', 'cpu', '--models', 'cnn', '--batch', '4', '--rounds', '1',
                 '--steps-per-round', '1', '--amortize', '2', '--precision', 'highest',
                 '--compiles', '1', '--out', str(out)])
  (row,) = json.loads(out.read_text())
  assert FIELDS <= set(row)
  assert row['model'] == 'cnn' and row['batch'] == 4 and row['precision'] == 'highest'
  assert row['compiles'] == 1 and len(row['plain_ms_per_compile']) == 1
  for name in ('plain', 'tract', 'route', 'amortized'):
    assert row[f'{name}_ms'] == row[f'{name}_ms_per_compile'][0]
  assert row['plain_ms'] > 0 and row['tract_ms'] > 0 and row['amortized_ms'] > 0
  assert row['refresh_every'] == 2
  assert abs(row['ratio'] - row['tract_ms'] / row['plain_ms']) < 1e-9
  assert abs(row['amortized_ratio'] - row['amortized_ms'] / row['plain_ms']) < 1e-9
  assert row['plain_peak_bytes'] > 0 and row['tract_peak_bytes'] > 0
  assert row['amortized_peak_bytes'] > 0
  assert row['route_ms'] > 0 and row['route_peak_bytes'] > 0
  assert abs(row['route_ratio'] - row['route_ms'] / row['plain_ms']) < 1e-9
  assert 'route ratio' in capsys.readouterr().out


@pytest.mark.slow  # four compiles
def test_each_variant_is_compiled_afresh_and_reported_best_and_median(monkeypatch):
  compiled = []
  real = overhead._compile_steps  # pylint: disable=protected-access

  def counting(jitted, *args):
    compiled.append(dict(jitted))  # kept alive, so identities stay distinct
    return real(jitted, *args)

  monkeypatch.setattr(overhead, '_compile_steps', counting)
  (row,) = overhead.measure_overhead(overhead.Case('cnn', 2, 8, 1), rounds=3,
                                     steps_per_round=1, lam=0.1, precisions=('default',),
                                     warmup=0, gradient_route=False, compiles=2)
  assert len(compiled) == 2 and sorted(compiled[0]) == sorted(compiled[1]) == ['plain',
                                                                               'tract@default']
  assert all(compiled[0][name] is not compiled[1][name] for name in compiled[0])  # afresh
  assert row['compiles'] == 2 and len(row['tract_ms_all']) == 2
  for name in ('plain', 'tract'):
    per_compile = row[f'{name}_ms_per_compile']
    assert per_compile == [statistics.median(values) for values in row[f'{name}_ms_all']]
    assert row[f'{name}_ms'] == min(per_compile)
    assert row[f'{name}_ms_median'] == statistics.median(per_compile)
  assert row['ratio'] == row['tract_ms'] / row['plain_ms']
  assert row['ratio_median'] == row['tract_ms_median'] / row['plain_ms_median']


@pytest.mark.parametrize('refresh_every, precisions, route, steps, states', [
    (0, ['highest'], False, ['plain', 'tract@highest'], ['plain', 'tract@highest']),
    (0, ['highest'], True, ['plain', 'route@highest', 'tract@highest'],
     ['plain', 'route@highest', 'tract@highest']),
    (3, ['default', 'highest'], False,
     ['amortized_due@default', 'amortized_due@highest', 'amortized_skip', 'plain',
      'tract@default', 'tract@highest'],
     ['amortized@default', 'amortized@highest', 'plain', 'tract@default', 'tract@highest']),
])
def test_variants_built_per_precision_and_amortisation(refresh_every, precisions, route,
                                                       steps, states):
  make_steps = overhead._make_steps  # pylint: disable=protected-access
  jitted, initial, state_of, (images, labels) = make_steps(
      overhead.Case('cnn', 2, 8, 1), 0.1, refresh_every, precisions, route)
  assert sorted(jitted) == steps and sorted(initial) == states
  assert set(state_of) == set(jitted) and set(state_of.values()) <= set(initial)
  assert images.shape == (2, 8, 8, 1) and labels.shape == (2,)


def test_scaling_mode_reports_statistic_costs_per_precision():
  rows = overhead.measure_scaling([8], [32], channels=3, kernel=7, stride=2, repeats=1,
                                  precisions=('default', 'highest'))
  assert [row['precision'] for row in rows] == ['default', 'highest']
  for row in rows:
    assert SCALING_FIELDS <= set(row)
    assert row['N'] == 8 * 16 * 16 and row['n'] == 147
    assert row['stats_chunked_ms'] > 0 and row['stem_fwd_bwd_ms'] > 0
    assert row['chunked_over_stem'] == row['stats_chunked_ms'] / row['stem_fwd_bwd_ms']
    assert row['explicit_peak_bytes'] > 0
  assert rows[0]['stem_fwd_bwd_ms'] == rows[1]['stem_fwd_bwd_ms']  # one stem measurement


def test_scaling_without_explicit_path():
  (row,) = overhead.measure_scaling([2], [16], channels=1, kernel=3, stride=1, repeats=1,
                                    explicit=False)
  assert row['stats_explicit_ms'] is None and row['explicit_over_stem'] is None
  assert row['N'] == 2 * 16 * 16 and row['n'] == 9


def test_every_flag_shows_its_default():
  parser = overhead.build_parser()
  for action in parser._actions:  # pylint: disable=protected-access
    if action.dest == 'help':
      continue
    formatter = parser.formatter_class(prog='overhead.py')
    text = formatter._expand_help(action)  # pylint: disable=protected-access
    assert 'default' in text, f'--{action.dest} does not say its default: {text!r}'


@pytest.mark.parametrize('argv, message', [
    (['--precision', 'fast'], 'precisions from default,high,highest'),
    (['--batches', '0'], 'integers >= 1'),
    (['--amortize', '-1'], '--amortize must be >= 0'),
    (['--rounds', '0'], '--rounds must be >= 1'),
    (['--lam', '0'], '--lam must be > 0'),
    (['--models', 'resnet1000'], "unknown ['resnet1000']"),
])
def test_bad_flags_are_rejected_with_a_message(argv, message, capsys):
  with pytest.raises(SystemExit) as raised:
    overhead.main(['--device', 'cpu', *argv])
  assert raised.value.code == 2
  assert message in capsys.readouterr().err


def test_cases_follow_the_order_asked_and_the_device_sizes():
  cases = overhead.select_cases(['resnet18', 'cnn'], on_cpu=True)
  assert [case.model for case in cases] == ['resnet18', 'cnn']
  assert cases[0].cpu_rounds == 2  # the CPU case of resnet18, not the GPU one
  gpu = overhead.select_cases(None, on_cpu=False)
  assert [case.model for case in gpu][:3] == ['resnet50', 'vit_b16', 'resnet18']
  assert overhead.select_cases(['vit_b16'], on_cpu=True)[0].batch == 64
  assert [case.name for case in overhead.select_cases(None, on_cpu=True)] == [
      'cnn', 'resnet18', 'vit_p7']  # the main job's ViT beside the CNNs


@pytest.mark.parametrize('name, patch, tokens', [('vit_p7', 7, 16), ('vit_p4', 4, 49),
                                                 ('vit_p14', 14, 4)])
def test_the_application_vits_have_their_patch_size(name, patch, tokens):
  (case,) = overhead.select_cases([name], on_cpu=True)
  jitted, states, _, (images, _) = overhead._make_steps(  # pylint: disable=protected-access
      case, 0.1, 0, ['default'], False)
  params = states['plain'][0]
  assert params['patch_embed']['kernel'].shape == (patch, patch, 1, 64)
  assert params['position_embedding'].shape == (1, tokens + 1, 64)
  assert images.shape == (128, 28, 28, 1) and sorted(jitted) == ['plain', 'tract@default']


@pytest.mark.parametrize('eager', [False, True])
def test_trace_compile_benchmark_runs_and_reports_ratios(tmp_path, eager):
  import trace_compile  # pylint: disable=g-import-not-at-top

  out = tmp_path / 'trace_compile.json'
  argv = ['--depth', '1', '--dim', '16', '--heads', '2', '--patch', '4', '--size', '8',
          '--rounds', '1', '--out', str(out)] + (['--eager'] if eager else [])
  assert trace_compile.main(argv) == 0
  result = json.loads(out.read_text())
  assert set(result['median_s']) == {'plain', 'gradient', 'optax'}
  assert all(seconds > 0 for seconds in result['median_s'].values())
  assert result['ratio_to_plain']['plain'] == 1.0
  for name, seconds in result['median_s'].items():
    assert abs(result['ratio_to_plain'][name] - seconds / result['median_s']['plain']) < 1e-9
  if not eager:
    assert set(result['median_phase_s']['optax']) == {'trace', 'lower', 'compile'}
