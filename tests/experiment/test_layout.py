"""The library and the experiment application are two rooms: imports go one way, no circle."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / 'tract_optax'


def _imports(path: pathlib.Path):
  """Every ``tract_optax...`` module a file imports (absolute names)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return {name for name in names if name.split('.')[0] == 'tract_optax'}


def test_library_never_imports_the_application():
  library = [path for path in PACKAGE.glob('*.py') if path.name != 'train.py']
  assert {path.stem for path in library} >= {'__init__', 'stats', 'transform', 'linen'}
  for path in library:
    wrong = {name for name in _imports(path)
             if name.startswith(('tract_optax.experiment', 'tract_optax.train'))}
    assert not wrong, f'{path.name} imports {wrong}'


def test_entry_point_only_forwards_to_the_cli():
  assert _imports(PACKAGE / 'train.py') == {'tract_optax.experiment.cli',
                                            'tract_optax.experiment.cli.main'}


def test_application_modules_import_no_circle():
  modules = {path.stem: path for path in (PACKAGE / 'experiment').glob('*.py')
             if path.stem != '__init__'}
  assert set(modules) == {'cli', 'comparison', 'config', 'data', 'models', 'report',
                          'speedup', 'training'}
  graph = {}
  for name, path in modules.items():
    graph[name] = {other for other in modules
                   if any(i == f'tract_optax.experiment.{other}' or
                          i.startswith(f'tract_optax.experiment.{other}.')
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
