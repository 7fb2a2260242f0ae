"""Shared pytest set-up: doctest namespace."""

import jax
import jax.numpy as jnp
import pytest

import tract_optax


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
  doctest_namespace['tract_optax'] = tract_optax
  doctest_namespace['jnp'] = jnp
  doctest_namespace['jax'] = jax
