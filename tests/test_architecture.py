"""Which way imports go (docs/architecture.md): core/ stands alone, the app never imports training
code, and training uses the store, the model registry and the chat format but never the UI or server."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "app", "rlhf", "bench")
ALLOWED = {  # package -> the project modules it may import, beside its own
    "core": set(),
    "app": {"core"},
    "rlhf": {"core", "app.store", "app.versions", "app.failpoints", "app.config", "app.embedded", "app.loop_view"},
    # bench: also the serving engine, measured alone (bench_serving.py), never the server or UI
    "bench": {"core", "app.store", "app.versions", "app.config", "app.embedded", "app.engine", "rlhf"},
}


def project_imports(path: Path) -> set[str]:
    """Every project module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def allowed(package: str, module: str) -> bool:
    return module.split(".")[0] == package or any(module == a or module.startswith(a + ".")
                                                 for a in ALLOWED[package])


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_one_way(package):
    wrong = {f"{path.relative_to(ROOT)} imports {module}"
             for path in sorted((ROOT / package).glob("*.py")) for module in project_imports(path)
             if not allowed(package, module)}
    assert not wrong, sorted(wrong)


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from app.ui import build_demo\n    import rlhf.ppo\n")
    assert project_imports(source) == {"app.ui", "rlhf.ppo"}
    assert not allowed("rlhf", "app.ui") and not allowed("app", "rlhf.ppo") and allowed("rlhf", "core.stats")
