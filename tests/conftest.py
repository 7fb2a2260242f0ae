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


# The fast tier (`pytest -m "not slow"`, about two minutes on two cores) keeps
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
  'test_haiku.py',
  'test_hardening.py',
  'test_layer_ops.py',
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

# Every room of the library keeps a few quick tests in the fast tier, so that
# `-m "not slow"` exercises each module: {test module: its fast tests}.
_FAST_IN_SLOW_MODULES = {
  'test_gradient_route.py': frozenset({
    'test_apply_tract_returns_exactly_what_apply_returns',
    'test_a_kernel_wrapped_twice_is_refused_at_trace_time',
    'test_per_lane_stats_with_a_kernel_per_lane_is_exact',
  }),
  'test_nnx.py': frozenset({
    'test_auto_selects_first_conv_eagerly',
    'test_conv_settings_match_numpy_patch_matrix',
    'test_an_einsum_that_maps_rows_is_a_first_layer',
  }),
  'test_first_layer.py': frozenset({
    'test_linen_model_runs_per_trace',
    'test_linen_cached_choice_follows_the_module_fields',
    'test_a_custom_stem_is_named_as_unseen_not_a_conv_after_it_as_the_stem',
    'test_linen_differentiated_pass_chooses_without_the_probe',
    'test_linen_pass_differentiated_in_part_asks_the_probe',
  }),
  'test_ridge.py': frozenset({
    'test_relative_lambda_against_float64',
    'test_check_condition_false_never_estimates',
    'test_lambda_that_is_not_positive_at_run_time_is_refused_even_inside_jit',
  }),
  'test_equinox.py': frozenset({'test_refusals_name_the_fix', 'test_wrapping_twice_is_refused'}),
  'test_layer_ops.py': frozenset({
    'test_per_lane_kernels_on_their_own_data_are_exact',
    'test_conv_output_is_lax_and_gradient_is_tract_float32',
    'test_per_example_statistic_inside_vmap_is_refused',
  }),
  'test_haiku.py': frozenset({'test_transform_with_state_batchnorm_after_the_stem'}),
}


def pytest_collection_modifyitems(items):
  for item in items:
    name = item.path.name
    if name in _SLOW_MODULES and item.originalname not in _FAST_IN_SLOW_MODULES.get(name, ()):
      item.add_marker(pytest.mark.slow)
