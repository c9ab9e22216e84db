"Layers point down: every module imports only modules of earlier notebooks, at its top, and imports on its own in a fresh interpreter."
import ast, json, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).parents[1]

def notebook_order() -> dict:
    "module name -> position of its notebook in reading order (from the notebooks' `#| default_exp`)."
    order = {}
    for i, nb in enumerate(sorted((ROOT / 'nbs').glob('[0-9]*.ipynb'))):
        for cell in json.loads(nb.read_text())['cells']:
            src = ''.join(cell['source'])
            if src.startswith('#| default_exp'): order[src.split()[-1]] = i
    return order

ORDER = notebook_order()

def package_imports(path:Path) -> list[tuple[str, bool]]:
    "(module of mulan_nb imported, whether at the top level) for every import in the file."
    tree, found = ast.parse(path.read_text()), []
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or '' if node.level == 0 else 'mulan_nb' + ('.' + node.module if node.module else '')
            names = [f'{module}.{a.name}' for a in node.names] if module == 'mulan_nb' else [module]
        elif isinstance(node, ast.Import): names = [a.name for a in node.names]
        else: continue
        found += [(n.split('.')[1] if n.count('.') else '', id(node) in top) for n in names if n.startswith('mulan_nb')]
    return found

def test_every_exported_module_has_a_notebook():
    modules = {p.stem for p in (ROOT / 'mulan_nb').glob('*.py')} - {'__init__', '_modidx'}
    assert modules == set(ORDER), modules ^ set(ORDER)

@pytest.mark.parametrize('module', sorted(ORDER))
def test_imports_point_to_earlier_notebooks_only_and_sit_at_the_top(module):
    for imported, at_top in package_imports(ROOT / 'mulan_nb' / f'{module}.py'):
        assert at_top, f"{module} imports mulan_nb.{imported} inside a function"
        assert ORDER[imported] < ORDER[module], f"{module} (notebook {ORDER[module]}) imports {imported} (notebook {ORDER[imported]})"

def test_the_checker_sees_a_late_import(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text("from .cli import train_main\ndef f():\n    from mulan_nb import training\n")
    assert package_imports(bad) == [('cli', True), ('training', False)]

@pytest.mark.parametrize('module', sorted(ORDER))
def test_each_module_imports_alone_in_a_fresh_interpreter(module):
    subprocess.run([sys.executable, '-c', f'import mulan_nb.{module}'], check=True, cwd=ROOT)
