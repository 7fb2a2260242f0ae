"""The wheel holds the library and nothing else; the core needs no Flax.

The wheel is built from a copy of the checkout (without caches and build folders, so a stale
``build/`` cannot leak into it) and read as a zip file. The import checks run in fresh
interpreters, so nothing this test process imported can hide an import.
"""

import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEFT_BEHIND = (
  '.git',
  '.venv',
  'build',
  'dist',
  'runs',
  'site',
  '.gpu_data',
  '*.egg-info',
  '__pycache__',
  '.mypy_cache',
  '.ruff_cache',
  '.pytest_cache',
)

# The message tract_optax.linen / tract_optax.nnx give without Flax (exact text).
NO_FLAX_MESSAGE = (
  '{module} needs Flax, which is not installed. Install the extra: pip install '
  '"tract_optax[flax]" (the core, tract_optax.tract / tract_kernel / dense_stats / '
  'conv_stats, works without it).'
)

# Run first in a fresh interpreter: Flax cannot be found, as if it were not installed.
# importlib.util.find_spec('flax') returns None and `import flax` raises
# ModuleNotFoundError, because the standard path finder is replaced by one that skips it.
BLOCK_FLAX = textwrap.dedent("""
  import importlib.machinery, sys

  class _PathFinderWithoutFlax(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
      if fullname == 'flax' or fullname.startswith('flax.'):
        return None
      return super().find_spec(fullname, path, target)

  sys.meta_path = [_PathFinderWithoutFlax if finder is importlib.machinery.PathFinder
                   else finder for finder in sys.meta_path]
""")

# Uses the core (both routes, in one compiled function), then prints every loaded module of
# Flax and of the experiment application.
USE_THE_CORE = textwrap.dedent("""
  import sys
  import jax, jax.numpy as jnp, optax
  import tract_optax

  @jax.jit
  def step(kernel, x):
    stats = tract_optax.conv_stats(x, (3, 3))
    params = {'stem': {'kernel': kernel}}
    tx = optax.chain(tract_optax.tract(0.1), optax.sgd(0.1))
    updates, _ = tx.update(params, tx.init(params), params, tract_stats={('stem',): stats})
    grad = jax.grad(lambda k: tract_optax.tract_kernel(k, stats).sum())(kernel)
    return updates['stem']['kernel'], grad

  step(jnp.ones((3, 3, 1, 4)), jnp.ones((2, 6, 6, 1)))
  print('loaded:', sorted(name for name in sys.modules
                          if name.split('.')[0] in ('flax', 'tract_experiment')))
""")


def _python(code: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
  )


def _build_wheel(destination: pathlib.Path) -> pathlib.Path:
  source = destination / 'source'
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LEFT_BEHIND))
  command = [
    sys.executable,
    '-m',
    'pip',
    'wheel',
    '--no-deps',
    '-q',
    '-w',
    str(destination / 'wheel'),
    str(source),
  ]
  try:  # the build backend installed here is enough: no network needed
    import setuptools  # pylint: disable=import-outside-toplevel

    if int(setuptools.__version__.split('.')[0]) >= 77:  # pyproject's build requirement
      command.insert(4, '--no-build-isolation')
  except ImportError:
    pass
  result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr
  (wheel,) = (destination / 'wheel').glob('tract_optax-*.whl')
  return wheel


@pytest.mark.slow  # builds a wheel (about 5-10 s)
def test_wheel_holds_the_library_typed_and_licensed_and_nothing_else(tmp_path):
  wheel = _build_wheel(tmp_path)
  from tract_optax import __version__  # pylint: disable=import-outside-toplevel

  assert wheel.name == f'tract_optax-{__version__}-py3-none-any.whl'
  dist_info = f'tract_optax-{__version__}.dist-info'
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    license_text = archive.read(f'{dist_info}/licenses/LICENSE')
    metadata = archive.read(f'{dist_info}/METADATA').decode()
  library = {
    path.relative_to(ROOT).as_posix()
    for path in (ROOT / 'tract_optax').rglob('*')
    if path.is_file() and '__pycache__' not in path.parts
  }
  assert 'tract_optax/py.typed' in library and 'tract_optax/_src/transform.py' in library
  packaged = {name for name in names if not name.startswith(f'{dist_info}/')}
  assert packaged == library  # the library, all of it, and nothing else
  assert license_text == (ROOT / 'LICENSE').read_bytes()
  assert not [name for name in names if 'experiment' in name or name.startswith('tests/')]
  assert f'{dist_info}/entry_points.txt' not in names  # no console script: that is the app's
  assert 'License-Expression: Apache-2.0' in metadata
  assert 'Requires-Python: >=3.11' in metadata
  requirements = re.findall(r'^Requires-Dist: (.*)$', metadata, re.M)
  assert [r for r in requirements if r.startswith('flax')] == ['flax>=0.11.2; extra == "flax"']
  haiku = [r for r in requirements if r.startswith('dm-haiku')]
  assert haiku == ['dm-haiku>=0.0.17; extra == "haiku"']
  core = sorted(r.split('>')[0] for r in requirements if 'extra ==' not in r)
  assert core == ['jax', 'jaxlib', 'numpy', 'optax']


def test_import_tract_optax_loads_no_flax():
  result = _python(USE_THE_CORE)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1] == 'loaded: []'


def test_core_works_and_flax_glue_names_the_extra_without_flax():
  check_glue = textwrap.dedent("""
    for module in ('linen', 'nnx'):
      try:
        if module == 'linen':
          import tract_optax.linen  # the import statement
        else:
          getattr(tract_optax, module)  # the attribute: tract_optax.nnx
      except ImportError as error:
        print(f'{module}: {type(error).__name__}: {error}')
  """)
  result = _python(BLOCK_FLAX + USE_THE_CORE + check_glue)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines == [
    'loaded: []',
    'linen: ImportError: ' + NO_FLAX_MESSAGE.format(module='tract_optax.linen'),
    'nnx: ImportError: ' + NO_FLAX_MESSAGE.format(module='tract_optax.nnx'),
  ]


def test_flax_blocker_works():
  # The simulation itself: without it Flax imports here, with it Flax cannot be found.
  probe = 'import importlib.util; print(importlib.util.find_spec("flax") is None)\n'
  assert _python(probe).stdout.strip() == 'False'
  assert _python(BLOCK_FLAX + probe).stdout.strip() == 'True'
  result = _python(BLOCK_FLAX + 'import flax')
  assert "ModuleNotFoundError: No module named 'flax'" in result.stderr


def test_equinox_glue_needs_no_flax():
  code = BLOCK_FLAX + textwrap.dedent("""
    import sys
    import tract_optax.equinox
    print(sorted(name for name in sys.modules if name.split('.')[0] == 'flax'))
  """)
  result = _python(code)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == '[]'


def test_declared_lower_bounds_are_the_releases_ci_tests():
  # .ci/run installs .ci/lower-bounds.txt and runs the fast tier there: each `>=` bound in
  # pyproject.toml (core, flax and haiku extras, equinox in the test extra) must be one of
  # those pins.
  pins = dict(
    line.split('==')
    for line in (ROOT / '.ci' / 'lower-bounds.txt').read_text().splitlines()
    if line and not line.startswith('#')
  )
  pyproject = (ROOT / 'pyproject.toml').read_text()
  bounds = dict(
    re.findall(r'"(jax|jaxlib|optax|numpy|flax|equinox|dm-haiku)>=([\w.]+)"', pyproject)
  )
  assert bounds == pins
