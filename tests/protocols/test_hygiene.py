"""protocols/ is pure: explicit __all__, no cardsvc import, no network I/O modules."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import protocols

ROOT = Path(protocols.__file__).parent
MODULES = sorted(p for p in ROOT.rglob("*.py"))
FORBIDDEN_IMPORTS = {
    "cardsvc",
    "socket",
    "asyncio",
    "aiohttp",
    "asyncpg",
    "http",
    "urllib",
    "requests",
    "ssl",
}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_pure_and_has_all(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for n in names:
            assert n.split(".")[0] not in FORBIDDEN_IMPORTS, f"{path.name} imports {n}"
    rel = path.relative_to(ROOT.parent).with_suffix("")
    mod = importlib.import_module(".".join(rel.parts).removesuffix(".__init__"))
    assert isinstance(getattr(mod, "__all__", None), list), f"{path.name} lacks __all__"
    for name in mod.__all__:
        assert hasattr(mod, name), f"{path.name}: __all__ names missing {name}"


def test_error_classes() -> None:
    from protocols import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.CodecError) and issubclass(cls, ValueError)
        e = cls()
        assert isinstance(e.code, str) and e.field is None
    e2 = errors.CodecError("x_y", "msg", field="f")
    assert (e2.code, e2.field, str(e2)) == ("x_y", "f", "msg")
