"""The package's structure: no import cycles (imports inside functions count), the engine never
imports a task, the registries sit below the config, and pieces load as plugins from outside the
package (a ``plugins`` module of a config, and the ``fedrun.plugins`` entry-point group)."""

import ast
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "fedrun"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, modules: set) -> set:
    """fedrun modules ``module`` imports anywhere: in functions, and under ``if TYPE_CHECKING:``
    too (an annotation-only import is still a dependency of the design)."""
    found = set()

    def visit(node):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fedrun"):
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("fedrun"):
            for alias in node.names:  # ``from fedrun.engine import dist`` imports a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return {name for name in found if name in modules}


def import_graph() -> dict:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(ast.parse(p.read_text()), _module_name(p), modules)
            for p in paths}


def find_cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "fedrun.engine.simulator" in graph
    assert find_cycles(graph) == []


def test_the_engine_never_imports_a_task_and_the_registry_imports_nothing_of_fedrun():
    graph = import_graph()
    engine = {m: deps for m, deps in graph.items() if m.startswith("fedrun.engine")}
    for module, deps in engine.items():
        tasks = {d for d in deps if d.startswith("fedrun.tasks.") and d != "fedrun.tasks.base"}
        assert not tasks, (module, tasks)
    assert graph["fedrun.registry"] <= {"fedrun.errors"}
    # the config knows the registries, not the pieces' modules
    assert not {d for d in graph["fedrun.config"] if d.startswith(("fedrun.fl", "fedrun.data",
                                                                   "fedrun.tasks.", "fedrun.eval"))}


PLUGIN = '''
from dataclasses import dataclass

from fedrun.fl.strategies import FedAvg
from fedrun.registry import STRATEGIES, require


@STRATEGIES.register("{name}")
class HalfStep(FedAvg):
    """FedAvg with its own parameter: w <- w + scale * lr * mean update."""

    @dataclass
    class Params:
        scale: float = 0.5

        def __post_init__(self):
            require(0 < self.scale <= 1, "scale", f"must be in (0, 1], got {{self.scale}}")

    def step(self, weights, update_sum, total_weight=1.0):
        weights.add_(update_sum, alpha=self.params.scale * self.lr / total_weight)
'''


@pytest.fixture
def isolated_strategies(monkeypatch):
    """The strategies a test registers are forgotten after it (other tests list the registry).
    The built-in ones are registered first: restoring a snapshot taken before would lose them
    (their modules are imported once)."""
    from fedrun.registry import STRATEGIES, load_plugins

    load_plugins()
    monkeypatch.setattr(STRATEGIES, "_entries", dict(STRATEGIES._entries))
    monkeypatch.setattr(STRATEGIES, "_params", dict(STRATEGIES._params))


def test_a_plugin_module_named_in_the_config_registers_a_strategy(tmp_path, monkeypatch,
                                                                   isolated_strategies):
    """A module outside the package, listed under ``plugins``, is imported before validation:
    its strategy is selectable and its parameter validated like a built-in's."""
    from fedrun.config import load_config
    from fedrun.errors import ConfigError
    from fedrun.fl.strategies import build_server

    (tmp_path / "my_fedrun_plugin.py").write_text(textwrap.dedent(PLUGIN.format(name="half_step")))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown server strategy 'half_step'"):
        load_config(None, ["server.strategy=half_step"])
    cfg = load_config(None, ["plugins=[my_fedrun_plugin]", "server.strategy=half_step",
                             "server.scale=0.25"])
    assert cfg.server.scale == 0.25 and build_server(cfg.server).params.scale == 0.25
    with pytest.raises(ConfigError, match="'server.scale': must be in"):
        load_config(None, ["plugins=[my_fedrun_plugin]", "server.strategy=half_step", "server.scale=2"])
    with pytest.raises(ConfigError, match="config key 'plugins': module 'no_such_plugin'"):
        load_config(None, ["plugins=[no_such_plugin]"])


def test_an_installed_entry_point_registers_a_strategy_without_being_named(tmp_path, monkeypatch,
                                                                          isolated_strategies):
    """A distribution that declares ``[fedrun.plugins]`` in its entry points is loaded by every
    config: here a real dist-info folder on sys.path, read by importlib.metadata."""
    import fedrun.registry as registry
    from fedrun.config import load_config

    (tmp_path / "ep_fedrun_plugin.py").write_text(textwrap.dedent(PLUGIN.format(name="ep_half_step")))
    info = tmp_path / "ep_fedrun_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-fedrun-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedrun.plugins]\nhalf = ep_fedrun_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", set(registry._loaded) - {"entry points"})
    cfg = load_config(None, ["server.strategy=ep_half_step"])
    assert cfg.server.strategy == "ep_half_step" and cfg.server.scale == 0.5


def test_a_listed_transform_gets_its_own_parameters_from_its_subsection():
    """``aggregation.update_transforms`` lists pieces; one with a ``Params`` dataclass takes its
    parameters under ``aggregation.<name>`` (validated like any other) and is built with them."""
    import toy_algorithms  # noqa: F401  (registers toy_jitter, whose Params has scale)
    from fedrun.config import load_config
    from fedrun.errors import ConfigError
    from fedrun.fl.aggregation.transforms import build_update_transforms

    listed = "aggregation.update_transforms=[nonfinite_guard,toy_jitter]"
    cfg = load_config(None, [listed, "aggregation.toy_jitter.scale=0.25"])
    guard, jitter = build_update_transforms(cfg)
    assert guard.params is None and jitter.params.scale == 0.25
    assert build_update_transforms(load_config(None, [listed]))[1].params.scale == 1e-5
    with pytest.raises(ConfigError, match="'aggregation.toy_jitter.scale': must be >= 0"):
        load_config(None, [listed, "aggregation.toy_jitter.scale=-1"])
    with pytest.raises(ConfigError, match="aggregation.toy_jitter"):
        load_config(None, ["aggregation.toy_jitter.scale=0.25"])  # not listed: no such section
