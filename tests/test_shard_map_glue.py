"""The Flax glue's automatic first-layer selection under ``jax.shard_map``.

With shard_map's default replication checking the probe's marker must give
tangents of the primal's exact type (varying over the mesh axis); a plain
zero tangent was refused with ``Custom JVP rule must produce primal and
tangent outputs with corresponding shapes and dtypes``. The runs happen in a
subprocess (``tests/shard_map_glue_check.py``) on 8 simulated CPU devices,
since the device count is fixed once jax has initialised its backend.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import shard_map_glue_check as check
from tract_optax._src import first_layer

_TESTS_DIR = pathlib.Path(__file__).resolve().parent
_REPO_ROOT = _TESTS_DIR.parent

#: float32 TrAct against the float64 solve (measured: 1.8e-7 or less).
EXACT_RTOL = 2e-5


@pytest.fixture(scope='module')
def results():
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the script sets its own device count
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join([str(_REPO_ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
  completed = subprocess.run(
    [sys.executable, str(_TESTS_DIR / 'shard_map_glue_check.py')],
    env=env,
    cwd=_REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  if completed.returncode != 0:
    pytest.fail(f'shard_map_glue_check.py failed:\n{completed.stderr[-6000:]}')
  return json.loads(completed.stdout.strip().splitlines()[-1])


def test_runs_on_eight_devices(results):
  assert results['num_devices'] == check.NUM_DEVICES


@pytest.mark.parametrize(
  'route', ['linen_apply_tract', 'linen_apply_with_stats_tract', 'nnx_apply_tract']
)
def test_automatic_selection_under_checked_shard_map_uses_the_whole_batch(results, route):
  measured = results[route]
  assert 'error' not in measured, measured.get('error')
  assert measured['stem'] < EXACT_RTOL, measured
  assert measured['head'] < EXACT_RTOL, measured
  # Each device's own statistic gives a clearly different update: the check
  # would see an all-reduce that went missing.
  assert measured['stem_vs_local'] > 0.1, measured


def test_reference_patch_rows_match_the_explicit_convolution():
  """The float64 reference's patch matrix is the one a 'SAME' conv multiplies."""
  images, _ = check.batch()
  kernel = np.random.default_rng(1).standard_normal(check.KERNEL_SIZE + (2, 3))
  conv = jax.lax.conv_general_dilated(
    jnp.asarray(images, jnp.float32),
    jnp.asarray(kernel, jnp.float32),
    (1, 1),
    'SAME',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    precision='highest',
  )
  rows = check.patch_rows(images) @ kernel.reshape(-1, 3)
  np.testing.assert_allclose(np.asarray(conv).reshape(-1, 3), rows, rtol=1e-4, atol=1e-4)


def test_zero_tangent_keeps_the_primal_type_without_shard_map():
  x = jnp.ones((2, 3), jnp.bfloat16)
  tangent = first_layer._zero_tangent(x)
  assert tangent.shape == (2, 3) and tangent.dtype == jnp.bfloat16
  assert not np.any(np.asarray(tangent, np.float32))
