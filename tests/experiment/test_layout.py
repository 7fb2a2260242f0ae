"""The library and the experiment application are two rooms: imports go one way, no circle."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / 'tract_optax'
APPLICATION = ROOT / 'experiment' / 'tract_experiment'


def _imports(path: pathlib.Path):
  """Every ``tract_optax...`` / ``tract_experiment...`` module a file imports."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return {name for name in names
          if name.split('.')[0] in ('tract_optax', 'tract_experiment')}


def test_library_never_imports_the_application():
  library = sorted(PACKAGE.rglob('*.py'))
  assert {path.stem for path in library} >= {'__init__', 'stats', 'transform', 'linen'}
  for path in library:
    wrong = {name for name in _imports(path) if name.startswith('tract_experiment')}
    assert not wrong, f'{path.name} imports {wrong}'


def test_application_is_not_in_the_library_package():
  assert not (PACKAGE / 'experiment').exists() and not (PACKAGE / 'train.py').exists()
  assert (APPLICATION / '__main__.py').exists()


def test_application_modules_import_no_circle():
  modules = {path.stem: path for path in APPLICATION.glob('*.py')
             if path.stem not in ('__init__', '__main__')}
  assert set(modules) == {'cli', 'comparison', 'config', 'data', 'models', 'report',
                          'speedup', 'timing', 'training'}
  graph = {}
  for name, path in modules.items():
    graph[name] = {other for other in modules
                   if any(i == f'tract_experiment.{other}' or
                          i.startswith(f'tract_experiment.{other}.')
                          for i in _imports(path))} - {name}
  done, active = set(), []

  def visit(name):
    assert name not in active, f'import circle: {" -> ".join(active + [name])}'
    if name in done:
      return
    active.append(name)
    for other in graph[name]:
      visit(other)
    active.pop()
    done.add(name)

  for name in graph:
    visit(name)
  assert graph['config'] == set() and graph['speedup'] == set()
