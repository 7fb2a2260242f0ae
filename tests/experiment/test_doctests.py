"""Every ``Example:`` in the experiment application's docstrings runs and prints what it says.

The package lives outside the library's doctest path (``experiment/``), so its
examples are run here, with the names the examples use (``tract_experiment``,
``np``, ``jax``, ``jnp``).
"""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tract_experiment

MODULES = ('cli', 'comparison', 'config', 'data', 'models', 'report', 'speedup', 'timing',
           'training')


@pytest.mark.parametrize('name', MODULES)
def test_examples_run(name):
  module = importlib.import_module(f'tract_experiment.{name}')
  names = dict(tract_experiment=tract_experiment, np=np, jax=jax, jnp=jnp)
  result = doctest.testmod(module, extraglobs=names, optionflags=doctest.ELLIPSIS,
                           verbose=False, report=True)
  assert result.failed == 0, f'{result.failed} of {result.attempted} examples failed'
  if name in ('cli', 'data', 'models', 'report', 'speedup', 'training'):
    assert result.attempted > 0
