"""The overhead benchmark runs end to end on tiny settings and writes its JSON."""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

import overhead  # pylint: disable=g-import-not-at-top

FIELDS = {'model', 'batch', 'plain_ms', 'tract_ms', 'ratio', 'plain_peak_bytes',
          'tract_peak_bytes', 'device'}


def test_overhead_mode_writes_the_documented_fields(tmp_path, capsys):
  out = tmp_path / 'overhead.json'
  overhead.main(['--device', 'cpu', '--models', 'cnn', '--batch', '4', '--rounds', '1',
                 '--steps-per-round', '1', '--refresh-every', '2', '--amortized',
                 '--out', str(out)])
  (row,) = json.loads(out.read_text())
  assert FIELDS <= set(row)
  assert row['model'] == 'cnn' and row['batch'] == 4
  assert row['plain_ms'] > 0 and row['tract_ms'] > 0 and row['amortized_ms'] > 0
  assert abs(row['ratio'] - row['tract_ms'] / row['plain_ms']) < 1e-9
  assert row['plain_peak_bytes'] > 0 and row['tract_peak_bytes'] > 0
  assert 'ratio' in capsys.readouterr().out


def test_scaling_mode_reports_statistic_costs():
  rows = overhead.measure_scaling([8], [32], channels=3, kernel=7, stride=2, repeats=1)
  (row,) = rows
  assert row['N'] == 8 * 16 * 16 and row['n'] == 147
  assert row['stats_chunked_ms'] > 0 and row['stem_fwd_bwd_ms'] > 0
  assert row['explicit_peak_bytes'] > 0
