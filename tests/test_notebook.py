"""Executes notebooks/quickstart.ipynb end to end with nbclient, on 8 simulated devices."""

import os
import pathlib
import re
import sys

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
kernelspec = pytest.importorskip('jupyter_client.kernelspec')

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / 'notebooks' / 'quickstart.ipynb'
DEVICES = 8  # a Colab TPU's cores, simulated on the CPU


def _python3_kernel_available() -> bool:
  if 'python3' in kernelspec.find_kernel_specs():
    return True
  try:  # ipykernel provides a native 'python3' kernel without installing a spec
    import ipykernel  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def _sources(cell_type):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  return [cell.source for cell in notebook.cells if cell.cell_type == cell_type]


def test_notebook_is_valid_nbformat4():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  assert notebook.nbformat == 4
  assert not any(cell.get('outputs') for cell in notebook.cells if cell.cell_type == 'code')


def test_notebook_installs_from_one_variable_or_its_checkout():
  code, markdown = _sources('code'), '\n'.join(_sources('markdown'))
  install = code[0]
  assert install.startswith('# Where tract_optax is installed from')
  assert "TRACT_OPTAX_SOURCE = ''" in install  # the one thing a Colab user sets
  assert 'except ImportError' in install
  assert '%pip install -q -e "{folder}[flax]" scikit-learn matplotlib' in install
  assert '%pip install -q "{source}" scikit-learn matplotlib' in install
  assert "'pyproject.toml'" in install  # the checkout it sits in, found from notebooks/ too
  text = '\n'.join(code) + markdown
  assert '<URL' not in text and 'YOUR_ORG' not in text and '[demo]' not in text
  assert 'TRACT_OPTAX_SOURCE' in markdown and 'Colab' in markdown


def test_notebook_install_cell_installs_from_the_variable(tmp_path):
  # Run the install cell's logic with IPython's %pip replaced by a recorder: a folder
  # is installed editable, anything else as a requirement, nothing set outside a
  # checkout is a clear error.
  install = _sources('code')[0]
  body = re.sub(r'^(\s*)%pip install (.*)$', r"\1_pip(f'\2')", install, flags=re.M)
  body = body.replace('import flax, matplotlib, sklearn, tract_optax', 'import _no_such_module_')
  body = body.replace('sys.path.insert(0, str(folder.resolve()))', 'pass')
  body = body.replace('  import tract_optax\n', '  pass\n').replace(
    "print('tract_optax', tract_optax.__version__)", ''
  )

  def run(source, cwd):
    calls = []
    namespace = {'_pip': calls.append}
    code = body.replace("TRACT_OPTAX_SOURCE = ''", f'TRACT_OPTAX_SOURCE = {source!r}')
    old = os.getcwd()
    os.chdir(cwd)
    try:
      exec(compile(code, 'install-cell', 'exec'), namespace)
    finally:
      os.chdir(old)
    return calls

  clone = tmp_path / 'clone'
  clone.mkdir()
  assert run(str(clone), tmp_path) == [f'-q -e "{clone}[flax]" scikit-learn matplotlib']
  assert run('tract_optax[flax]', tmp_path) == ['-q "tract_optax[flax]" scikit-learn matplotlib']
  repo = NOTEBOOK.parent.parent.resolve()
  assert run('', NOTEBOOK.parent) == [f'-q -e "{repo}[flax]" scikit-learn matplotlib']
  with pytest.raises(RuntimeError, match='set TRACT_OPTAX_SOURCE'):
    run('', tmp_path)


def test_notebook_imports_only_what_its_install_cell_installs():
  # The library with its flax extra (jax, optax, numpy, flax), scikit-learn, matplotlib and
  # the standard library; not the experiment application (a separate package).
  code = '\n'.join(_sources('code'))
  imported = {
    name.split('.')[0] for name in re.findall(r'^\s*(?:from|import) +([\w.]+)', code, re.M)
  }
  imported |= {
    name.split()[0].split('.')[0]
    for line in re.findall(r'^\s*import +([\w., ]+?)(?: +#.*)?$', code, re.M)
    for name in line.split(',')
  }
  third_party = imported - set(sys.stdlib_module_names)
  assert third_party == {'tract_optax', 'flax', 'jax', 'optax', 'numpy', 'sklearn', 'matplotlib'}


def test_notebook_shows_the_gradient_route_and_shards_the_batch():
  code = '\n'.join(_sources('code'))
  assert 'TRAIN_EXAMPLES' in _sources('code')[1]  # one cell holds every size
  assert 'apply_tract(model, variables, images, lam=LAM)' in code
  assert 'train_state.TrainState.create' in code and 'TractTrainState' not in code
  assert "Mesh(np.array(devices), ('data',))" in code and 'NamedSharding' in code
  assert '.lower(*example).compile()' in code  # compiled before anything is timed
  assert 'optax.chain(tract_optax.tract(LAM)' in '\n'.join(_sources('markdown'))


@pytest.mark.slow
def test_notebook_executes_on_eight_devices(monkeypatch):
  if not _python3_kernel_available():
    pytest.skip('no python3 Jupyter kernel (install ipykernel)')
  # The kernel inherits this environment: XLA simulates 8 CPU devices there.
  monkeypatch.setenv('XLA_FLAGS', f'--xla_force_host_platform_device_count={DEVICES}')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    notebook,
    timeout=300,
    kernel_name='python3',
    resources={'metadata': {'path': str(NOTEBOOK.parent)}},
  )
  client.execute()
  outputs = [
    output
    for cell in notebook.cells
    if cell.cell_type == 'code'
    for output in cell.get('outputs', [])
  ]
  assert not [output for output in outputs if output.output_type == 'error']
  text = ''.join(output.get('text', '') for output in outputs if output.output_type == 'stream')
  assert f'{DEVICES} device(s): cpu' in text
  difference = re.search(
    r'gradient route vs Optax route: max \|difference\| (\S+) '
    r'\(plain gradient differs by (\S+)\)',
    text,
  )
  assert float(difference.group(1)) < 1e-5 < float(difference.group(2))
  for name in ('plain', 'TrAct'):
    line = re.search(
      rf'{name} *: final test accuracy (\S+) \+- \S+ over 3 seeds; training '
      r'(\S+) s \(compiled before, in (\S+) s\)',
      text,
    )
    assert line, text
    assert 0.5 < float(line.group(1)) <= 1.0
  assert any('image/png' in output.get('data', {}) for output in outputs)
