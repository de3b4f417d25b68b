"""One small registry for the things tessera finds by name: methods (core.methods), pretrained networks
(core.nets) and cluster backends (cluster.backends). Pure Python: a package's registry costs nothing to
import; the modules that fill it are imported on the first lookup."""

from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
from typing import Callable, Iterable


class Registry:
    """Names to registered objects. ``modules`` are imported on the first lookup (their decorators fill
    the registry); ``package`` instead imports every module of that package but ``skip`` (adding a file
    is then all it takes); ``env`` names an environment variable of extra comma-separated modules (a
    lab's own, outside tessera: inherited by ranks and Ray workers). ``check(name, obj)`` runs when
    something registers, so a thing missing a piece fails where it is added."""

    def __init__(self, kind: str, modules: Iterable[str] = (), package: str | None = None,
                 skip: Iterable[str] = (), env: str | None = None, error: type[Exception] = KeyError,
                 check: Callable[[str, object], None] | None = None):
        self.kind, self.modules, self.package, self.skip = kind, tuple(modules), package, set(skip)
        self.env, self.error, self.check = env, error, check
        self._items: dict[str, object] = {}
        self._loaded = self._loading = False

    def register(self, name: str) -> Callable:
        def add(obj):
            if self.check is not None:
                self.check(name, obj)
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice ({getattr(self._items[name], '__module__', '?')}, "
                                 f"{getattr(obj, '__module__', '?')})")
            self._items[name] = obj
            return obj

        return add

    def _load(self) -> None:
        if self._loaded or self._loading:  # loading: a module being imported looked something up
            return
        names = list(self.modules)
        if self.package is not None:
            path = importlib.import_module(self.package).__path__
            names += [f"{self.package}.{m.name}" for m in pkgutil.iter_modules(path) if m.name not in self.skip]
        if self.env:
            names += [m.strip() for m in os.environ.get(self.env, "").split(",") if m.strip()]
        self._loading = True
        try:
            for module in names:
                importlib.import_module(module)
            self._loaded = True  # not before: a module that failed to import fails again at the next lookup
        finally:
            self._loading = False

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str):
        self._load()
        if name not in self._items:
            near = difflib.get_close_matches(name, self._items, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise self.error(f"unknown {self.kind} '{name}' (known: {', '.join(sorted(self._items))}){hint}")
        return self._items[name]
