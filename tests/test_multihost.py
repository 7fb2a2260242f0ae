"""Multi-host for real: two JAX processes on loopback equal one process.

Two workers (``tests/multihost_worker.py``) run with ``jax.distributed`` on
``localhost``, 4 simulated CPU devices each and gloo collectives, and train
one step of small Flax Linen models with TrAct on the first layer, the global
batch of 16 sharded over all 8 devices, each process feeding its half: under
``jit`` with ``tract(lam)`` (no ``axis_name``; XLA makes the statistic global),
and under ``shard_map`` with ``tract(lam, axis_name='data')`` and the loss
``pmean``'ed. This test process computes the single-process whole-batch step
itself and asserts that every parameter of both processes matches it.

The workers get a free port picked at run time and a hard time limit; if one
fails, hangs or cannot use gloo, both are killed and the test fails with their
stderr. Nothing is skipped: a jax without gloo CPU collectives is a failure.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tract_optax
from tests import multihost_worker as worker

#: Relative tolerance of every parameter's change against the reference.
RTOL = 1e-5
#: Hard limit for both workers together, start to exit, in seconds.
TIMEOUT_S = 120
#: After one worker fails, how long the other may take to fail on its own
#: (its error is often the informative one) before it is killed.
GRACE_S = 10
#: Attempts with a fresh port when the picked one was taken meanwhile.
PORT_ATTEMPTS = 3

_TESTS_DIR = pathlib.Path(__file__).resolve().parent
_REPO_ROOT = _TESTS_DIR.parent
_WORKER = _TESTS_DIR / 'multihost_worker.py'
#: What a worker's stderr says when the coordinator's port was taken (gRPC
#: logs 'Failed to add port to server', and the process then crashes).
_PORT_TAKEN = re.compile(
    r'failed to add port|address already in use|failed to bind', re.IGNORECASE)

Results = Dict[str, np.ndarray]


def _free_port() -> int:
  """A TCP port free on loopback right now (the kernel's pick)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def _worker_env() -> Dict[str, str]:
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the worker sets its own device count
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
      [str(_REPO_ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
  for name in ('no_proxy', 'NO_PROXY'):  # keep gRPC on loopback off proxies
    env[name] = ','.join(p for p in [env.get(name), 'localhost,127.0.0.1'] if p)
  return env


def _stderr_tail(path: pathlib.Path, limit: int = 4000) -> str:
  """The end of a worker's stderr, without gloo's connection chatter."""
  if not path.exists():
    return '(no stderr)'
  lines = [line for line in path.read_text(errors='replace').splitlines()
           if not line.startswith('[Gloo] Rank')]
  return '\n'.join(lines)[-limit:]


class _WorkerFailure(Exception):
  """The workers did not both finish; ``str`` says how, with their stderr."""

  def __init__(self, message: str, port_taken: bool = False):
    super().__init__(message)
    self.port_taken = port_taken


class _Workers:
  """Both worker processes of one attempt, and their logs."""

  def __init__(self, out_dir: pathlib.Path, port: int):
    self.out_dir = out_dir
    self.port = port
    self.logs = [out_dir / f'process{i}.stderr' for i in range(worker.NUM_PROCESSES)]
    self.procs: List[subprocess.Popen] = []
    env = _worker_env()
    for process_id, log_path in enumerate(self.logs):
      with open(log_path, 'wb') as stderr:
        self.procs.append(subprocess.Popen(
            [sys.executable, str(_WORKER), '--port', str(port),
             '--process-id', str(process_id), '--out', str(out_dir)],
            env=env, cwd=_REPO_ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True))

  def kill(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
    for proc in self.procs:
      proc.wait()

  def report(self, headline: str) -> str:
    parts = [headline]
    for process_id, (proc, log_path) in enumerate(zip(self.procs, self.logs)):
      parts.append(f'--- process {process_id} (exit code {proc.returncode}), '
                   f'stderr:\n{_stderr_tail(log_path)}')
    return '\n'.join(parts)

  def wait(self, deadline: float) -> None:
    """Waits for both to exit 0; raises :class:`_WorkerFailure` otherwise."""
    failed_at = None
    while True:
      codes = [proc.poll() for proc in self.procs]
      if all(code == 0 for code in codes):
        return
      now = time.monotonic()
      if failed_at is None and any(code not in (None, 0) for code in codes):
        failed_at = now
      if all(code is not None for code in codes) or (
          failed_at is not None and now - failed_at > GRACE_S):
        break
      if now > deadline:
        self.kill()
        raise _WorkerFailure(self.report(
            f'The two jax.distributed workers did not finish within {TIMEOUT_S} s '
            f'(port {self.port}); both were killed.'))
      time.sleep(0.05)
    self.kill()
    stderr = '\n'.join(_stderr_tail(path) for path in self.logs)
    if any(proc.returncode == worker.NO_GLOO_EXIT_CODE for proc in self.procs):
      headline = ('gloo CPU collectives are unavailable in this jax '
                  f'{jax.__version__}; the multi-host test needs them (it is not '
                  'skipped).')
    else:
      headline = f'A jax.distributed worker failed (port {self.port}).'
    raise _WorkerFailure(self.report(headline),
                         port_taken=bool(_PORT_TAKEN.search(stderr)))


def _run_workers(out_root: pathlib.Path, references: Dict) -> List[Results]:
  """Runs both workers (a fresh port per attempt) and loads their results.

  While they run, this process fills ``references`` (:func:`_references`).
  """
  deadline = time.monotonic() + TIMEOUT_S
  for attempt in range(PORT_ATTEMPTS):
    out_dir = out_root / f'attempt{attempt}'
    out_dir.mkdir()
    workers = _Workers(out_dir, _free_port())
    try:
      if not references:
        references.update(_references())
      workers.wait(deadline)
    except _WorkerFailure as failure:
      if failure.port_taken and attempt + 1 < PORT_ATTEMPTS:
        continue
      pytest.fail(str(failure), pytrace=False)
    finally:
      workers.kill()
    results = []
    for process_id in range(worker.NUM_PROCESSES):
      path = out_dir / f'process{process_id}.npz'
      if not path.exists():
        pytest.fail(workers.report(f'Worker {process_id} exited 0 but wrote no '
                                   f'{path.name}.'), pytrace=False)
      with np.load(path) as data:
        results.append({key: data[key] for key in data.files})
    return results
  raise AssertionError('unreachable')


def _local_statistic_error(problem: worker.Problem) -> float:
  """Relative change of the stem's TrAct gradient (whole-batch gradient) when
  the statistic is that of one device's rows instead of the whole batch."""
  params = problem.init()
  x, labels = problem.batch()
  per_device = worker.GLOBAL_BATCH // worker.NUM_DEVICES

  def stem_stats(inputs):
    _, stats = tract_optax.linen.apply_with_stats(
        problem.module, {'params': params}, inputs, layers=[problem.first_layer])
    return stats[problem.first_layer]

  @jax.jit
  def error(params, x, labels):
    def loss(params):
      logits = problem.module.apply({'params': params}, x)
      return worker.cross_entropy(logits, labels)

    grad = jax.grad(loss)(params)[problem.first_layer[0]]['kernel']
    exact = tract_optax.precondition(grad, stem_stats(x), problem.lam)
    local = tract_optax.precondition(grad, stem_stats(x[:per_device]), problem.lam)
    return jnp.max(jnp.abs(local - exact)) / jnp.max(jnp.abs(exact))

  return float(error(params, x, labels))


def _references() -> Dict[str, Dict[Any, Any]]:
  """What this process computes itself.

  Returns:
    ``{'steps': {(problem, route): flat parameters after the single-process
    whole-batch step}, 'local_statistic_error': {problem: the control of
    :func:`_local_statistic_error`}}``.
  """
  steps, controls = {}, {}
  for case in worker.CASES:
    if (case.problem, case.route) not in steps:
      steps[(case.problem, case.route)] = worker.flatten(
          worker.single_process_step(case))
    if case.problem not in controls:
      controls[case.problem] = _local_statistic_error(worker.PROBLEMS[case.problem])
  return {'steps': steps, 'local_statistic_error': controls}


@pytest.fixture(scope='module')
def run(tmp_path_factory) -> Tuple[List[Results], Dict[str, Dict[Any, Any]]]:
  """Both workers' results (process 0 first) and :func:`_references`."""
  references: Dict[str, Dict[Any, Any]] = {}
  results = _run_workers(tmp_path_factory.mktemp('multihost'), references)
  return results, references


def _relative_errors(case: worker.Case, results: Results,
                     references: Dict) -> Dict[str, Tuple[float, float]]:
  """Per parameter: (largest change difference / largest change, that change)."""
  reference = references['steps'][(case.problem, case.route)]
  params0 = worker.flatten(worker.PROBLEMS[case.problem].init())
  errors = {}
  for key, start in params0.items():
    ours = results[f'{case.name}/params/{key}'].astype(np.float64) - start
    ref = reference[key].astype(np.float64) - start
    scale = float(np.max(np.abs(ref)))
    errors[key] = (float(np.max(np.abs(ours - ref))) / scale, scale)
  return errors


def test_two_processes_with_four_devices_each(run):
  results, _ = run
  for process_id, result in enumerate(results):
    assert int(result['process_index']) == process_id
    assert int(result['process_count']) == worker.NUM_PROCESSES
    assert int(result['device_count']) == worker.NUM_DEVICES
    assert int(result['local_device_count']) == worker.DEVICES_PER_PROCESS
    assert str(result['collectives']) == 'gloo'
    assert result['mesh_process_indices'].tolist() == [0] * 4 + [1] * 4
    assert result['cases'].tolist() == [c.name for c in worker.CASES]


@pytest.mark.parametrize('case', worker.CASES, ids=lambda case: case.name)
def test_batch_is_sharded_over_all_eight_devices(run, case):
  results, _ = run
  problem = worker.PROBLEMS[case.problem]
  per_device = worker.GLOBAL_BATCH // worker.NUM_DEVICES
  for result in results:
    assert int(result[f'{case.name}/batch_devices']) == worker.NUM_DEVICES
    assert result[f'{case.name}/batch_global_shape'].tolist() == [
        worker.GLOBAL_BATCH, *problem.example_shape]
    assert result[f'{case.name}/batch_shard_shape'].tolist() == [
        per_device, *problem.example_shape]


@pytest.mark.parametrize('case', worker.CASES, ids=lambda case: case.name)
def test_update_equals_the_single_process_whole_batch_update(run, case):
  results, references = run
  for process_id, result in enumerate(results):
    errors = _relative_errors(case, result, references)
    stem_error, stem_scale = errors['stem/kernel']
    assert stem_scale > 1e-3, 'the reference step did not move the stem'
    assert stem_error < RTOL, (process_id, errors)
    worst = max(errors, key=lambda key: errors[key][0])
    assert errors[worst][0] < RTOL, (process_id, worst, errors)


@pytest.mark.parametrize('case', worker.CASES, ids=lambda case: case.name)
def test_all_replicas_hold_the_same_parameters(run, case):
  results, _ = run
  for result in results:
    assert float(result[f'{case.name}/replica_spread']) == 0.0
  prefix = f'{case.name}/params/'
  keys = [key for key in results[0] if key.startswith(prefix)]
  assert keys
  for key in keys:
    np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)


def test_statistic_forms(run):
  # What the step traced: one device's statistic under shard_map, the whole
  # batch's under jit. conv_woodbury is local Woodbury (8 patch rows < 27)
  # but global moment (64 >= 27); dense_woodbury is Woodbury in both (2 and
  # 16 rows < 64 features), so shard_map gathers rows across processes.
  results, _ = run
  expected = {
      'conv/optax/jit': [False], 'conv/optax/shard_map': [False],
      'conv_woodbury/optax/jit': [False], 'conv_woodbury/optax/shard_map': [True],
      'dense_woodbury/optax/jit': [True], 'dense_woodbury/optax/shard_map': [True],
  }
  for name, forms in expected.items():
    if name in {c.name for c in worker.CASES}:
      assert results[0][f'{name}/traced_woodbury'].tolist() == forms, name


@pytest.mark.parametrize('problem', sorted({c.problem for c in worker.CASES}))
def test_one_devices_statistic_would_fail_the_tolerance(run, problem):
  """The comparison discriminates: TrAct with one device's statistic instead
  of the global one moves the stem's update far beyond :data:`RTOL`."""
  _, references = run
  assert references['local_statistic_error'][problem] > 1e3 * RTOL


@pytest.mark.parametrize('problem', sorted(
    {c.problem for c in worker.CASES if c.route == 'gradient'}))
def test_gradient_route_reference_equals_the_optax_route(run, problem):
  """Single process, whole batch: ``apply_tract`` + SGD gives the update of
  ``tract`` + SGD fed by ``apply_with_stats``, to float32 rounding."""
  _, references = run
  gradient = references['steps'][(problem, 'gradient')]
  optax_step = references['steps'][(problem, 'optax')]
  for key in optax_step:
    np.testing.assert_allclose(gradient[key], optax_step[key], rtol=1e-5,
                               atol=1e-6, err_msg=key)
