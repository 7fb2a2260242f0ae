"""Executes notebooks/quickstart.ipynb end to end with nbclient."""

import pathlib

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
kernelspec = pytest.importorskip('jupyter_client.kernelspec')

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / 'notebooks' / 'quickstart.ipynb'


def _python3_kernel_available() -> bool:
  if 'python3' in kernelspec.find_kernel_specs():
    return True
  try:  # ipykernel provides a native 'python3' kernel without installing a spec
    import ipykernel  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def test_notebook_is_valid_nbformat4():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  assert notebook.nbformat == 4
  sources = [cell.source for cell in notebook.cells if cell.cell_type == 'code']
  assert 'except ImportError' in sources[0] and '%pip install' in sources[0]
  assert 'TRAIN_EXAMPLES' in sources[1]  # one cell holds every size
  assert any('optax.chain(tract_optax.tract(LAM)' in source for source in sources)


@pytest.mark.slow
def test_notebook_executes():
  if not _python3_kernel_available():
    pytest.skip('no python3 Jupyter kernel (install ipykernel)')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=240, kernel_name='python3',
                                   resources={'metadata': {'path': str(REPO_ROOT)}})
  client.execute()
  outputs = [output for cell in notebook.cells if cell.cell_type == 'code'
             for output in cell.get('outputs', [])]
  assert not [output for output in outputs if output.output_type == 'error']
  text = ''.join(output.get('text', '') for output in outputs
                 if output.output_type == 'stream')
  assert 'plain: final test accuracy' in text.replace('plain :', 'plain:').replace('  ', ' ')
  assert 'TrAct: final test accuracy' in text
  assert any('image/png' in output.get('data', {}) for output in outputs)
