"""The public plugin API: every registry of pluggable pieces, and how plugins are loaded.

A piece -- a server strategy, a client algorithm, an update or server transform, a codec, a
partitioner, a data source, a feature extractor, a task -- is registered once, next to its code:

    @STRATEGIES.register("fedavgm")
    class FedAvgM(ServerStrategy):
        @dataclass
        class Params:                 # its own parameters: config keys beside server.strategy
            momentum: float = 0.9

The config names a piece (``server.strategy: fedavgm``) and sets its parameters in the same
section (``server.momentum: 0.95``); the loader (``fedrun.config.load_config``) validates them
against the piece's ``Params`` -- an unknown parameter is an error naming the key and the allowed
ones -- and an unknown name is refused with the list of registered ones. A piece may also check
the whole config (``check_config(cfg)``, e.g. SCAFFOLD's need for plain SGD).

Where pieces come from (``load_plugins``): fedrun's built-in modules, the modules a config lists
under ``plugins`` (imported before validation), and the ``fedrun.plugins`` entry-point group of
installed distributions. Tasks are found by folder: ``task.name: dit`` imports
``fedrun.tasks.dit`` (torchtitan's TrainSpec idea: a model is a folder), so a new task is one new
folder and edits no other file.

This module sits below everything else in fedrun: it imports nothing of fedrun but its errors.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import sys
from typing import Any, Callable, Dict, Generic, Iterable, List, Optional, TypeVar

from fedrun.errors import ConfigError

T = TypeVar("T")

#: entry-point group of installed plugins (``[project.entry-points."fedrun.plugins"]``)
ENTRY_POINT_GROUP = "fedrun.plugins"


class ParamError(ValueError):
    """A piece's parameter is out of range: ``field`` names it, the loader adds the section."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def require(condition: bool, field: str, message: str) -> None:
    """For a piece's ``Params.__post_init__``: refuse a value, naming the field."""
    if not condition:
        raise ParamError(field, message)


class Registry(Generic[T]):
    """Names -> classes (or factories) of one kind of pluggable piece, each with its parameters
    dataclass (``params=`` at registration, or the entry's ``Params`` attribute; none = no
    parameters)."""

    def __init__(self, kind: str, config_key: str, package: Optional[str] = None):
        self.kind = kind  # e.g. "server strategy", for messages
        self.config_key = config_key  # the config key that names an entry, for messages
        self.package = package  # entries discovered as this package's subpackages, by name
        self._entries: Dict[str, T] = {}
        self._params: Dict[str, Optional[type]] = {}

    def register(self, name: str, params: Optional[type] = None) -> Callable[[T], T]:
        """Decorator: ``@STRATEGIES.register("fedavg") class FedAvg: ...``; sets ``.name``."""
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            declared = params if params is not None else getattr(entry, "Params", None)
            if declared is not None and not dataclasses.is_dataclass(declared):
                raise TypeError(f"{self.kind} '{name}': its Params must be a dataclass")
            self._entries[name] = entry
            self._params[name] = declared
            try:
                entry.name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):  # builtins and the like keep their own name
                pass
            return entry
        return add

    # ------------------------------------------------------------ lookup
    def names(self) -> List[str]:
        """Registered names plus, for a package registry, its folders not imported yet."""
        found = set(self._entries)
        if self.package is not None:
            module = importlib.import_module(self.package)
            found.update(m.name for m in pkgutil.iter_modules(module.__path__)
                         if m.ispkg and not m.name.startswith("_"))
        return sorted(found)

    def _discover(self, name: str) -> None:
        """Import the folder ``package.name`` (a task) when ``name`` is not registered yet."""
        if self.package is None or name in self._entries:
            return
        importlib.import_module(f"{self.package}.{name}")
        if name not in self._entries:
            raise ConfigError(f"{self.package}.{name} registers no {self.kind} '{name}' (its "
                              f"__init__ must import the module that does @register(\"{name}\"))")

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def check(self, name: str, key: Optional[str] = None) -> None:
        """A ConfigError naming ``key`` and the registered names unless ``name`` is registered."""
        if name not in self:
            raise ConfigError(f"config key '{key or self.config_key}': unknown {self.kind} "
                              f"'{name}' (registered: {', '.join(self.names()) or 'none'})")

    def get(self, name: str, key: Optional[str] = None) -> T:
        self.check(name, key)
        self._discover(name)
        return self._entries[name]

    def params_of(self, name: str) -> Optional[type]:
        """The parameters dataclass of entry ``name`` (None: it takes none)."""
        self.get(name)
        return self._params[name]

    def taking(self, parameter: str) -> List[str]:
        """The registered entries whose parameters include ``parameter`` (for messages)."""
        return sorted(n for n, p in self._params.items()
                      if p is not None and parameter in {f.name for f in dataclasses.fields(p)})

    def build_params(self, name: str, section: Any) -> Any:
        """The entry's ``Params`` filled from the config section holding them (None if none)."""
        params = self.params_of(name)
        if params is None:
            return None
        return params(**{f.name: getattr(section, f.name) for f in dataclasses.fields(params)})


# ---------------------------------------------------------------- every registry of fedrun

STRATEGIES: Registry = Registry("server strategy", "server.strategy")
CLIENT_ALGORITHMS: Registry = Registry("client algorithm", "client.algorithm")
UPDATE_TRANSFORMS: Registry = Registry("update transform", "aggregation.update_transforms")
SERVER_TRANSFORMS: Registry = Registry("server transform", "aggregation.server_transforms")
PARTITIONERS: Registry = Registry("partitioner", "partition.method")
DATASETS: Registry = Registry("data source", "data.name")
FEATURE_EXTRACTORS: Registry = Registry("feature extractor", "eval.feature")
TASKS: Registry = Registry("task", "task.name", package="fedrun.tasks")
CODECS: Registry = Registry("codec", "aggregation.uplink.name")

#: fedrun's own pieces (tasks are found by folder, see TASKS)
BUILTIN_MODULES = (
    "fedrun.fl.strategies",
    "fedrun.fl.clients",
    "fedrun.fl.aggregation.transforms",
    "fedrun.fl.aggregation.codecs",
    "fedrun.fl.privacy.transforms",
    "fedrun.data.digits",
    "fedrun.data.folder",
    "fedrun.data.hf",
    "fedrun.data.partition",
    "fedrun.eval.features",
)

_loaded: set = set()


def load_plugins(modules: Iterable[str] = ()) -> None:
    """Import fedrun's built-in pieces, the installed ``fedrun.plugins`` entry points and
    ``modules`` (a config's ``plugins``), each once; a module that cannot be imported is a
    ConfigError naming it."""
    for name in BUILTIN_MODULES:
        _import_once(name, builtin=True)
    if "entry points" not in _loaded:
        from importlib.metadata import entry_points

        _loaded.add("entry points")
        for point in entry_points(group=ENTRY_POINT_GROUP):
            try:
                point.load()
            except Exception as exc:  # a broken plugin is named, not a traceback
                raise ConfigError(f"entry point '{point.name}' ({point.value}) of group "
                                  f"'{ENTRY_POINT_GROUP}' cannot be loaded: {exc}") from None
    for name in modules:
        _import_once(name)


def _import_once(name: str, builtin: bool = False) -> None:
    if name in _loaded:
        return
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if builtin:
            raise
        raise ConfigError(f"config key 'plugins': module '{name}' cannot be imported ({exc}); "
                          f"it must be importable from sys.path ({sys.path[0] or '.'} first)") from None
    _loaded.add(name)
