"""Issue 15: the layout holds as the tree grows -- checked on the source, in milliseconds.

core/ never prints, exits or imports click or rich (CONVENTIONS §1); every
ZeroMQ socket comes from core/sockets.py (``new_socket``, or a daemon's
``socket`` on it: point 1); nothing forks a process that may run threads
(point 11: commands through subprocess, data planes as fresh interpreters).
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = sorted((ROOT / "core").rglob("*.py"))
CLI = sorted((ROOT / "cli").rglob("*.py"))


def _name(node: ast.expr) -> str:
    """A called expression as dotted text: ``zmq.Context.instance().socket``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return f"{_name(node.func)}()"
    return "?"


@functools.cache
def _parsed(path: Path) -> tuple[list[tuple[str, int]], set[str]]:
    """``(dotted name, line)`` of each call in *path*, leaving out a module's
    ``if __name__ == "__main__":`` block (an entry point, not the library),
    and the top-level names it imports."""
    tree = ast.parse(_text(path), str(path))
    skipped: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.dump(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    calls, imports = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and id(node) not in skipped:
            calls.append((_name(node.func), node.lineno))
        elif isinstance(node, ast.Import):
            imports |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imports.add(node.module.split(".")[0])
    return calls, imports


@functools.cache
def _text(path: Path) -> str:
    return path.read_text()


def _calls(path: Path, *needles: str) -> list[tuple[str, int]]:
    """The calls in *path* (parsed only when its text holds one of *needles*)."""
    return _parsed(path)[0] if any(n in _text(path) for n in needles) else []


def _imports(path: Path, *needles: str) -> set[str]:
    return _parsed(path)[1] if any(n in _text(path) for n in needles) else set()


def test_core_never_prints_exits_or_imports_click_or_rich() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line} {name}()"
        for path in CORE
        for name, line in _calls(path, "print", "exit(", "quit(")
        if name in {"print", "sys.exit", "exit", "quit", "os._exit"}
    ]
    bad += [f"{p.relative_to(ROOT)} imports {m}" for p in CORE
            for m in _imports(p, "click", "rich") & {"click", "rich"}]  # fmt: skip
    assert bad == []


def test_every_zeromq_socket_comes_from_core_sockets() -> None:
    """A context's ``socket()`` is called in core/sockets.py only (a daemon's own
    ``socket()`` goes through ``new_socket``, so the policies reach it)."""
    context_socket = re.compile(
        r"(?:^|\.)(?:ctx|zctx|_zctx|context|Context\.instance\(\)|Context\(\))\.socket$"
    )
    bad = [
        f"{path.relative_to(ROOT)}:{line} {name}()"
        for path in [*CORE, *CLI]
        if path != ROOT / "core" / "sockets.py"
        for name, line in _calls(path, ".socket(", "zmq.Socket(")
        if context_socket.search(name) or name in {"zmq.Socket", "zmq.Context().socket"}
    ]
    assert bad == []


def test_nothing_forks() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line} {name}()"
        for path in [*CORE, *CLI]
        for name, line in _calls(path, "fork")
        if name in {"os.fork", "os.forkpty", "pty.fork"}
    ]
    bad += [f"{p.relative_to(ROOT)} imports multiprocessing" for p in [*CORE, *CLI]
            if "multiprocessing" in _imports(p, "multiprocessing")]  # fmt: skip
    assert bad == []
