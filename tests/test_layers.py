"""Imports run one way: a module imports only from its own layer or the layers below it.

Every import is read from the source (ast), function-local and TYPE_CHECKING ones included, so a lazy import
cannot hide an upward dependency. scripts/ and tests/ sit above everything and are not scanned.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ctc_drafter"

# Bottom to top; a name is a subpackage or top-level module of ctc_drafter ("" is the package's own __init__,
# the public API, which imports decoding). Modules of one layer may import each other.
LAYERS = [
    ("errors", "validate"),
    ("models", "testing"),
    ("draft",),
    ("decoding", ""),
    ("data", "evaluation", "serving", "training"),
    ("cli", "__main__", "train"),
]


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under root (a package directory)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in the file; `from pkg import sub` counts as pkg.sub."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in modules else base))
    return found


def layer_of(dotted: str, root: str) -> int:
    """The layer of a module of package `root` (by its subpackage or top-level module name)."""
    parts = dotted.split(".")
    key = parts[1] if len(parts) > 1 else ""
    for i, names in enumerate(LAYERS):
        if key in names:
            return i
    raise AssertionError(f"{dotted}: {key!r} is in no layer of test_layers.LAYERS; add it where it belongs")


def upward_imports(root: Path) -> list[str]:
    modules = module_names(root)
    bad = []
    for name, path in modules.items():
        for line, target in imported_modules(name, path, modules):
            if target.split(".")[0] != root.name:
                continue
            if layer_of(target, root.name) > layer_of(name, root.name):
                bad.append(f"{path.relative_to(root.parent)}:{line}: {name} imports {target}, a higher layer")
    return bad


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports(PACKAGE) == []


def test_every_module_has_a_layer():
    for name in module_names(PACKAGE):
        layer_of(name, PACKAGE.name)


def test_the_scan_sees_function_local_and_relative_imports(tmp_path, monkeypatch):
    """The check itself can fail: a lazy relative import from models up to decoding is reported."""
    pkg = tmp_path / "ctc_drafter"
    for sub in ("models", "decoding"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "decoding" / "loop.py").write_text("from ..models import base\n")
    (pkg / "models" / "base.py").write_text("def f():\n    from ..decoding.loop import g\n    return g\n")
    (pkg / "models" / "other.py").write_text("import ctc_drafter.decoding\n")
    assert upward_imports(pkg) == [
        "ctc_drafter/models/base.py:2: ctc_drafter.models.base imports ctc_drafter.decoding.loop, a higher layer",
        "ctc_drafter/models/other.py:1: ctc_drafter.models.other imports ctc_drafter.decoding, a higher layer",
    ]
