"""The Optax transformation refuses misuse it can see (issue 16: items 4, 5, 7,
12, 14, 15): tract after an optimizer, statistics nobody uses, an empty
statistic, lambdas float32 cannot hold, integer gradients, an oversized
amortised moment, a failed Cholesky factorisation, ambiguous layer paths."""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tract_optax
from tests import reference
from tract_optax import linen as tract_linen
from tract_optax._src import amortize
from tract_optax._src import capture
from tract_optax._src import paths as paths_lib
from tract_optax._src import ridge as ridge_lib

_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _rows(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _grads(n=4, m=3, seed=1):
  return {'stem': {'kernel': jnp.asarray(_rows((n, m), seed)), 'bias': jnp.zeros(m)}}


# ----------------------------------------------------------------------------
# item 4: tract after an optimizer; statistics for a tx without tract; {}


def _dense_state(tx):
  model = nn.Dense(3)
  x = jnp.asarray(_rows((16, 4), 2))
  variables = model.init(jax.random.key(0), x)
  state = tract_linen.TractTrainState.create(apply_fn=model.apply,
                                             params=variables['params'], tx=tx)

  def loss(params):
    out, stats = tract_linen.apply_with_stats(model, {'params': params}, x)
    return jnp.mean((out - 1.0) ** 2), stats

  grads, stats = jax.grad(loss, has_aux=True)(state.params)
  return state, grads, stats, x


_AFTER_AN_OPTIMIZER = [
    (lambda: optax.chain(optax.scale_by_adam(), tract_optax.tract(0.1), optax.scale(-0.1)),
     r'member 0 \(ScaleByAdamState\)'),
    (lambda: optax.chain(optax.adamw(0.1), tract_optax.tract(0.1)), 'ScaleByAdamState'),
    (lambda: optax.chain(optax.sgd(0.1, momentum=0.9),
                         optax.inject_hyperparams(tract_optax.tract)(lam=0.1)),
     r'member 0 \(TraceState\)'),
    (lambda: optax.chain(optax.rmsprop(0.1), tract_optax.tract(0.1)), 'ScaleByRmsState'),
    (lambda: optax.MultiSteps(optax.chain(optax.scale_by_adam(), tract_optax.tract(0.1)), 2),
     'ScaleByAdamState'),
]


@pytest.mark.parametrize('make_tx,state_name', _AFTER_AN_OPTIMIZER)
def test_tract_after_an_optimizer_is_refused_where_the_whole_state_is_seen(make_tx, state_name):
  tx = make_tx()
  state, grads, stats, _ = _dense_state(tx)
  pattern = (r'TractTrainState.apply_gradients: tract is not first in its chain: '
             rf'.*{state_name}.*keeps per-coordinate state ahead of it.*Put tract first, or wrap '
             r'a member you vouch for in allow_before_tract. '
             r'See docs/limits.md#where-tract-sits-in-the-chain')
  with pytest.raises(ValueError, match=pattern):
    state.apply_gradients(grads=grads, tract_stats=stats)
  with pytest.raises(ValueError, match=r'stats_due: tract is not first in its chain'):
    tract_optax.stats_due(state.opt_state)


@pytest.mark.parametrize('make_tx', [
    lambda: optax.chain(tract_optax.tract(0.1), optax.sgd(0.5)),
    # stateful but harmless members before tract, and wrappers around it
    lambda: optax.chain(optax.zero_nans(), optax.clip_by_global_norm(1e3),
                        tract_optax.tract(0.1), optax.sgd(0.5)),
    lambda: optax.chain(optax.inject_hyperparams(tract_optax.tract)(lam=0.1), optax.sgd(0.5)),
    # an Adam in another multi_transform group is no chain member before tract
    lambda: optax.multi_transform(
        {'tract': optax.chain(tract_optax.tract(0.1), optax.sgd(0.5)), 'adam': optax.adam(0.5)},
        {'kernel': 'tract', 'bias': 'adam'}),
])
def test_tract_first_gives_the_tract_step(make_tx):
  tx = make_tx()
  state, grads, stats, x = _dense_state(tx)
  new = state.apply_gradients(grads=grads, tract_stats=stats)
  expected = reference.tract_solve(np.asarray(x), np.asarray(grads['kernel']), 0.1)
  step = (np.asarray(state.params['kernel'], np.float64) - np.asarray(new.params['kernel'])) / 0.5
  assert reference.rel_err(step, expected) < 1e-5


def test_statistics_for_a_tx_without_tract_are_refused():
  state, grads, stats, _ = _dense_state(optax.adam(0.1))
  with pytest.raises(ValueError, match=r'TractTrainState.apply_gradients received tract_stats, '
                     r'but its tx holds no tract, so the step would silently be a plain one. '
                     r'Put tract first in the chain.*pass no tract_stats \(gradient route\)'):
    state.apply_gradients(grads=grads, tract_stats=stats)
  plain = state.apply_gradients(grads=grads)  # a plain optimizer, no statistic: fine
  assert int(plain.step) == 1
  with pytest.raises(ValueError, match='holds no tract, so'):  # traced too
    jax.jit(lambda st, g, t: st.apply_gradients(grads=g, tract_stats=t))(state, grads, stats)


def test_a_state_restored_without_its_target_is_not_called_a_tx_without_tract():
  """A checkpoint restored without a target turns TractState into a dict: the tx
  still holds tract (its init says so), so the message must not claim otherwise."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  state, grads, stats, _ = _dense_state(optax.chain(tract_optax.tract(0.1), optax.sgd(0.5)))
  restored = state.replace(opt_state=serialization.to_state_dict(state.opt_state))
  assert 'TractState' not in repr(jax.tree.structure(restored.opt_state))
  with pytest.raises(Exception) as error:
    restored.apply_gradients(grads=grads, tract_stats=stats)
  assert 'holds no tract' not in str(error.value)


def test_an_empty_statistic_without_layers_is_refused_in_a_chain():
  tx = optax.chain(tract_optax.tract(0.1), optax.sgd(0.1))
  grads = _grads()
  with pytest.raises(ValueError, match=r'empty tract_stats \(\{\}\).*silently be a plain one'):
    tx.update(grads, tx.init(grads), grads, tract_stats={})


# ----------------------------------------------------------------------------
# item 5: lambdas float32 cannot hold; integer gradients


@pytest.mark.parametrize('lam,state', [
    (1e39, 'infinite'), (1e-40, '0 or subnormal'), (1e-45, '0 or subnormal'),
    (np.float64(1e-39), '0 or subnormal')])
def test_lambda_outside_float32_is_refused_at_construction(lam, state):
  pattern = (rf'lam = {re.escape(repr(float(lam)))} is {state}.* in float32, where the solve '
             r'runs.*between 1.18e-38 and 3.4e\+38')
  with pytest.raises(ValueError, match=pattern):
    tract_optax.tract(lam)
  with pytest.raises(ValueError, match=pattern):
    tract_optax.tract_kernel(jnp.ones((4, 2)), tract_optax.dense_stats(_rows((8, 4))), lam=lam)


def test_the_refused_lambdas_really_break_the_float32_solve():
  """Independent of the check: float32 turns them into inf or 0, and a solve with
  such a ridge is not TrAct's (NaN, or G / 0)."""
  with np.errstate(over='ignore'):  # the float32 cast of 1e39 overflows, as intended
    assert np.isinf(np.float32(1e39)) and np.float32(1e-45) < np.finfo(np.float32).tiny
    assert np.float32(1e-40) < np.finfo(np.float32).tiny
    stats = tract_optax.dense_stats(_rows((32, 4)))
    solve = jax.jit(lambda lam: tract_optax.precondition(jnp.ones((4, 2)), stats, lam))
    for lam in (1e-40, 1e-45, 1e39):
      assert np.all(np.isnan(solve(jnp.float32(lam)))), lam  # the run-time guard
  np.testing.assert_allclose(solve(jnp.float32(ridge_lib.SMALLEST_LAM)),
                             np.linalg.solve(np.asarray(stats.moment, np.float64)
                                             + ridge_lib.SMALLEST_LAM * np.eye(4),
                                             np.ones((4, 2))), rtol=1e-3)


def test_the_float32_range_bounds_are_accepted():
  tract_optax.tract(ridge_lib.SMALLEST_LAM)
  tract_optax.tract(ridge_lib.LARGEST_LAM)
  assert ridge_lib.SMALLEST_LAM == float(np.finfo(np.float32).tiny)


def test_a_schedule_that_reaches_a_subnormal_lambda_is_refused():
  with pytest.raises(ValueError, match=r'The lam schedule at step 0: lam = 1e-40 is 0 or '
                     r'subnormal'):
    tract_optax.tract(lambda step: 1e-40)
  # computed in float32, the subnormal is flushed to 0 already
  with pytest.raises(ValueError, match=r'The lam schedule reaches 0.0 at step 0'):
    tract_optax.tract(lambda step: jnp.float32(1e-40) * (step + 1))


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.int8, jnp.bool_, jnp.uint8])
def test_an_integer_gradient_is_refused(dtype):
  stats = tract_optax.dense_stats(_rows((16, 4)))
  with pytest.raises(TypeError, match=r'grad_kernel must be a floating-point gradient; got '
                     rf'dtype {jnp.dtype(dtype).name} \(its TrAct gradient would be truncated.*'
                     r'grad.astype\(jnp.float32\)'):
    tract_optax.precondition(jnp.ones((4, 2), dtype), stats, 0.1)


def test_a_concrete_lambda_of_zero_is_refused_by_precondition():
  stats = tract_optax.dense_stats(_rows((16, 4)))
  with pytest.raises(ValueError, match=r'lam must be a finite number > 0 .*got 0.0'):
    tract_optax.precondition(jnp.ones((4, 2)), stats, 0.0)
  with pytest.raises(ValueError, match=r'lam must be a finite number > 0 .*got Array\(-1'):
    tract_optax.precondition(jnp.ones((4, 2)), stats, jnp.asarray(-1.0))


# ----------------------------------------------------------------------------
# item 7: the amortised moment has a size limit


def _kernel_spec(n):
  return {'stem': {'kernel': jax.ShapeDtypeStruct((n, 2), jnp.float32)}}


def test_an_oversized_amortised_moment_is_refused_with_the_numbers():
  tx = tract_optax.tract(0.1, layers=['stem'], refresh_every=4)
  with pytest.raises(ValueError, match=r"'stem' has n = 49152 input features, so its moment "
                     r'alone would take 9 GiB \(float32\).*limited to n <= 8192 \(256 MiB\).*'
                     r'Leave refresh_every and stats_decay out: the per-batch statistic serves '
                     r"it. See docs/limits.md#the-amortised-statistics-size"):
    jax.eval_shape(tx.init, _kernel_spec(49152))
  with pytest.raises(ValueError, match=r'n = 8193 input features'):
    jax.eval_shape(tx.init, _kernel_spec(8193))
  decayed = tract_optax.tract(0.1, layers=['stem'], stats_decay=0.9)
  with pytest.raises(ValueError, match=r'n = 8193 input features'):
    jax.eval_shape(decayed.init, _kernel_spec(8193))


def test_the_amortised_limit_itself_is_accepted():
  assert amortize.MAX_AMORTIZED_FEATURES == 8192
  tx = tract_optax.tract(0.1, layers=['stem'], refresh_every=4)
  state = jax.eval_shape(tx.init, _kernel_spec(8192))
  assert state.stats_cache['stem'].moment.shape == (8192, 8192)
  # the per-batch mode keeps nothing, whatever n
  per_batch = jax.eval_shape(tract_optax.tract(0.1).init, _kernel_spec(49152))
  assert per_batch.stats_cache == {}


# ----------------------------------------------------------------------------
# item 12: a failed Cholesky factorisation warns with the numbers


def _near_constant_rows(num_rows=200, n=48, seed=0):
  """Rows of raw pixels that differ by less than one grey level: the moment's
  largest eigenvalue (~1e6) dwarfs lam = 1e-3, so float32 rounding makes the
  system indefinite."""
  rng = np.random.default_rng(seed)
  base = rng.uniform(0, 255, (1, n))
  return (base + rng.uniform(-0.5, 0.5, (num_rows, n))).astype(np.float32)


def _largest_eigenvalue(rows, lam):
  rows = np.asarray(rows, np.float64)
  system = rows.T @ rows / rows.shape[0] + lam * np.eye(rows.shape[1])
  return float(np.linalg.eigvalsh(system)[-1])


_FAILED = (r'TrAct: the Cholesky factorisation of the system solved for the kernel{of} failed in '
           r'float32, so its TrAct gradient is NaN. The system A\^T A / N \+ ridge I has largest '
           r'eigenvalue ~(?P<top>\S+) against a ridge of 0.001: float32 rounding of the statistic '
           r'\(eps 1e-07 x \S+ = \S+\) reaches the ridge.*standardise the inputs')


def _caught(fn):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    result = fn()
    jax.effects_barrier()
  return result, [str(w.message) for w in caught
                  if issubclass(w.category, tract_optax.ConditioningWarning)]


def _check_failed(messages, rows, of=''):
  assert messages, 'no warning'
  match = re.search(_FAILED.format(of=of), messages[0])
  assert match, messages[0]
  top = float(match.group('top'))
  expected = _largest_eigenvalue(rows, 1e-3)
  assert abs(top - expected) < 0.01 * expected, (top, expected)


def test_the_factorisation_really_fails_in_float32():
  rows = _near_constant_rows()
  system = np.asarray(rows, np.float64).T @ rows / len(rows) + 1e-3 * np.eye(48)
  assert np.linalg.eigvalsh(system)[0] > 0  # positive definite in float64
  moment = tract_optax.dense_stats(rows).moment
  factor = jnp.linalg.cholesky(moment + 1e-3 * jnp.eye(48))
  assert np.any(np.isnan(factor))  # but not in float32


def test_a_failed_factorisation_warns_eagerly_with_the_numbers():
  rows = _near_constant_rows()
  stats = tract_optax.dense_stats(rows)
  out, messages = _caught(lambda: tract_optax.precondition(jnp.ones((48, 3)), stats, 1e-3,
                                                            name='stem'))
  assert np.all(np.isnan(out))
  _check_failed(messages, rows, of=" of 'stem'")


def test_a_failed_factorisation_warns_under_jit_with_check_condition():
  rows = _near_constant_rows()
  grads = {'stem': {'kernel': jnp.ones((48, 3))}}
  for check, expected in ((None, 0), (True, 1)):
    tx = tract_optax.tract(1e-3, check_condition=check)
    update = jax.jit(lambda g, x: tx.update(g, tx.init(g),
                                            tract_stats={'stem': tract_optax.dense_stats(x)})[0])
    out, messages = _caught(lambda: update(grads, rows))
    assert np.all(np.isnan(out['stem']['kernel']))
    assert len(messages) == expected, messages
  _check_failed(messages, rows, of=" of 'stem'")


def test_a_statistic_with_nan_warns_that_it_holds_non_finite_entries():
  rows = _rows((40, 5))
  rows[3, 1] = np.nan
  out, messages = _caught(lambda: tract_optax.precondition(
      jnp.ones((5, 2)), tract_optax.dense_stats(rows), 0.1))
  assert np.all(np.isnan(out))
  # row 3's NaN reaches row and column 1 of the moment: 2 * 5 - 1 entries
  assert messages and ('the statistic of the kernel holds 9 non-finite entries (NaN or inf '
                       "in the layer's input), so its Cholesky factorisation failed") in messages[0]


@pytest.mark.parametrize('bad', [0.0, -0.1, 1e-40])
def test_an_injected_lambda_that_is_not_valid_under_jit_is_refused_at_run_time(bad):
  """Item 15, issue 21: a lambda known when tract is rebuilt is refused at once; a
  traced one by a host callback that makes the jitted call raise; with
  check_condition=False the check is left out and the kernel's gradient is NaN."""
  grads = _grads()
  stats = {'stem': tract_optax.dense_stats(_rows((10, 4)))}
  tx = optax.inject_hyperparams(tract_optax.tract)(lam=0.1)
  state = tx.init(grads)
  state.hyperparams['lam'] = jnp.asarray(bad)
  with pytest.raises(ValueError, match='lam'):  # eager: inject_hyperparams rebuilds tract
    tx.update(grads, state, tract_stats=stats)
  step = jax.jit(lambda g, s: tx.update(g, s, tract_stats=stats)[0])
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=r'lam = .* reached tract inside jit \(a traced value.*give the '
                     r'schedule a floor\). See docs/limits.md#a-lambda-known-only-inside-jit'):
    jax.block_until_ready(step(grads, state))
  unchecked = optax.inject_hyperparams(tract_optax.tract)(lam=0.1, check_condition=False)
  state = unchecked.init(grads)
  state.hyperparams['lam'] = jnp.asarray(bad)
  out, messages = _caught(lambda: jax.jit(
      lambda g, s: unchecked.update(g, s, tract_stats=stats)[0])(grads, state))
  assert np.all(np.isnan(out['stem']['kernel'])) and not messages
  np.testing.assert_array_equal(out['stem']['bias'], grads['stem']['bias'])


_PARALLEL_SCRIPT = textwrap.dedent('''
    import os
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
    import json, warnings
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec
    import tract_optax

    rows = np.full((200, 48), 255.0, np.float32)  # blank white raw images: M = 255^2 1 1^T
    grads = {'stem': {'kernel': jnp.ones((48, 3))}}
    tx = tract_optax.tract(1e-3, axis_name='data', check_condition=True)

    def step(x):
      out, _ = tx.update(grads, tx.init(grads), tract_stats={'stem': tract_optax.dense_stats(x)})
      return out['stem']['kernel'][None]

    if hasattr(jax, 'shard_map'):
      shard_map = jax.shard_map
    else:
      from jax.experimental.shard_map import shard_map
    mesh = Mesh(np.array(jax.devices()), ('data',))
    runs = {
        'pmap': lambda: jax.pmap(step, axis_name='data')(rows.reshape(8, 25, 48)),
        'shard_map': lambda: jax.jit(shard_map(
            step, mesh=mesh, in_specs=PartitionSpec('data'),
            out_specs=PartitionSpec('data')))(rows),
    }
    result = {'num_devices': jax.device_count()}
    for key, run in runs.items():
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = run()
        jax.effects_barrier()
      result[key] = {
          'all_nan': bool(np.all(np.isnan(np.asarray(out)))),
          'messages': [str(w.message) for w in caught
                       if issubclass(w.category, tract_optax.ConditioningWarning)],
      }
    print(json.dumps(result))
''')


@pytest.fixture(scope='module')
def parallel_results():
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join([str(_REPO_ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
  completed = subprocess.run([sys.executable, '-c', _PARALLEL_SCRIPT], env=env, cwd=_REPO_ROOT,
                             capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stderr[-4000:]
  return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['pmap', 'shard_map'])
def test_a_failed_factorisation_warns_under_pmap_and_shard_map(parallel_results, kind):
  assert parallel_results['num_devices'] == 8
  result = parallel_results[kind]
  assert result['all_nan']
  # every device solves the all-reduced statistic of all 200 rows, exact in float32
  # (255^2 = 65025), where lam = 1e-3 is lost: 65025 + 1e-3 rounds to 65025, and the
  # rank-1 system cannot be factored
  assert np.float32(65025.0) + np.float32(1e-3) == np.float32(65025.0)
  assert len(result['messages']) >= 1  # (one per device that reports)
  _check_failed(result['messages'], np.full((200, 48), 255.0), of=" of 'stem'")


# ----------------------------------------------------------------------------
# item 14: layers, the Flax glue's rule; missing paths print as sentences


def test_a_tuple_of_names_is_refused_as_in_the_flax_glue():
  with pytest.raises(TypeError) as from_tract:
    tract_optax.tract(0.1, layers=('backbone', 'stem'))
  with pytest.raises(TypeError) as from_glue:
    capture.normalize_layers(('backbone', 'stem'))
  assert str(from_tract.value) == str(from_glue.value) == (
      "layers=('backbone', 'stem') is ambiguous: one nested path or several paths? Pass a "
      "list: [('backbone', 'stem')] for the layer at that path, or ['backbone', 'stem'] for "
      'several top-level layers.')


@pytest.mark.parametrize('layers', [[('backbone', 'stem')], ['backbone/stem'], 'backbone/stem'])
def test_a_nested_layer_in_a_list_is_preconditioned(layers):
  rows = _rows((20, 4), 3)
  grad = _rows((4, 2), 4)
  grads = {'backbone': {'stem': {'kernel': jnp.asarray(grad)}},
           'head': {'kernel': jnp.ones((2, 2))}}
  tx = tract_optax.tract(0.1, layers=layers)
  out, _ = tx.update(grads, tx.init(grads),
                     tract_stats={('backbone', 'stem'): tract_optax.dense_stats(rows)})
  assert reference.rel_err(out['backbone']['stem']['kernel'],
                           reference.tract_solve(rows, grad, 0.1)) < 1e-5
  np.testing.assert_array_equal(out['head']['kernel'], 1.0)


def _sentence(error):
  text = str(error)
  assert not text.startswith(('"', "'")) and text.endswith('.'), text
  return text


def test_missing_paths_raise_a_key_error_that_prints_as_a_sentence():
  grads = _grads()
  stats = tract_optax.dense_stats(_rows((10, 4)))
  tx = tract_optax.tract(0.1)
  with pytest.raises(KeyError) as unknown:
    tx.update(grads, tx.init(grads), tract_stats={'stemm': stats})
  assert isinstance(unknown.value, paths_lib.ModulePathError)
  assert _sentence(unknown.value).startswith(
      "tract_stats names the module path ('stemm',) ('stemm'), but the updates have no "
      "'kernel' under it. Module paths with a kernel: ('stem',).")
  listed = tract_optax.tract(0.1, layers=['stem'])
  with pytest.raises(paths_lib.ModulePathError) as missing:
    listed.update(grads, listed.init(grads), tract_stats={'head': stats})
  assert _sentence(missing.value).startswith(
      "tract(layers=...) preconditions ['stem'], but tract_stats has no statistic for 'stem'")
  amortised = tract_optax.tract(0.1, layers=['stemm'], refresh_every=2)
  with pytest.raises(paths_lib.ModulePathError) as at_init:
    amortised.init(grads)
  assert _sentence(at_init.value).startswith(
      "tract(layers=...) names the module path ('stemm',) ('stemm'), but params have no "
      "'kernel' under it.")
