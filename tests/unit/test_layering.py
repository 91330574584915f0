"""Import boundaries: who may import whom, checked on the source (nothing is imported).

``RULES`` is the rule book that docs/architecture.md draws; each row keeps one
boundary. Every ``import`` and ``from ... import`` in ``tvixmount/`` and
``workers/`` counts, wherever it sits (inside a function too, and under
``TYPE_CHECKING``: a boundary is about what a module knows, not when it learns it).
The rules marked ``load_time`` are about what importing a module *loads*: they follow,
transitively, the imports that run when a module is imported (module level, parent
packages included) and name the chain that reaches a forbidden module.

Names are dotted module names. A name covers its module and everything below it
(``tvixmount.store`` is the package and all its submodules); a name with ``*`` is a
glob over the whole dotted name. A package's own ``__init__.py`` is
``<package>.__init__`` on the importing side. Relative imports are resolved as
Python resolves them; ``from pkg import name`` imports ``pkg.name`` when that is a
module, else ``pkg``.

When a module moves, change its name here and in docs/architecture.md together;
``test_every_name_in_the_table_exists`` says which names no longer match anything.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

# -- the groups the rules speak of -----------------------------------------------------

# The one module of tvixmount that may import ``workers``: it hands the pool its
# worker entry point (``workers.loop.serve``).
COMPOSER = "tvixmount.cli"

# The FUSE edge: the only modules that may import llfuse (``fuse_timing`` holds the
# ``timed`` decorator that wraps each handler).
FUSE_EDGE = ("tvixmount.fuse_ops", "tvixmount.fuse_timing", "tvixmount.mount", "tvixmount.cli")

# The mount process above the pipe: FUSE edge, Vfs, readahead, pool. Workers, the
# store and the admin tools never lean on it. (inflight and shmring are primitives
# both sides may use; the metrics modules are values and an exporter, not mount state.)
DISPATCHER = (
    *FUSE_EDGE, "tvixmount.vfs", "tvixmount.attrs", "tvixmount.readahead", "tvixmount.fetcher",
    "tvixmount.substitution", "tvixmount.mount_notify",
    "tvixmount.pool", "tvixmount.poolstate", "tvixmount.collector", "tvixmount.zygote",
)
POOL = ("tvixmount.pool", "tvixmount.poolstate", "tvixmount.collector", "tvixmount.zygote",
        "tvixmount.fetcher")

# Store backends: what must not be loaded just to name a store, nor known by the mount.
GRPC_CLIENT = "tvixmount.store.grpc"  # the gRPC client package
GRPC_WIRE = "tvixmount.store.grpc.wire"  # what client and server share
EMBEDDED = "tvixmount.store.embedded"
CACHE = "tvixmount.store.cache"
# The cache's config (directory, size) is a value that StoreUrls carries; the cache
# itself is its service and its sqlite index.
CACHE_BACKEND = ("tvixmount.store.cache.service", "tvixmount.store.cache.index")
# A binary cache's URL is checked by the dispatcher (nixhttp's package and config are
# values); what talks HTTP, decompresses, verifies signatures or ingests runs in workers.
NIXHTTP_BACKEND = tuple(f"tvixmount.store.nixhttp.{m}" for m in
                        ("http", "service", "substitute", "decompress", "checks"))
BACKENDS = (GRPC_CLIENT, EMBEDDED, *CACHE_BACKEND, *NIXHTTP_BACKEND, "tvixmount.store.naringest",
            "tvixmount.store.memory",
            "tvixmount.store.segments", "tvixmount.store.sqlite", "grpc", "sqlite3", "urllib3",
            "cryptography", "zstandard")
# Where StoreUrls and URL parsing live (importing it also runs tvixmount/store/__init__.py).
STORE_URLS = ("tvixmount.store.urls",)

# The generated gRPC stubs (tvixmount/proto/*_pb2_grpc.py) import grpc, so importing
# them is importing grpc.
GRPC = ("grpc", "grpc_health", "grpc_reflection", "tvixmount.proto.*_pb2_grpc")
PROJECT = ("tvixmount", "workers")
# Leaf helpers any layer may use: each imports nothing of the project but errors.
LEAVES = ("tvixmount.deadlines", "tvixmount.units", "tvixmount.inflight", "tvixmount.sdnotify")


@dataclass(frozen=True)
class Rule:
    """Modules matching ``modules`` (minus ``exempt``) may not import ``forbidden``
    (minus ``allowed``), and, when ``only`` is given, nothing of the project outside it."""

    name: str
    modules: tuple[str, ...]
    forbidden: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    exempt: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()
    load_time: bool = False


RULES = (
    Rule("the leaf helpers import nothing of the project but errors",
         modules=LEAVES, only=("tvixmount.errors", *LEAVES)),
    Rule("castore is the pure model: of the project it imports only errors and proto",
         modules=("tvixmount.castore",), only=("tvixmount.castore", "tvixmount.errors", "tvixmount.proto")),
    Rule("the store sits below everything: of the project it imports only castore, errors, proto "
         "and the leaf helpers (deadline policy, size units, single-flight)",
         modules=("tvixmount.store",),
         only=("tvixmount.store", "tvixmount.castore", "tvixmount.errors", "tvixmount.proto",
               *LEAVES)),
    Rule("grpc is imported only by the gRPC client and the daemon",
         modules=PROJECT, forbidden=GRPC, exempt=(GRPC_CLIENT, "tvixmount.server", "tvixmount.proto")),
    Rule("the embedded store does not import the blob cache (they share store.segments and store.sqlite)",
         modules=(EMBEDDED,), forbidden=(CACHE,)),
    Rule("the blob cache does not import the embedded store (they share store.segments and store.sqlite)",
         modules=(CACHE,), forbidden=(EMBEDDED,)),
    Rule("naming a store (StoreUrls, URL parsing) loads no backend",
         modules=STORE_URLS, forbidden=BACKENDS, load_time=True),
    Rule("starting a mount loads no store backend: no grpc, no sqlite before the workers fork",
         modules=("tvixmount.cli", "tvixmount.mount"), forbidden=BACKENDS, load_time=True),
    Rule("the mount knows no store backend: workers open stores",
         modules=DISPATCHER, forbidden=BACKENDS),
    Rule(f"tvixmount never imports workers; only {COMPOSER} hands the pool its entry point",
         modules=("tvixmount",), forbidden=("workers",), exempt=(COMPOSER,)),
    Rule("workers use the protocol and the store, never the mount's modules",
         modules=("workers",), forbidden=(*DISPATCHER, "tvixmount.admin", "tvixmount.server")),
    Rule("the daemon shares only the wire module with the gRPC client, none of its internals",
         modules=("tvixmount.server",), forbidden=("tvixmount.store.grpc*",), allowed=(GRPC_WIRE,)),
    Rule("llfuse is imported only at the FUSE edge",
         modules=PROJECT, forbidden=("llfuse",), exempt=FUSE_EDGE),
    Rule("msgpack is imported only by the protocol",
         modules=PROJECT, forbidden=("msgpack",), exempt=("tvixmount.protocol",)),
    Rule("the protocol is shared by both sides and knows neither the mount nor the workers",
         modules=("tvixmount.protocol",), forbidden=(*DISPATCHER, "workers", "tvixmount.admin",
                                                     "tvixmount.server")),
    Rule("tvixstore and the daemon work without a mount: no mount modules, no workers, no protocol",
         modules=("tvixmount.admin", "tvixmount.server"),
         forbidden=(*DISPATCHER, "workers", "tvixmount.protocol")),
    Rule("the pool knows nothing of FUSE or the Vfs",
         modules=POOL, forbidden=(*FUSE_EDGE, "tvixmount.vfs", "tvixmount.attrs", "tvixmount.readahead")),
    Rule("the Vfs is pure state: no pool, no fetcher, no store, no protocol",
         modules=("tvixmount.vfs", "tvixmount.attrs"),
         forbidden=(*POOL, "tvixmount.store", "tvixmount.protocol", "workers")),
)


# -- reading the imports ---------------------------------------------------------------


def _root() -> Path:
    """The repository root (the tests may move into per-level folders)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "setup.cfg").exists() and (parent / "tvixmount").is_dir():
            return parent
    raise RuntimeError(f"no repository root above {__file__}")


@dataclass(frozen=True)
class Import:
    file: str  # relative to the root
    line: int
    importer: str  # dotted; a package's __init__.py is "<package>.__init__"
    target: str  # the module imported
    at_load: bool  # runs when the importer itself is imported


def module_names(root: Path, tops: Iterable[str] = PROJECT) -> dict[str, Path]:
    """Importer name -> file, for every module under ``tops``."""
    found = {}
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            found[".".join(path.relative_to(root).with_suffix("").parts)] = path
    return found


def _plain(importer: str) -> str:
    """The module's import name: ``a.b.__init__`` is ``a.b``."""
    return importer.removesuffix(".__init__")


def _package(importer: str) -> str:
    """The package relative imports in ``importer`` are resolved against."""
    if importer.endswith(".__init__"):
        return _plain(importer)
    return importer.rpartition(".")[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST, at_load: bool) -> Iterator[tuple[ast.AST, bool]]:
    """Every import statement (and ``import_module("literal")`` call) below ``node``."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, at_load
        return
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if called in ("import_module", "__import__"):
            yield node, at_load
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        at_load = False
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for stmt in node.body:
            yield from _import_nodes(stmt, False)
        for stmt in node.orelse:
            yield from _import_nodes(stmt, at_load)
        return
    for child in ast.iter_child_nodes(node):
        yield from _import_nodes(child, at_load)


def _targets(node: ast.AST, importer: str, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.Call):
        value = node.args[0]
        assert isinstance(value, ast.Constant)
        return [str(value.value)]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = _package(importer).split(".")
        if node.level - 1 >= len(base):
            raise ValueError(f"{importer}: relative import beyond the top package")
        base = base[:len(base) - (node.level - 1)]
        module = ".".join([*base, node.module] if node.module else base)
    else:
        module = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        name = sub if sub in known else module
        if name not in out:
            out.append(name)
    return out


def read_imports(root: Path, tops: Iterable[str] = PROJECT) -> list[Import]:
    modules = module_names(root, tops)
    known = {_plain(name) for name in modules}
    found = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, at_load in _import_nodes(tree, True):
            for target in _targets(node, importer, known):
                found.append(Import(str(path.relative_to(root)), getattr(node, "lineno", 0), importer,
                                    target, at_load))
    return found


# -- checking them ---------------------------------------------------------------------


def matches(name: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if "*" in pattern:
            if fnmatchcase(name, pattern):
                return True
        elif name == pattern or name.startswith(pattern + "."):
            return True
    return False


def _in_project(name: str) -> bool:
    return matches(name, PROJECT)


def breaks(rule: Rule, imp: Import) -> bool:
    """Whether a direct import breaks ``rule`` (load-time rules look further: ``loads``)."""
    if not matches(imp.importer, rule.modules) or matches(imp.importer, rule.exempt):
        return False
    if matches(imp.target, rule.allowed):
        return False
    if matches(imp.target, rule.forbidden):
        return True
    # The top package itself holds only the version; every module runs it anyway.
    return (rule.only is not None and _in_project(imp.target) and imp.target != "tvixmount"
            and not matches(imp.target, rule.only))


def _with_parents(name: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a``, ``a.b`` and ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]


def loads(module: str, imports: Iterable[Import]) -> dict[str, list[Import]]:
    """Everything importing ``module`` loads, each with the chain of imports that loads it."""
    at_load: dict[str, list[Import]] = {}
    for imp in imports:
        if imp.at_load:
            at_load.setdefault(_plain(imp.importer), []).append(imp)
    reached: dict[str, list[Import]] = {}
    todo: deque[tuple[str, list[Import]]] = deque((name, []) for name in _with_parents(module))
    while todo:
        name, chain = todo.popleft()
        if name in reached:
            continue
        reached[name] = chain
        for imp in at_load.get(name, ()):
            todo.extend((step, [*chain, imp]) for step in _with_parents(imp.target) if step not in reached)
    return reached


def violations(rule: Rule, imports: list[Import]) -> list[str]:
    """One line per crossing: file:line, importer, what it imports (and, at load time, how)."""
    if not rule.load_time:
        return [f"{imp.file}:{imp.line}: {_plain(imp.importer)} imports {imp.target}"
                for imp in imports if breaks(rule, imp)]
    found = []
    # The named modules themselves (even one without imports still runs its packages) and
    # every importer under them.
    starts = sorted({name for name in rule.modules if "*" not in name} | {
        _plain(imp.importer) for imp in imports
        if matches(imp.importer, rule.modules) and not matches(imp.importer, rule.exempt)})
    for start in starts:
        for name, chain in loads(start, imports).items():
            if not chain or not matches(name, rule.forbidden) or matches(name, rule.allowed):
                continue
            if any(matches(step.target, rule.forbidden) for step in chain[:-1]):
                continue  # reached through a forbidden module: that one is reported
            steps = "; ".join(f"{imp.file}:{imp.line} imports {imp.target}" for imp in chain)
            found.append(f"importing {start} loads {name}: {steps}")
    return found


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return read_imports(_root())


@pytest.mark.parametrize("rule", RULES, ids=[rule.name for rule in RULES])
def test_rule(rule: Rule, imports: list[Import]) -> None:
    broken = violations(rule, imports)
    if broken:
        pytest.fail(f"rule broken: {rule.name}\n  " + "\n  ".join(broken), pytrace=False)


def test_every_name_in_the_table_exists() -> None:
    """A name that matches no module is a rule that checks nothing: a module moved."""
    root = _root()
    modules = module_names(root)
    names = set(modules) | {_plain(name) for name in modules}
    stale = set()
    for rule in RULES:
        for pattern in (*rule.modules, *rule.forbidden, *rule.exempt, *rule.allowed, *(rule.only or ())):
            if _in_project(pattern.replace("*", "x")) and not any(matches(n, [pattern]) for n in names):
                stale.add(pattern)
    if stale:
        pytest.fail("names in RULES that match no module (renamed?): " + ", ".join(sorted(stale)),
                    pytrace=False)


# -- the checker itself ----------------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_relative_imports_resolve_as_python_resolves_them(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "tvixmount/__init__.py": "",
        "tvixmount/errors.py": "",
        "tvixmount/store/__init__.py": "from . import urls\nfrom .urls import Url\nfrom .. import errors\n",
        "tvixmount/store/urls.py": "from ..errors import InvalidArgument\n",
        "tvixmount/store/grpc/__init__.py": "",
        "tvixmount/store/grpc/read.py": "from ...castore import n\nfrom . import wire\nfrom .wire import W",
        "tvixmount/store/grpc/wire.py": "",
        "workers/__init__.py": "",
        "workers/loop.py": "from tvixmount.store import StoreUrls\nimport tvixmount.store.urls as u\n",
    })
    got = {(i.importer, i.target) for i in read_imports(root)}
    assert got == {
        ("tvixmount.store.__init__", "tvixmount.store.urls"),
        ("tvixmount.store.__init__", "tvixmount.errors"),
        ("tvixmount.store.urls", "tvixmount.errors"),
        ("tvixmount.store.grpc.read", "tvixmount.castore"),  # not a module in this tree: the package
        ("tvixmount.store.grpc.read", "tvixmount.store.grpc.wire"),
        ("workers.loop", "tvixmount.store"),
        ("workers.loop", "tvixmount.store.urls"),
    }


def test_a_crossing_is_reported_with_file_line_and_rule(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "tvixmount/__init__.py": "",
        "tvixmount/vfs.py": "",
        "tvixmount/castore/__init__.py": "",
        "tvixmount/castore/nodes.py": "import os\n\nfrom ..vfs import Vfs\n",
        "tvixmount/store/__init__.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from .cache import Cache\n"
            "def open_store():\n    from . import embedded\n"
            "import importlib\nimportlib.import_module('tvixmount.store.cache.service')\n"
        ),
        "tvixmount/store/cache/__init__.py": "",
        "tvixmount/store/cache/service.py": "",
        "tvixmount/store/embedded.py": "",
        "tvixmount/store/urls.py": "",
        "tvixmount/cli.py": "from .store import urls\n",
        "tvixmount/store/grpc/__init__.py": "",
        "tvixmount/store/grpc/read.py": "",
        "tvixmount/store/grpc/wire.py": "",
        "tvixmount/server/__init__.py": "from ..store.grpc import wire\nfrom ..store.grpc.read import R\n",
        "workers/__init__.py": "",
    })
    found = read_imports(root)
    castore = next(rule for rule in RULES if rule.name.startswith("castore"))
    assert violations(castore, found) == [
        "tvixmount/castore/nodes.py:3: tvixmount.castore.nodes imports tvixmount.vfs"]
    # Only the import that runs on import counts, not the lazy or TYPE_CHECKING ones; and
    # importing store.urls runs the store package first.
    naming = next(rule for rule in RULES if rule.name.startswith("naming a store"))
    assert violations(naming, found) == [
        "importing tvixmount.store.urls loads tvixmount.store.cache.service: "
        "tvixmount/store/__init__.py:7 imports tvixmount.store.cache.service"]
    starting = next(rule for rule in RULES if rule.name.startswith("starting a mount"))
    assert violations(starting, found) == [
        "importing tvixmount.cli loads tvixmount.store.cache.service: "
        "tvixmount/cli.py:1 imports tvixmount.store.urls; "
        "tvixmount/store/__init__.py:7 imports tvixmount.store.cache.service"]
    wire = next(rule for rule in RULES if rule.name.startswith("the daemon shares"))
    assert violations(wire, found) == [
        "tvixmount/server/__init__.py:2: tvixmount.server imports tvixmount.store.grpc.read"]
    knows = next(rule for rule in RULES if rule.name.startswith("tvixstore and the daemon"))
    assert not violations(knows, found)
