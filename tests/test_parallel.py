"""Exact data parallelism: TrAct on 8 simulated devices equals one device.

The multi-device runs happen in a subprocess (``tests/parallel_check.py``),
because ``--xla_force_host_platform_device_count`` only takes effect before
jax initialises its backend, which this test process has long done. The
subprocess prints one JSON object of measured differences; each test below
asserts on part of it. See ``parallel_check.py`` for the model and the checks.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import tract_optax

NUM_DEVICES = 8
#: Relative tolerance (largest difference over largest parameter change) of
#: every arrangement that should reproduce the single-device update exactly.
EXACT_RTOL = 1e-5

_TESTS_DIR = pathlib.Path(__file__).resolve().parent
_REPO_ROOT = _TESTS_DIR.parent


@pytest.fixture(scope='module')
def results():
  """Runs the multi-device checks once; returns their JSON results."""
  env = dict(os.environ)
  # The script sets its own XLA flags; a device count from outside would clash.
  env.pop('XLA_FLAGS', None)
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
      [str(_REPO_ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
  completed = subprocess.run(
      [sys.executable, str(_TESTS_DIR / 'parallel_check.py')],
      env=env, cwd=_REPO_ROOT, capture_output=True, text=True, timeout=600)
  if completed.returncode != 0:
    pytest.fail('parallel_check.py failed (exit code '
                f'{completed.returncode}):\n{completed.stderr[-6000:]}')
  return json.loads(completed.stdout.strip().splitlines()[-1])


def _get(results, key):
  if key not in results:
    if results['replication_check_kwarg'] != 'check_vma' and '_vma' in key:
      pytest.skip(f'{key}: this jax has no shard_map(check_vma=...).')
    pytest.fail(f'{key} missing from the results: {sorted(results)}')
  return results[key]


def test_runs_on_eight_devices(results):
  assert results['num_devices'] == NUM_DEVICES


@pytest.mark.parametrize('key', [
    'a_jit_sharded/moment',           # jit, batch sharded, no axis_name
    'b_shard_map/moment',             # shard_map, grads pmean'ed
    'b_shard_map_vma/moment',         # shard_map with check_vma, loss pmean'ed
    'b_shard_map_vma/woodbury',
    'c_pmap/moment',                  # pmap, tract(axis_name=...)
    'c_pmap/woodbury',                # local Woodbury form, global moment
    'f_route_jit_sharded/moment',     # gradient route, jit, no axis_name
    'f_route_jit_sharded/woodbury',
    'f_route_shard_map/moment',       # gradient route, shard_map, axis_name
    'f_route_shard_map/woodbury',
    'f_route_pmap/moment',            # gradient route, pmap, axis_name
    'f_route_pmap/woodbury',
])
def test_global_statistic_reproduces_the_single_device_update(results, key):
  measured = _get(results, key)
  assert measured['scale'] > 1e-3, 'the reference run did not move'
  assert measured['rel'] < EXACT_RTOL, measured
  assert measured['max_abs'] < EXACT_RTOL, measured


def test_jit_really_shards_the_batch(results):
  assert results['a_images_num_devices/moment'] == NUM_DEVICES
  assert results['a_images_shard_shape/moment'] == [2, 8, 8, 3]


@pytest.mark.parametrize('model', ['moment', 'woodbury'])
def test_pmap_replicas_stay_identical(results, model):
  assert results[f'c_pmap_replica_spread/{model}'] == 0.0
  assert results[f'd_local_stats_replica_spread/{model}'] == 0.0
  assert results[f'f_route_pmap_replica_spread/{model}'] == 0.0


@pytest.mark.parametrize('key,owner', [
    ('e_no_axis_error/pmap', 'tract'),
    ('e_no_axis_error/shard_map', 'tract'),
    ('e_no_axis_error/gradient_route_pmap', 'tract_kernel'),
])
def test_mapped_axis_without_axis_name_is_an_error_that_names_the_fix(results, key, owner):
  error = _get(results, key)
  assert error is not None, 'a silently local statistic'
  assert error['type'] == 'ValueError'
  assert f"{owner} runs inside the named axis ['data']" in error['message']
  assert f"{owner}(..., axis_name='data')" in error['message']
  assert 'local_stats=True' in error['message']


def test_axis_name_that_is_not_bound_is_an_error(results):
  error = _get(results, 'e_unbound_axis_error/jit')
  assert error['type'] == 'ValueError'
  assert "tract(axis_name='data'): the axis 'data' is not bound here" in error['message']
  assert 'under jit with a sharded batch the statistic is already global' in error['message']


def test_statistic_forms_of_the_woodbury_model(results):
  # Both first layers (conv stem, dense embedding) are in Woodbury form on
  # one device's 2 examples and in moment form on the whole batch: the pmap
  # run reduces rows, the reference solves with the moment.
  assert results['local_woodbury/woodbury'] == [True, True]
  assert results['global_woodbury/woodbury'] == [False, False]
  assert results['local_woodbury/moment'] == [False, False]
  assert results['global_woodbury/moment'] == [False, False]


@pytest.mark.parametrize('model', ['moment', 'woodbury'])
def test_local_statistics_differ_from_the_global_update(results, model):
  # Without axis_name each device uses its own statistic (PyTorch DDP): the
  # update is that of the mean of per-device TrAct gradients, not TrAct of
  # the global batch, and the difference is far beyond rounding.
  assert results[f'd_local_stats/{model}']['rel'] > 0.05
  assert results[f'd_local_stats_vs_by_hand/{model}']['rel'] < EXACT_RTOL


def test_local_statistics_after_pmean_make_replicas_diverge(results):
  # Gradients pmean'ed first, then tract without axis_name: every replica
  # preconditions the same gradient with a different statistic.
  assert results['d_naive_replica_spread/moment'] > 1e-3


def test_pmean_of_gradients_under_check_vma_is_a_no_op(results):
  # With shard_map's replication checking, gradients of replicated parameters
  # arrive summed over devices and pmean leaves them so: the update is
  # NUM_DEVICES times too large (exactly so on the first step; the second
  # starts from other parameters). Hence pmean the loss instead.
  measured = _get(results, 'b_shard_map_vma_pmean_grads/moment')
  assert measured['rel'] > 1.0


@pytest.mark.parametrize('rows_per_device', [1, 3, 7],
                         ids=['gathered', 'local_woodbury', 'moment'])
def test_all_reduce_stats_under_vmap_equals_stats_of_all_rows(rows_per_device):
  """all_reduce_stats over a named vmap axis (no devices needed) gives every
  member the statistic of all 4 x rows_per_device rows (n = 5 features). The
  form follows the global row count: with 1 row per member (4 < 5 in all) the
  rows of all members are gathered, in member order; with 3 (Woodbury form
  locally, 12 >= 5 in all) each member turns its rows into a moment first, so
  no member factors a (members x rows)^2 system."""
  rows = np.random.default_rng(0).standard_normal(
      (4, rows_per_device, 5)).astype(np.float32)
  reduced = jax.vmap(
      lambda r: tract_optax.all_reduce_stats(tract_optax.dense_stats(r), 'i'),
      axis_name='i')(rows)
  everything = tract_optax.dense_stats(rows.reshape(-1, 5))
  assert reduced.is_woodbury == (4 * rows_per_device < 5)
  np.testing.assert_array_equal(reduced.count, 4.0 * rows_per_device)
  for member in range(4):
    if reduced.is_woodbury:
      np.testing.assert_array_equal(reduced.rows[member], rows.reshape(-1, 5))
    else:
      np.testing.assert_allclose(reduced.moment[member], everything.moment,
                                 rtol=1e-6, atol=1e-6)
