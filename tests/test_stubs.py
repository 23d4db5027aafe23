"""The type stubs name exactly what the native module exports, and `__all__` is true."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import lugh
import lugh._lugh as native

STUB = Path(lugh.__file__).parent / "_lugh.pyi"


def stub_names() -> dict:
    """{top-level name: set of public member names (None for functions and values)}."""
    tree = ast.parse(STUB.read_text())
    names: dict = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
            names[node.name] = members
        elif isinstance(node, ast.FunctionDef):
            names[node.name] = None
    return names


def test_stub_matches_the_native_module():
    stubbed = stub_names()
    exported = {
        name
        for name, value in vars(native).items()
        if not name.startswith("_") and (inspect.isclass(value) or callable(value))
    }
    assert exported == set(stubbed), (
        f"only in module: {exported - set(stubbed)}, only in stub: {set(stubbed) - exported}"
    )
    for name, members in stubbed.items():
        if members is None:
            continue
        cls = getattr(native, name)
        inherited = {m for base in cls.__mro__[1:] for m in vars(base)}
        actual = {m for m in vars(cls) if not m.startswith("_") and m not in inherited}
        assert actual == members, (
            f"{name}: only in module {actual - members}, only in stub {members - actual}"
        )


def test_all_is_importable():
    for name in lugh.__all__:
        assert hasattr(lugh, name), name
