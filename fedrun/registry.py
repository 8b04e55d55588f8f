"""Named registries: the one place where the names of pluggable pieces are defined.

Every pluggable piece -- server strategies, client algorithms, client-update and server
transforms, partitioners, feature extractors, tasks -- is registered once, next to its code, with
``@REGISTRY.register("name")``. Config validation asks the registry (``check``), so a new entry
is usable from YAML and the command line without editing ``fedrun/config.py``, and an unknown
name is refused with the list of registered ones (Flower and pfl-research register strategies the
same way).
"""

from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

from fedrun.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> classes (or factories) of one kind of pluggable piece."""

    def __init__(self, kind: str, config_key: str):
        self.kind = kind  # e.g. "server strategy", for messages
        self.config_key = config_key  # the config key that names an entry, for messages
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@STRATEGIES.register("fedavg") class FedAvg: ...``; sets ``.name``."""
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = entry
            try:
                entry.name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):  # builtins and the like keep their own name
                pass
            return entry
        return add

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def check(self, name: str, key: str | None = None) -> None:
        """A ConfigError naming ``key`` and the registered names unless ``name`` is registered."""
        if name not in self._entries:
            raise ConfigError(f"config key '{key or self.config_key}': unknown {self.kind} "
                              f"'{name}' (registered: {', '.join(self.names()) or 'none'})")

    def get(self, name: str, key: str | None = None) -> T:
        self.check(name, key)
        return self._entries[name]
