"""The folders are the architecture: client and server never import each other (they
speak only through Flower messages, as across a network), and a name means one thing."""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import fedge

ROOT = Path(fedge.__file__).resolve().parents[1]
PACKAGES = ("fedge", "models", "client", "server", "simulations")


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package, other", [("client", "server"), ("server", "client")])
def test_client_and_server_never_import_each_other(package, other):
    crossing = {str(path.relative_to(ROOT)): sorted(name for name in imported(path)
                                                    if name.startswith(f"fedge.{other}"))
                for path in modules(package)}
    assert {path: names for path, names in crossing.items() if names} == {}


def test_no_two_classes_share_a_name():
    defined = defaultdict(list)
    for package in PACKAGES:
        for path in modules(package):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    defined[node.name].append(str(path.relative_to(ROOT)))
    assert len(defined) > 50  # the whole code base was read
    assert {name: paths for name, paths in defined.items() if len(paths) > 1} == {}
