"""The README's and the docs' code runs, and the README's set-up commands are the ones CI uses.

Every ```python block of README.md and docs/*.md is executed. Blocks that cannot run in a test
are fenced ```py instead and listed in NOT_RUN below, so skipping one is a deliberate choice:
today the multi-host sketch of docs/parallel.md (it needs several JAX processes; the real
multi-host check is tests/test_multihost.py) and the checkpoint recipe of docs/limits.md (it
needs a checkpoint on disk; tests/test_guards.py runs it with Orbax).
"""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
DOC_PAGES = sorted((ROOT / 'docs').glob('*.md'))
BASH_BLOCKS = re.findall(r'```bash\n(.*?)```', README, re.S)
FULL_INSTALL = (
  'python3 -m venv .venv && .venv/bin/python -m pip install -q -e ".[test,parity,dev]" '
  '-e ./experiment'
)

# ```py blocks, not run (see the module docstring): {page: number of such blocks}.
NOT_RUN = {'docs/parallel.md': 1, 'docs/limits.md': 1}


def _blocks(fence: str) -> list[tuple[str, int, str]]:
  """(page, index, code) of every block fenced ```<fence> in the README and the docs."""
  found = []
  for path in [ROOT / 'README.md', *DOC_PAGES]:
    page = path.relative_to(ROOT).as_posix()
    blocks = re.findall(rf'^```{fence}\n(.*?)^```', path.read_text(), re.S | re.M)
    found.extend((page, index, code) for index, code in enumerate(blocks))
  return found


PYTHON_BLOCKS = _blocks('python')


def test_readme_has_exactly_two_one_line_setup_commands():
  assert len(BASH_BLOCKS) == 2
  assert all(len(block.strip().splitlines()) == 1 for block in BASH_BLOCKS)
  main_job, tests = (block.strip() for block in BASH_BLOCKS)
  # Each works by itself on a fresh machine with only python3: it makes (or reuses) a venv
  # and runs what it installed there, never a bare `python`/`pip` or a global script.
  for command in (main_job, tests):
    assert 'python3 -m venv .venv && .venv/bin/python -m pip install' in command
    assert not re.search(r'(^|[;&(] *)(python|pip|pytest|tract-optax-train) ', command)
  assert '-e ".[flax]" -e ./experiment' in main_job
  assert main_job.endswith('.venv/bin/tract-optax-train --out runs/default --overwrite')
  assert '-e ".[test]" -e ./experiment' in tests
  assert tests.endswith('.venv/bin/python -m pytest -q -n 2 --dist loadscope')
  assert README.index('<!-- test-command -->') < README.index(BASH_BLOCKS[1])


def test_ci_runs_the_readme_test_command():
  script = (ROOT / '.ci' / 'run').read_text()
  extract = re.search(r'command=\$\((awk .*?README\.md)\)', script).group(1)
  command = subprocess.run(
    ['bash', '-c', extract], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.strip()
  assert command == BASH_BLOCKS[1].strip()


def test_default_tests_need_no_torch_and_ci_runs_live_parity():
  import tomllib  # pylint: disable=import-outside-toplevel

  extras = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['optional-dependencies']
  assert not [r for r in extras['test'] if r.lower().startswith(('torch', 'tract_optax[parity'))]
  assert sorted(extras['parity']) == ['torch==2.13.0', 'torch_tract==1.0.0']
  assert 'equinox' in ' '.join(extras['test'])
  assert 'torch' not in BASH_BLOCKS[1] and 'parity' not in BASH_BLOCKS[1]
  script = (ROOT / '.ci' / 'run').read_text()
  # CI installs the parity and dev extras into the same venv before the README's command.
  assert f"full_install='{FULL_INSTALL}'" in script
  assert script.index('bash -c "${full_install}"') < script.index('bash -c "${command}"')
  assert 'mkdocs build --strict' in script


def test_readme_speaks_to_users():
  for machine_specific in (
    r'\b2-core',
    r'\bthis cpu\b',
    r'\blent\b',
    r'\bsessions?\b',
    r'\bthis machine\b',
  ):
    assert not re.search(machine_specific, README, re.I), machine_specific
  assert 80 <= len(README.splitlines()) <= 200
  assert 'pip install "tract_optax[flax]"' in README  # the extra the Flax glue names


def test_readme_links_to_existing_docs_pages():
  links = re.findall(r'\]\((docs/[^)#]+)\)', README)
  assert 'docs/index.md' in links and 'docs/api.md' in links
  for link in links:
    assert (ROOT / link).is_file(), link


def test_docs_site_lists_every_page_and_public_module():
  config = (ROOT / 'mkdocs.yml').read_text()
  assert re.search(r'^strict: true$', config, re.M)
  assert 'docstring_style: google' in config
  for page in DOC_PAGES:
    assert f': {page.name}\n' in config, f'{page.name} is not in the nav of mkdocs.yml'
  # Every public module (tract_optax and its non-underscore submodules) is in the API page.
  api = (ROOT / 'docs' / 'api.md').read_text()
  public = ['tract_optax'] + [
    f'tract_optax.{path.stem}'
    for path in sorted((ROOT / 'tract_optax').glob('*.py'))
    if not path.stem.startswith('_')
  ]
  assert 'tract_optax.linen' in public and 'tract_optax.nnx' in public
  for module in public:
    assert re.search(rf'^::: {re.escape(module)}$', api, re.M), module


def test_skipped_blocks_are_the_listed_ones():
  counts: dict[str, int] = {}
  for page, _, _ in _blocks('py'):
    counts[page] = counts.get(page, 0) + 1
  assert counts == NOT_RUN
  assert len(PYTHON_BLOCKS) >= 15  # README 2, docs 13 when written


@pytest.mark.slow  # most blocks compile a Flax model: several seconds each
@pytest.mark.parametrize(
  'page,index,code', PYTHON_BLOCKS, ids=[f'{page}#{index}' for page, index, _ in PYTHON_BLOCKS]
)
def test_python_block_runs(page, index, code):
  namespace = {'__name__': f'doc_block_{index}'}
  exec(compile(code, f'{page} block {index}', 'exec'), namespace)  # pylint: disable=exec-used


# The docs theme shows about 88 characters of a code line before a scrollbar clips it.
CODE_WIDTH = 88


def test_python_blocks_fit_the_page_without_a_scrollbar():
  wide = [
    (page, index, line)
    for page, index, code in PYTHON_BLOCKS + _blocks('py')
    for line in code.splitlines()
    if len(line) > CODE_WIDTH
  ]
  assert not wide, wide
