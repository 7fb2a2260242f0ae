"""Shared pytest set-up: fast XLA compilation for tests, and the doctest namespace."""

import os

# Tests compile hundreds of small programs; XLA's optimisation passes are most
# of that time and none of what the tests check (every assertion has its own
# tolerance). Set before JAX is imported, so subprocess tests inherit it; an
# explicit JAX_DISABLE_MOST_OPTIMIZATIONS=0 in the environment keeps them.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import tract_optax  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  doctest_namespace['tract_optax'] = tract_optax
  doctest_namespace['jnp'] = jnp
  doctest_namespace['jax'] = jax
