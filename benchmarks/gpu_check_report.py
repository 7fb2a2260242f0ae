"""Bookkeeping of ``benchmarks/gpu_check.sh``: environment, part records, summary.

The shell script runs each part under its own time limit; this module turns
what a part left behind into one JSON record per part and, at the end, prints
the summary table and writes it to ``summary.md``. It imports no JAX except
in ``env`` and ``find-data``, so a broken JAX install still gets a summary.

Subcommands:
  env        the environment (versions, device) as JSON; the first JAX start.
  find-data  prints the Fashion-MNIST folder part (d) would read, or exits 3
             with the reason it was not found.
  record     writes ``OUT_DIR/<part>_<name>.json`` for one finished part.
  summary    prints the summary table, writes ``OUT_DIR/summary.md``; exits 1
             if any part failed, ran out of time or left no record.

Every part record holds: ``part``, ``name``, ``title``, ``status`` (ok,
failed, timeout, skipped), ``reason``, ``exit_code``, ``mode`` (gpu, smoke),
``config`` (the command and its settings), ``environment``, ``results``,
``headline`` (one line for the summary), ``wall_time_s`` and ``limit_s``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from typing import Any, Dict, List, Optional, Sequence

#: Part letter -> (file stem, title), in the order the summary lists them.
PARTS = {
    'a': ('tests', 'core, Flax and data-parallel tests'),
    'b': ('overhead', 'train-step time and peak memory, TrAct / plain'),
    'c': ('scaling', 'statistic vs the stem at the ResNet-50 stem'),
    'd': ('main_job', 'main job, --preset paper tuned protocol (short)'),
}

#: Fields every part record has (the smoke test asserts them).
RECORD_FIELDS = ('part', 'name', 'title', 'status', 'reason', 'exit_code', 'mode', 'config',
                 'environment', 'results', 'headline', 'wall_time_s', 'limit_s')

#: Exit codes of ``timeout``: 124 after the signal, 137 after the follow-up SIGKILL.
TIMEOUT_CODES = (124, 137)

#: A line of pytest -q progress: outcome characters, then an optional ``[ 42%]``.
PROGRESS_LINE = re.compile(r'^([.FEsxX]+)(?:\s*\[\s*\d+%\])?$')

#: Packages whose versions the environment lists (``importlib.metadata`` names).
PACKAGES = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda13-plugin', 'jax-cuda13-pjrt',
            'flax', 'optax', 'numpy', 'torch', 'torch_tract', 'pytest', 'pytest-xdist', 'tqdm',
            'matplotlib')


def _version(package: str) -> Optional[str]:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _git(repo: pathlib.Path, *args: str) -> Optional[str]:
  """Output of a git command in ``repo``, or None (no git, or not a checkout)."""
  try:
    completed = subprocess.run(['git', '-C', str(repo), *args],
                               capture_output=True, text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return completed.stdout.strip() if completed.returncode == 0 else None


def environment(repo: pathlib.Path) -> Dict[str, Any]:
  """Versions, the JAX backend and its devices, and where tract_optax comes from."""
  env: Dict[str, Any] = {
      'time_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'python': platform.python_version(), 'executable': sys.executable,
      'machine': platform.machine(), 'cpu_count': os.cpu_count(),
      'versions': {name: _version(name) for name in PACKAGES},
      'git_commit': _git(repo, 'rev-parse', 'HEAD'),
      'git_uncommitted_changes': (lambda status: None if status is None else bool(status))(
          _git(repo, 'status', '--porcelain', '--untracked-files=no')),
      'JAX_PLATFORMS': os.environ.get('JAX_PLATFORMS'),
      'XLA_FLAGS': os.environ.get('XLA_FLAGS'),
  }
  try:
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.devices()
    env.update(jax=jax.__version__, platform=devices[0].platform,
               device_kind=devices[0].device_kind, device_count=len(devices),
               default_matmul_precision=str(jax.config.jax_default_matmul_precision))
  except Exception as error:  # pylint: disable=broad-except
    env['jax_error'] = f'{type(error).__name__}: {error}'
  try:
    import tract_optax  # pylint: disable=g-import-not-at-top
    env['tract_optax_file'] = tract_optax.__file__
  except Exception as error:  # pylint: disable=broad-except
    env['tract_optax_error'] = f'{type(error).__name__}: {error}'
  return env


def _data_module():
  """The experiment application's data module (``experiment/`` on the path)."""
  try:
    return importlib.import_module('tract_experiment.data')
  except ImportError as error:
    raise ImportError('cannot import tract_experiment.data (put experiment/ on PYTHONPATH or '
                      f'install it: pip install -e ./experiment): {error}') from None


def find_data(requested: Optional[str], repo: pathlib.Path,
              source_only: bool = False) -> pathlib.Path:
  """The Fashion-MNIST folder for part (d); never downloads.

  Args:
    requested: ``$GPU_CHECK_DATA``: the only place looked at when set.
    repo: the repository root; its ``.gpu_data`` (see ``--stage-data``) comes
      next, then the loader's own search (``$TRACT_OPTAX_DATA``, Debian's
      ``/usr/share/datasets/fashion-mnist``).
    source_only: the loader's own search only (where ``--stage-data`` copies from).

  Returns:
    The folder holding all four IDX files.

  Raises:
    FileNotFoundError: with the places looked at.
  """
  data = _data_module()
  if source_only:
    found = data.find_fashion_mnist(None)
    looked = [f'${data.DATA_ENV_VAR}', *data.SYSTEM_FASHION_MNIST_DIRS]
  elif requested:
    found = data.find_fashion_mnist(requested)
    looked = [f'$GPU_CHECK_DATA={requested}']
  else:
    found = data.find_fashion_mnist(repo / '.gpu_data')
    found = found or data.find_fashion_mnist(None)
    looked = [str(repo / '.gpu_data'), f'${data.DATA_ENV_VAR}',
              *data.SYSTEM_FASHION_MNIST_DIRS]
  if found is None:
    raise FileNotFoundError(
        'Fashion-MNIST not found (looked in ' + ', '.join(looked) + ', each also with a '
        'fashion-mnist subfolder); this machine cannot download it. Stage it where it '
        'exists (`bash benchmarks/gpu_check.sh --stage-data` copies it into .gpu_data/) '
        'and carry .gpu_data, or point GPU_CHECK_DATA at a copy.')
  return pathlib.Path(found)


# ------------------------------------------------------------ part results


def _read_json(path: Optional[str]) -> Any:
  if not path or not os.path.isfile(path):
    return None
  try:
    with open(path) as handle:
      return json.load(handle)
  except (OSError, ValueError):
    return None


def _tests_results(junit_path: Optional[str], output_path: Optional[str]) -> Dict[str, Any]:
  """Counts, per-module counts, failures and skip reasons from pytest's JUnit XML."""
  results: Dict[str, Any] = {}
  if junit_path and os.path.isfile(junit_path):
    try:
      root = ElementTree.parse(junit_path).getroot()
    except ElementTree.ParseError as error:
      results['junit_error'] = str(error)
      root = None
    if root is not None:
      counts = {'passed': 0, 'failed': 0, 'errors': 0, 'skipped': 0}
      modules: Dict[str, Dict[str, int]] = {}
      failures: List[Dict[str, str]] = []
      skips: Dict[str, int] = {}
      for case in root.iter('testcase'):
        module = case.get('classname', '').split('.')[-1] or case.get('file', '?')
        outcome = 'passed'
        for child in case:
          if child.tag == 'failure':
            outcome = 'failed'
          elif child.tag == 'error':
            outcome = 'errors'
          elif child.tag == 'skipped' and outcome == 'passed':
            outcome = 'skipped'
            reason = (child.get('message') or '').strip()[:160]
            skips[reason] = skips.get(reason, 0) + 1
          if child.tag in ('failure', 'error'):
            failures.append({'test': f"{case.get('classname')}::{case.get('name')}",
                             'message': (child.get('message') or child.text or '')[:600]})
        counts[outcome] += 1
        modules.setdefault(module, {k: 0 for k in counts})[outcome] += 1
      results.update(counts=counts, total=sum(counts.values()), modules=modules,
                     failures=failures[:50], skip_reasons=skips)
  if output_path and os.path.isfile(output_path):
    with open(output_path, errors='replace') as handle:
      lines = [line.strip() for line in handle if line.strip()]
    summary = [line for line in lines if ' in ' in line and (
        'passed' in line or 'failed' in line or 'error' in line or 'skipped' in line)]
    if summary:
      results['pytest_summary'] = summary[-1].strip('= ')
    if 'counts' not in results:  # stopped early: count pytest's progress characters
      progress = ''.join(PROGRESS_LINE.match(line).group(1) for line in lines
                         if PROGRESS_LINE.match(line))
      if progress:
        results['progress'] = {'passed': progress.count('.'), 'failed': progress.count('F'),
                               'errors': progress.count('E'), 'skipped': progress.count('s')}
  return results


def _tests_headline(results: Dict[str, Any]) -> str:
  counts = results.get('counts')
  if not counts:
    progress = results.get('progress')
    if progress:
      return ('no test report; so far ' +
              ', '.join(f'{value} {key}' for key, value in progress.items()))
    return results.get('pytest_summary', 'no test report')
  text = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
          f"{counts['skipped']} skipped")
  if results.get('failures'):
    text += '; first failure: ' + results['failures'][0]['test']
  return text


def _fmt(value: Optional[float], spec: str = '.3f') -> str:
  return 'n/a' if value is None else format(value, spec)


def _overhead_headline(rows: List[Dict[str, Any]]) -> str:
  parts = []
  for row in rows:
    text = f"{row['model']} b{row['batch']} {row['precision']}: {_fmt(row['ratio'])}"
    if row.get('compiles', 1) > 1:
      text += f" (best of {row['compiles']} compiles; median {_fmt(row.get('ratio_median'))})"
    if row.get('route_ratio') is not None:
      text += f" (gradient route {_fmt(row['route_ratio'])})"
    if row.get('amortized_ratio') is not None:
      text += f" (amortised {_fmt(row['amortized_ratio'])})"
    text += f", peak {_fmt(row.get('peak_ratio'))}"
    parts.append(text)
  return 'step-time ratio ' + '; '.join(parts) if parts else 'no rows'


def _scaling_headline(rows: List[Dict[str, Any]]) -> str:
  parts = [f"b{row['batch']} {row['image_size']} px {row['precision']}: statistic "
           f"{_fmt(row['stats_chunked_ms'], '.2f')} ms = {_fmt(row['chunked_over_stem'], '.2f')}x "
           f"stem fwd+wgrad {_fmt(row['stem_fwd_bwd_ms'], '.2f')} ms" for row in rows]
  return '; '.join(parts) if parts else 'no rows'


def _main_job_results(folder: Optional[str]) -> Dict[str, Any]:
  """The tuned table, chosen lrs, test accuracy of each choice, timing, from ``results.json``.

  ``accuracy[scale][budget][method]`` holds the chosen ``lr``, the test
  ``mean``/``std`` of that choice and its ``val_mean``; ``speedups`` the tuned
  speedup texts. A results.json the trainer left partial (stopped at the time
  limit) gives ``partial``, ``runs`` and ``runs_planned`` only.
  """
  results: Dict[str, Any] = {'folder': folder}
  loaded = _read_json(os.path.join(folder, 'results.json')) if folder else None
  if not isinstance(loaded, dict):
    results['error'] = 'no results.json'
    return results
  summary = loaded.get('summary') or {}
  accuracy: Dict[str, Any] = {}
  speedups: Dict[str, Any] = {}
  for scale, scale_summary in (summary.get('scales') or {}).items():
    for budget, row in (scale_summary.get('table') or {}).items():
      for method, stats in row.items():
        accuracy.setdefault(scale, {}).setdefault(str(budget), {})[method] = {
            key: stats.get(key) for key in ('lr', 'mean', 'std', 'val_mean', 'seeds',
                                            'train_time_s')}
    for method, entries in (scale_summary.get('speedups') or {}).items():
      speedups.setdefault(scale, {})[method] = [entry.get('text') for entry in entries]
  results.update(title=loaded.get('title'), table=loaded.get('table'),
                 lr_grid=loaded.get('lr_grid'), trials=loaded.get('trials'),
                 seconds_table=loaded.get('seconds_table') or None,
                 group_runs=max([run.get('group_runs', 1) for run in loaded.get('runs') or []],
                                default=None),
                 lines=summary.get('lines'), accuracy=accuracy, speedups=speedups,
                 timing=loaded.get('timing'), partial=bool(loaded.get('partial')),
                 runs=len(loaded.get('runs') or []), runs_planned=loaded.get('runs_planned'),
                 train_examples=loaded.get('train_examples'),
                 val_examples=loaded.get('val_examples'),
                 test_examples=loaded.get('test_examples'))
  return results


def _main_job_headline(results: Dict[str, Any]) -> str:
  if results.get('error'):
    return results['error']
  if results.get('partial'):
    return (f"partial: {results.get('runs', 0)} of {results.get('runs_planned')} runs "
            'finished, no summary')
  parts = []
  for scale_table in results.get('accuracy', {}).values():
    for budget, row in scale_table.items():
      methods = ', '.join(f"{method} {_fmt(stats.get('mean'), '.4f')} (lr {stats.get('lr')})"
                          for method, stats in row.items())
      parts.append(f'{budget} ep: {methods}')
  return (f"{results.get('runs', 0)} runs; test accuracy at the lr chosen on validation "
          + '; '.join(parts))


def _config(text: Optional[str]) -> Dict[str, Any]:
  """The ``--config`` JSON object; text that is not one is kept as ``raw``."""
  if not text:
    return {}
  try:
    value = json.loads(text)
  except ValueError:
    return {'raw': text}
  return value if isinstance(value, dict) else {'raw': text}


def record(args: argparse.Namespace) -> Dict[str, Any]:
  """Builds and writes one part's record; returns it."""
  name, title = PARTS[args.part]
  if args.skip_reason:
    status, reason = 'skipped', args.skip_reason
  elif args.exit_code == 0:
    status, reason = 'ok', None
  elif args.exit_code in TIMEOUT_CODES and args.limit > 0:
    status, reason = 'timeout', f'stopped at its time limit of {args.limit:g} s'
  else:
    status, reason = 'failed', f'exit code {args.exit_code}'
  if args.part == 'a':
    results: Any = _tests_results(args.junit, args.output)
    headline = _tests_headline(results)
  elif args.part in ('b', 'c'):
    rows = _read_json(args.results) or []
    results = {'rows': rows}
    headline = (_overhead_headline if args.part == 'b' else _scaling_headline)(rows)
  else:
    results = _main_job_results(args.main_job) if status != 'skipped' else {}
    headline = _main_job_headline(results) if status != 'skipped' else ''
  if status != 'ok':
    headline = f'{reason}' + (f'; {headline}' if headline else '')
  entry = {
      'part': args.part, 'name': name, 'title': title, 'status': status, 'reason': reason,
      'exit_code': None if status == 'skipped' else args.exit_code, 'mode': args.mode,
      'config': {'command': args.command, 'limit_s': args.limit, **_config(args.config)},
      'environment': _read_json(args.env) or {},
      'results': results, 'headline': headline,
      'wall_time_s': round(args.wall, 2), 'limit_s': args.limit,
  }
  path = os.path.join(args.out_dir, f'{args.part}_{name}.json')
  with open(path, 'w') as handle:
    json.dump(entry, handle, indent=1)
  return entry


# ----------------------------------------------------------------- summary


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines.extend('| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows)
  return lines


def _mib(value: Optional[int]) -> str:
  return 'n/a' if value is None or value < 0 else f'{value / 2**20:.0f} MiB'


def summary_text(out_dir: str, parts: Sequence[str], total_s: Optional[float]) -> str:
  """The Markdown summary of every part's record in ``out_dir``."""
  records = {}
  for part in parts:
    records[part] = _read_json(os.path.join(out_dir, f'{part}_{PARTS[part][0]}.json'))
  env = next((r['environment'] for r in records.values() if r and r.get('environment')), {})
  mode = next((r['mode'] for r in records.values() if r), '?')
  versions = env.get('versions', {})
  lines = [f'# tract_optax GPU check ({mode})', '',
           f"{env.get('device_kind', '?')} ({env.get('platform', '?')}, "
           f"{env.get('device_count', '?')} device(s)); jax {versions.get('jax')}, "
           f"jaxlib {versions.get('jaxlib')}, flax {versions.get('flax')}, "
           f"optax {versions.get('optax')}; Python {env.get('python')}; "
           f"{env.get('time_utc', '')}" + (f'; total {total_s:.0f} s' if total_s else ''), '']
  rows = []
  for part in parts:
    entry = records[part]
    if entry is None:
      rows.append([f'({part}) {PARTS[part][0]}', 'missing', '', '', 'no record written'])
      continue
    limit = f"{entry['limit_s']:g}" if entry['limit_s'] else 'none'
    rows.append([f"({part}) {entry['name']}", entry['status'], f"{entry['wall_time_s']:.0f}",
                 limit, entry['headline'].replace('|', '/')])
  lines += _table(['part', 'status', 'wall s', 'limit s', 'result'], rows)

  overhead = records.get('b')
  if overhead and overhead['results'].get('rows'):
    lines += ['', '## (b) TrAct / plain, train step (median of interleaved rounds)', '']
    lines += _table(
        ['model', 'batch', 'precision', 'plain ms', 'TrAct ms', 'ratio',
         'gradient route ratio', 'amortised ratio (K)', 'plain peak', 'TrAct peak',
         'peak ratio', 'route peak ratio', 'amortised peak ratio'],
        [[r['model'], r['batch'], r['precision'], _fmt(r['plain_ms'], '.2f'),
          _fmt(r['tract_ms'], '.2f'), _fmt(r['ratio']), _fmt(r.get('route_ratio')),
          _fmt(r.get('amortized_ratio')) + (f" ({r['refresh_every']})"
                                            if r.get('refresh_every') else ''),
          _mib(r['plain_peak_bytes']), _mib(r['tract_peak_bytes']), _fmt(r.get('peak_ratio')),
          _fmt(r.get('route_peak_ratio')), _fmt(r.get('amortized_peak_ratio'))]
         for r in overhead['results']['rows']])
  scaling = records.get('c')
  if scaling and scaling['results'].get('rows'):
    lines += ['', '## (c) statistic vs the stem (forward + weight gradient)', '']
    lines += _table(
        ['batch', 'size', 'N', 'n', 'precision', 'stem fwd ms', 'stem fwd+wgrad ms',
         'statistic ms', 'statistic / stem', 'explicit ms', 'explicit / stem'],
        [[r['batch'], r['image_size'], r['N'], r['n'], r['precision'],
          _fmt(r['stem_fwd_ms'], '.3f'), _fmt(r['stem_fwd_bwd_ms'], '.3f'),
          _fmt(r['stats_chunked_ms'], '.3f'), _fmt(r['chunked_over_stem'], '.2f'),
          _fmt(r.get('stats_explicit_ms'), '.3f'), _fmt(r.get('explicit_over_stem'), '.2f')]
         for r in scaling['results']['rows']])
  main_job = records.get('d')
  if main_job and main_job['results'].get('table'):
    lines += ['', f"## (d) {main_job['results'].get('title') or 'main job'}", '']
    if main_job['results'].get('trials'):
      lines += [main_job['results']['trials'], '']
    lines += ['```', main_job['results']['table'].rstrip()]
    for block in ('seconds_table', 'lr_grid'):
      if main_job['results'].get(block):
        lines += ['', main_job['results'][block].rstrip()]
    lines += ['```']
    lines += [line for line in main_job['results'].get('lines') or []]
  problems = [entry for entry in records.values() if entry and entry['status'] != 'ok']
  failures = (records.get('a') or {}).get('results', {}).get('failures', [])
  if problems or failures:
    lines += ['', '## Not ok (failed, out of time or skipped)', '']
    lines += [f"- ({entry['part']}) {entry['name']}: {entry['status']}: {entry['reason']}"
              for entry in problems]
    lines += [f"- failed test {failure['test']}: {failure['message'].splitlines()[0][:200]}"
              for failure in failures[:10] if failure['message']]
  return '\n'.join(lines) + '\n'


def summary(args: argparse.Namespace) -> int:
  """Prints and writes the summary; 1 if any part is not ok (skipped is fine)."""
  parts = [part for part in args.parts.split(',') if part]
  text = summary_text(args.out_dir, parts, args.total)
  with open(os.path.join(args.out_dir, 'summary.md'), 'w') as handle:
    handle.write(text)
  print(text, end='')
  bad = []
  for part in parts:
    entry = _read_json(os.path.join(args.out_dir, f'{part}_{PARTS[part][0]}.json'))
    if entry is None or entry['status'] not in ('ok', 'skipped'):
      bad.append(part)
  return 1 if bad else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command line of the helper (see the module docstring)."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  commands = parser.add_subparsers(dest='subcommand', required=True)
  env_parser = commands.add_parser('env', help='write the environment as JSON')
  env_parser.add_argument('--out', required=True, help='JSON file to write')
  env_parser.add_argument('--repo', default='.', help='repository root')
  data_parser = commands.add_parser('find-data', help="print part (d)'s data folder")
  data_parser.add_argument('--repo', default='.', help='repository root')
  data_parser.add_argument('--source-only', action='store_true',
                           help="only the loader's own search (what --stage-data copies)")
  record_parser = commands.add_parser('record', help="write one part's record")
  add = record_parser.add_argument
  add('--out-dir', required=True, help='the check output folder')
  add('--part', required=True, choices=sorted(PARTS), help='part letter')
  add('--mode', required=True, choices=['gpu', 'smoke'], help='full GPU run or smoke')
  add('--exit-code', type=int, default=0, help="the part command's exit status")
  add('--wall', type=float, default=0.0, help='wall time of the part, seconds')
  add('--limit', type=float, default=0.0, help='time limit of the part, seconds (0: none)')
  add('--command', default='', help='the command line run')
  add('--config', default=None, help='more settings, as a JSON object')
  add('--env', default=None, help='environment JSON written by `env`')
  add('--output', default=None, help="the part's captured output")
  add('--junit', default=None, help="(a): pytest's JUnit XML")
  add('--results', default=None, help='(b), (c): the JSON rows of overhead.py --out')
  add('--main-job', default=None, help="(d): the trainer's --out folder")
  add('--skip-reason', default=None, help='record the part as skipped, for this reason')
  summary_parser = commands.add_parser('summary', help='print and write the summary')
  summary_parser.add_argument('--out-dir', required=True, help='the check output folder')
  summary_parser.add_argument('--parts', default='a,b,c,d', help='parts run, in order')
  summary_parser.add_argument('--total', type=float, default=None, help='total wall seconds')
  args = parser.parse_args(argv)

  if args.subcommand == 'env':
    env = environment(pathlib.Path(args.repo).resolve())
    with open(args.out, 'w') as handle:
      json.dump(env, handle, indent=1)
    print(f"{env.get('device_kind', '?')} ({env.get('platform', env.get('jax_error'))}), "
          f"jax {env.get('jax')}, flax {env['versions'].get('flax')}, "
          f"optax {env['versions'].get('optax')}, Python {env['python']}")
    return 0 if 'jax_error' not in env else 1
  if args.subcommand == 'find-data':
    try:
      print(find_data(os.environ.get('GPU_CHECK_DATA'), pathlib.Path(args.repo).resolve(),
                      args.source_only))
    except (FileNotFoundError, ImportError) as error:
      print(error, file=sys.stderr)
      return 3
    return 0
  if args.subcommand == 'record':
    entry = record(args)
    print(f"({entry['part']}) {entry['name']}: {entry['status']} in "
          f"{entry['wall_time_s']:.0f} s: {entry['headline']}")
    return 0
  return summary(args)


if __name__ == '__main__':
  sys.exit(main())
