"""The import graph of netstack and tun2xray: no circles, and the layers
import one way (wire -> netstack -> upstream/device -> engine/host -> cli).

Every module is imported in a fresh interpreter (an import circle that
breaks at import time fails there), then the graph is read from each file's
syntax tree: every ``import`` and ``from ... import``, at module level and
inside functions alike (a lazy import that closes a circle still closes it).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("netstack", "tun2xray")

# Circles outside the xray side, known and left for their own change; each
# entry is the set of modules of one circle.  A circle found must lie within
# one of these (a new module joining it, or a new circle, fails).
KNOWN_CIRCLES: list = []    # none left: keep it that way

_IMPORT_ALL = """
import importlib, json, pkgutil, sys
mods = {}
for pkg in sys.argv[1:]:
    top = importlib.import_module(pkg)
    mods[pkg] = top.__file__
    for info in pkgutil.walk_packages(top.__path__, pkg + "."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue                      # runs the program when imported
        mods[info.name] = importlib.import_module(info.name).__file__
print(json.dumps(mods))
"""


@pytest.fixture(scope="module")
def modules() -> dict:
    """{module name: file} of every module, each imported once in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _IMPORT_ALL, *PACKAGES], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    mods = json.loads(r.stdout)
    for name, path in mods.items():
        assert os.path.realpath(path).startswith(ROOT + os.sep), f"{name} imported from {path}"
    return mods


def _imported(name: str, path: str, known) -> set:
    """Every module ``name`` imports (absolute names; our own modules are
    resolved to the deepest module named, others kept as written)."""
    is_pkg = os.path.basename(path) == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in known else mod)
    return out


@pytest.fixture(scope="module")
def graph(modules) -> dict:
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _ours(graph, name) -> set:
    return {m for m in graph[name] if m in graph and m != name}


def _circles(graph) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(_ours(graph, v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_found(modules):
    # the walk sees the packages' rooms (a broken walk would make the rest vacuous)
    for name in ("netstack.stack", "netstack.wire.ipv4", "tun2xray.engine", "tun2xray.xray.core",
                 "tun2xray.xray.session", "tun2xray.device.linux_tun", "tun2xray.upstream.socks5"):
        assert name in modules


def test_the_graph_reader_sees_lazy_and_relative_imports(modules):
    # tun2xray.xray.session imports the auto-route module inside a method
    assert "tun2xray.xray.autoroute" in _imported("tun2xray.xray.session",
                                                  modules["tun2xray.xray.session"], modules)


def test_no_import_circle(graph):
    unknown = [sorted(c) for c in _circles(graph)
               if not any(c <= set(known) for known in KNOWN_CIRCLES)]
    assert unknown == []


def test_the_circle_finder_finds_circles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(g) == [{"a", "b", "c"}]


def _violations(graph, sources, forbidden) -> list:
    return sorted(f"{m} imports {dep}" for m in graph if m.startswith(sources)
                  for dep in graph[m] if forbidden(dep))


def test_netstack_never_imports_tun2xray(graph):
    assert _violations(graph, ("netstack.", "netstack"),
                       lambda d: d == "tun2xray" or d.startswith("tun2xray.")) == []


def test_wire_imports_only_the_stdlib_and_wire(graph):
    def foreign(dep):
        if dep == "netstack.wire" or dep.startswith("netstack.wire."):
            return False
        return dep.split(".")[0] not in sys.stdlib_module_names

    assert _violations(graph, ("netstack.wire",), foreign) == []


def test_upstream_and_device_stay_below_the_engine(graph):
    above = ("tun2xray.engine", "tun2xray.cli", "tun2xray.bridge", "tun2xray.workers",
             "tun2xray.xray")

    def upward(dep):
        return any(dep == a or dep.startswith(a + ".") for a in above)

    assert _violations(graph, ("tun2xray.upstream", "tun2xray.device"), upward) == []


def test_the_xray_package_exports_its_rooms_names():
    import importlib

    from tun2xray import xray
    for name in xray.__all__:
        room = importlib.import_module(f"tun2xray.xray.{xray._HOME[name]}")
        assert getattr(xray, name) is getattr(room, name), name
    with pytest.raises(AttributeError):
        xray.no_such_name


def test_the_cli_parser_does_not_load_the_core_modules():
    # `node` and `doctor` add their flags to every parser: that must not
    # import the core's supervision and derivation (they load on first use)
    code = ("import json, sys; from tun2xray.cli import build_parser; build_parser(); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('tun2xray.xray'))))")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["tun2xray.xray", "tun2xray.xray.doctor", "tun2xray.xray.nodes"]
