"""The layering rules of STYLE.md: consensus/ is a pure spec that reaches nowhere outward,
and storage/ builds on consensus/ alone among the project's packages."""

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = {"consensus", "storage", "mining", "node", "p2p"}

CONSENSUS_STDLIB = {
    "__future__", "bisect", "collections", "collections.abc", "dataclasses", "enum",
    "functools", "hashlib", "itertools", "math", "operator", "struct", "types", "typing",
}
CONSENSUS_THIRD_PARTY = {"msgpack", "cryptography"}


def imported_modules(source: str, package: str) -> list[str]:
    """Every module `source` (a file of `package`) imports, relative imports resolved.

    `__import__("x")` with a literal name counts as importing x; with a computed name it
    yields "<dynamic>", which no rule allows.
    """
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append(node.module or "")
            else:
                # `from . import x` in package p is p.x; one level more leaves the package.
                base = package.split(".")
                if node.level > len(base):
                    found.append("<outside>")
                    continue
                parent = ".".join(base[: len(base) - node.level + 1])
                found.append(f"{parent}.{node.module}" if node.module else parent)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("__import__", "import_module")):
            arg = node.args[0] if node.args else None
            is_literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            found.append(arg.value if is_literal else "<dynamic>")
    return found


def consensus_allows(module: str) -> bool:
    top = module.split(".")[0]
    return (module in CONSENSUS_STDLIB or top in CONSENSUS_THIRD_PARTY or top == "consensus")


def storage_allows(module: str) -> bool:
    top = module.split(".")[0]
    return top in {"consensus", "storage"} or top not in PROJECT_PACKAGES | {"<outside>"}


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def violations(package: str, allows: Callable[[str], bool]) -> list[str]:
    bad = []
    for path in python_files(package):
        pkg = ".".join(path.relative_to(ROOT).parent.parts)
        for module in imported_modules(path.read_text(), pkg):
            if not allows(module):
                bad.append(f"{path.relative_to(ROOT)}: {module}")
    return bad


def test_consensus_imports_only_the_allowlist() -> None:
    files = python_files("consensus")
    assert len(files) >= 15  # the walk really found the package
    assert violations("consensus", consensus_allows) == []


def test_storage_imports_no_higher_layer() -> None:
    # storage/ may be empty or partly written; whatever exists must obey the rule.
    assert violations("storage", storage_allows) == []


# The checker itself: what it must refuse and what it must let through.
@pytest.mark.parametrize("source", [
    "import asyncio", "import socket", "import plyvel", "import logging", "import torch",
    "import os", "import os.path", "from os import path", "import threading",
    "import numpy", "import random", "import time", "import importlib",
    "from concurrent.futures import ThreadPoolExecutor", "import collections.abc as c, os",
    "import storage", "from storage.db import Database", "from node import cli",
    "import p2p.peer", "from mining import trainer", "from .. import storage",
    "from ... import x", "__import__('os')", "__import__(name)",
    "def f():\n    import asyncio\n", "if True:\n    from logging import getLogger\n",
])
def test_consensus_rule_refuses(source: str) -> None:
    modules = imported_modules(source, "consensus")
    assert not all(consensus_allows(m) for m in modules)


@pytest.mark.parametrize("source", [
    "import hashlib", "from typing import Annotated", "from collections.abc import Callable",
    "import msgpack", "from cryptography.hazmat.primitives import serialization",
    "from consensus.encoding import encode", "from . import encoding", "from .merkle import x",
    "from __future__ import annotations", "import struct, math, bisect",
])
def test_consensus_rule_allows(source: str) -> None:
    modules = imported_modules(source, "consensus")
    assert modules and all(consensus_allows(m) for m in modules)


@pytest.mark.parametrize(("source", "allowed"), [
    ("from consensus.blocks import Block", True),
    ("import plyvel", True),
    ("import os, threading", True),
    ("from storage import schema", True),
    ("from . import schema", True),
    ("from node.config import NodeConfig", False),
    ("import p2p", False),
    ("from mining.trainer import train", False),
    ("from .. import node", False),
])
def test_storage_rule(source: str, allowed: bool) -> None:
    modules = imported_modules(source, "storage")
    assert all(storage_allows(m) for m in modules) is allowed


def test_relative_imports_resolve() -> None:
    assert imported_modules("from . import a", "consensus") == ["consensus"]
    assert imported_modules("from .b import c", "consensus") == ["consensus.b"]
    assert imported_modules("from .. import x", "consensus") == ["<outside>"]
    assert imported_modules("from .. import x", "consensus.sub") == ["consensus"]
