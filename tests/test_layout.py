"""
The layout's rules (ARCHITECTURE.md), checked on the source so that they cannot erode: imports
run one way, there are no import cycles, and only the twistd plugin takes the global reactor.

Every import counts, also the ones inside functions: an import deferred to call time still ties
the two modules together.
"""

import ast
import os

from tests import REPO

PACKAGE = os.path.join(REPO, "mailgate")
STAGES = ("mailgate.smtp", "mailgate.filters", "mailgate.queue", "mailgate.delivery")
# What the stages must never reach: they publish events, and the ops side subscribes.
ASSEMBLY = ("mailgate.ops", "mailgate.service", "mailgate.gateway", "mailgate.cli", "mailgate.tap",
            "mailgate.processes")
# The programs' entry points: twistd's plugin, a receiver process; Gateway.from_config's default.
GLOBAL_REACTOR_ALLOWED = ("mailgate.tap", "mailgate.processes.receiver", "mailgate")


def modules():
    """{dotted module name: path} of every module of the package."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                dotted = os.path.relpath(path[:-3], REPO).replace(os.sep, ".")
                found[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return found


def _within(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imports(module, path, known):
    """(the mailgate modules module imports, whether it imports the global reactor)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found, reactor = set(), False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
            reactor = reactor or "twisted.internet.reactor" in names
            found.update(n for n in names if _within(n, ("mailgate",)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base == "twisted.internet" and any(a.name == "reactor" for a in node.names):
                reactor = True
            if _within(base, ("mailgate",)):
                for alias in node.names:
                    full = base + "." + alias.name
                    found.add(full if full in known else base)
    return {name for name in found if name != module}, reactor


def graph():
    known = modules()
    edges, reactors = {}, set()
    for module, path in known.items():
        edges[module], uses_reactor = imports(module, path, known)
        if uses_reactor:
            reactors.add(module)
    return edges, reactors


def test_every_module_is_seen():
    edges, _ = graph()
    for expected in ("mailgate.smtp.server", "mailgate.queue.spool", "mailgate.delivery.scheduler",
                     "mailgate.filters.chain", "mailgate.ops.metrics", "mailgate.config"):
        assert expected in edges


def wrong_way(edges):
    return sorted((module, target) for module, targets in edges.items() if _within(module, STAGES)
                  for target in targets if _within(target, ASSEMBLY))


def cycles(edges):
    found = []
    state = {}  # module -> "visiting" or "done"

    def visit(module, path):
        state[module] = "visiting"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "visiting":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return found


def test_stages_never_import_the_ops_side_or_the_assembly():
    edges, _ = graph()
    wrong = wrong_way(edges)
    assert wrong == [], "a stage imports ops/ or the assembly (publish an event instead): %s" % wrong


def test_config_depends_on_nothing_but_itself():
    """Config is parsed on its own: check-config must not start the stages."""
    edges, _ = graph()
    wrong = sorted((module, target) for module, targets in edges.items()
                   if _within(module, ("mailgate.config",))
                   for target in targets if not _within(target, ("mailgate.config", "mailgate.errors")))
    assert wrong == []


def test_shared_values_import_no_stage():
    """envelope, errors, events, interfaces, verdict, message: the vocabulary every stage uses."""
    edges, _ = graph()
    shared = ("mailgate.envelope", "mailgate.errors", "mailgate.events", "mailgate.interfaces",
              "mailgate.verdict", "mailgate.message", "mailgate.version")
    wrong = sorted((module, target) for module in shared for target in edges[module]
                   if not _within(target, shared))
    assert wrong == []


def test_no_import_cycles():
    found = cycles(graph()[0])
    assert found == [], "import cycles: %s" % [" -> ".join(c) for c in found]


def test_only_the_plugin_takes_the_global_reactor():
    _, reactors = graph()
    assert reactors <= set(GLOBAL_REACTOR_ALLOWED), sorted(reactors - set(GLOBAL_REACTOR_ALLOWED))


def test_the_rules_would_catch_a_violation(tmp_path):
    """The checker itself: a stage module importing ops/ and a cycle are both found."""
    known = {"mailgate.smtp.x": str(tmp_path / "x.py"), "mailgate.ops.y": str(tmp_path / "y.py")}
    (tmp_path / "x.py").write_text("def f():\n    from mailgate.ops import y\n")
    (tmp_path / "y.py").write_text("from mailgate.smtp.x import f\nfrom twisted.internet import reactor\n")
    assert imports("mailgate.smtp.x", known["mailgate.smtp.x"], known) == ({"mailgate.ops.y"}, False)
    assert imports("mailgate.ops.y", known["mailgate.ops.y"], known) == ({"mailgate.smtp.x"}, True)
    edges = {"mailgate.smtp.x": {"mailgate.ops.y"}, "mailgate.ops.y": {"mailgate.smtp.x"}}
    assert wrong_way(edges) == [("mailgate.smtp.x", "mailgate.ops.y")]
    assert cycles(edges) == [["mailgate.ops.y", "mailgate.smtp.x", "mailgate.ops.y"]]
