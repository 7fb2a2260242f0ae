"""The README's code runs, and its set-up commands are the ones CI uses."""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
PYTHON_BLOCKS = re.findall(r'```python\n(.*?)```', README, re.S)
BASH_BLOCKS = re.findall(r'```bash\n(.*?)```', README, re.S)


def test_readme_has_exactly_two_setup_commands():
  assert len(BASH_BLOCKS) == 2
  assert all(len(block.strip().splitlines()) == 1 for block in BASH_BLOCKS)
  main_job, tests = (block.strip() for block in BASH_BLOCKS)
  assert 'tract-optax-train' in main_job and 'pip install' in main_job
  assert 'pytest' in tests and '.[test]' in tests


def test_ci_runs_the_readme_test_command():
  script = (ROOT / '.ci' / 'run').read_text()
  extract = re.search(r"command=\$\((awk .*?README\.md)\)", script).group(1)
  command = subprocess.run(['bash', '-c', extract], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.strip()
  assert command == BASH_BLOCKS[1].strip()


@pytest.mark.parametrize('index', range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index):
  namespace = {'__name__': f'readme_block_{index}'}
  exec(compile(PYTHON_BLOCKS[index], f'README.md block {index}', 'exec'), namespace)  # pylint: disable=exec-used


def test_default_tests_need_no_torch_and_ci_runs_live_parity():
  tomllib = pytest.importorskip("tomllib")  # Python 3.11+
  extras = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project'][
      'optional-dependencies']
  assert not [r for r in extras['test'] if r.lower().startswith(('torch', 'tract_optax[parity'))]
  assert sorted(extras['parity']) == ['torch==2.13.0', 'torch_tract==1.0.0']
  assert 'equinox' in ' '.join(extras['test'])
  assert 'torch' not in BASH_BLOCKS[1]
  script = (ROOT / '.ci' / 'run').read_text()
  install = script.index('pip install -e ".[test,parity]"')
  assert install < script.index('bash -c "${command}"')
  assert 'pip install -e ".[test,parity]"' in README  # the documented second command
