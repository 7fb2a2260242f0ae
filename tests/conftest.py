"""Fixtures shared by the tests."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs a test with float64 enabled, restoring the previous setting."""
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', previous)


# The fast tier (`pytest -m "not slow"`, under two minutes on two cores) keeps
# the statistics, the solve, the transformation and the Flax capture; these
# modules' end-to-end checks (training steps, subprocesses on 8 devices,
# notebooks, the GPU check's smoke run, exports, live parity) are the slow tier.
# The README's test command runs both.
_SLOW_MODULES = frozenset({
  'test_benchmark.py',
  'test_cli.py',
  'test_equinox.py',
  'test_export.py',
  'test_first_layer.py',
  'test_gpu_check.py',
  'test_gradient_route.py',
  'test_hardening.py',
  'test_models.py',
  'test_multihost.py',
  'test_notebook.py',
  'test_nnx.py',
  'test_optax_ecosystem.py',
  'test_packaging.py',
  'test_parallel.py',
  'test_parity_torch.py',
  'test_readme.py',
  'test_ridge.py',
  'test_shard_map_glue.py',
  'test_vmap.py',
  'test_wrappers.py',
})


def pytest_collection_modifyitems(items):
  for item in items:
    if item.path.name in _SLOW_MODULES:
      item.add_marker(pytest.mark.slow)
