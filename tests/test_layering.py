"""Dependencies point one way: the core (``onp`` outside its command-line modules) never imports
``agents``, ``baselines`` or ``envs``; the command-line layer sits on top of all four."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the command-line layer: ``python -m onp.<name>`` and the modules only they use
CLI_MODULES = {"train", "baseline", "evaluate", "compare", "backdoor", "defend", "cli_common", "__main__"}
UPPER = {"agents", "baselines", "envs"}


def _imported_packages(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def test_core_never_imports_agents_baselines_or_envs():
    core = [p for p in (ROOT / "onp").rglob("*.py") if not (p.parent == ROOT / "onp" and p.stem in CLI_MODULES)]
    assert len(core) > 20
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {pkg}"
        for p in core
        for line, pkg in _imported_packages(ast.parse(p.read_text()))
        if pkg in UPPER
    ]
    assert not bad, "the core imports an upper layer:\n" + "\n".join(bad)


def _onp_modules(tree: ast.AST):
    for node in ast.walk(tree):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "onp" and len(parts) > 1:
                yield node.lineno, parts[1]


def test_lower_packages_do_not_import_the_cli_layer():
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports onp.{mod}"
        for pkg in sorted(UPPER)
        for p in (ROOT / pkg).rglob("*.py")
        for line, mod in _onp_modules(ast.parse(p.read_text()))
        if mod in CLI_MODULES
    ]
    assert not bad, "a lower package imports an onp command-line module:\n" + "\n".join(bad)
