"""The shape of the house, kept by its imports: no import circle anywhere in `alip/`, and `alip/data` in
three parts that depend one way only.

    alip.data.format   the record format (RecordIO, record schema and meta JSON, positions, image rules)
    alip.data.ingest   the shard writer behind tools/data2rec.py (may use the format)
    alip.data.loaders  the readers the trainer uses (may use the format, never the writer)

The graph is read from the source (`ast`), not by importing: imports inside functions and under
`if TYPE_CHECKING:` count too, since each is a dependency someone reading the code has to follow.
`from alip import X` for a name of the lazy public API (`alip._API`) is an import of the module
that defines X.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import alip

PACKAGE = Path(alip.__file__).parent


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, lazy_api: dict[str, str] | None = None) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, for every .py file under `root` (a package folder)."""
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    top = root.name
    lazy = lazy_api or {}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from .x import y, from .. import z
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    name = f"{source}.{alias.name}"
                    if name in files:  # from pkg import submodule
                        targets.add(name)
                    elif source == top and alias.name in lazy:  # from alip import create_model
                        targets.add(lazy[alias.name])
                    else:
                        targets.add(source)
        graph[mod] = {t for t in targets if t in files and t != mod and (t == top or t.startswith(top + "."))}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None. Depth-first search, three colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module `start` imports, directly or not, with one chain of imports that leads there."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in sorted(graph[node]):
            if nxt not in chains:
                chains[nxt] = chains[node] + [nxt]
                todo.append(nxt)
    del chains[start]
    return chains


def in_part(module: str, part: str) -> bool:
    return module == part or module.startswith(part + ".")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE, alip._API)


def test_no_import_circle(graph):
    assert find_cycle(graph) is None, "import circle: " + " -> ".join(find_cycle(graph) or [])


# (part, parts it must never reach, directly or through any other module)
RULES = [
    ("alip.data.format", ("alip.data.ingest", "alip.data.loaders")),
    ("alip.data.loaders", ("alip.data.ingest",)),
    ("alip.columns", ("alip.data", "alip.score", "alip.caption")),
]


@pytest.mark.parametrize(("part", "forbidden"), RULES, ids=[r[0] for r in RULES])
def test_the_parts_depend_one_way(graph, part, forbidden):
    members = [m for m in graph if in_part(m, part)]
    assert members, f"no module in {part}"
    broken = [
        " -> ".join(chain)
        for m in members
        for target, chain in reachable(graph, m).items()
        if any(in_part(target, f) for f in forbidden)
    ]
    assert not broken, f"{part} must not import {forbidden}:\n" + "\n".join(broken[:10])


def test_the_data_package_is_its_three_parts(graph):
    """Every module of alip/data lives in one of the three parts; nothing is left loose beside them."""
    loose = [m for m in graph if in_part(m, "alip.data") and m.count(".") == 2 and m.split(".")[2] not in
             ("format", "ingest", "loaders")]  # fmt: skip
    assert not loose, loose


LIGHT = [*(PACKAGE / "data" / "format").glob("*.py"), PACKAGE / "data/loaders/config.py", PACKAGE / "config.py"]


@pytest.mark.parametrize("path", LIGHT, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_format_and_the_settings_need_neither_torch_nor_dali(path):
    """Reading a shard's records (inspect_rec, the filter, alip score's texts) needs no torch or DALI, nor
    does reading a run config (alip.config builds on the loaders' settings)."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        heavy = [n for n in names if n.split(".")[0] in ("torch", "torchvision", "nvidia", "open_clip")]
        assert not heavy, f"{path.name} imports {heavy}"


def test_what_one_module_needs_from_another_is_public():
    """No module of alip/ imports another's underscore name: a name used across modules is part of its
    module's interface, and says so."""
    private = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("alip")):
                private += [f"{path.relative_to(PACKAGE.parent)}: {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]  # fmt: skip
    assert not private, private


# ---- the checker itself can fail: a package written here with a circle, a forbidden import, a lazy name


def write_package(root: Path, modules: dict[str, str]) -> Path:
    for name, source in modules.items():
        path = root.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root / next(iter(modules)).split(".")[0]


def test_the_checker_sees_circles_inside_functions_and_relative_imports(tmp_path):
    pkg = write_package(
        tmp_path,
        {
            "pkg.__init__": "",
            "pkg.a": "from pkg import b\n",
            "pkg.b": "def f():\n    from .c import g\n",  # inside a function, relative
            "pkg.c": "import pkg.a\n",
            "pkg.d": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import x\n",
        },
    )
    g = import_graph(pkg)
    assert g["pkg.b"] == {"pkg.c"} and g["pkg.d"] == {"pkg.a"}
    cycle = find_cycle(g)
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.b", "pkg.c"} and cycle[0] == cycle[-1]
    g["pkg.c"] = set()
    assert find_cycle(g) is None


def test_the_checker_follows_lazy_names_and_chains(tmp_path):
    pkg = write_package(
        tmp_path,
        {
            "pkg.__init__": "",
            "pkg.reader": "from pkg import helper_fn\n",  # a lazy public name defined in pkg.helper
            "pkg.helper": "from pkg.writer import w\n",
            "pkg.writer": "",
        },
    )
    g = import_graph(pkg, {"helper_fn": "pkg.helper"})
    assert g["pkg.reader"] == {"pkg.helper"}
    assert reachable(g, "pkg.reader")["pkg.writer"] == ["pkg.reader", "pkg.helper", "pkg.writer"]
    assert import_graph(pkg)["pkg.reader"] == {"pkg"}  # without the lazy map: the package's __init__ only
