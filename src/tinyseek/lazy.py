"""Imports deferred until first use, so that `import tinyseek` and every command's argument parsing (`--help`,
argument errors) load neither torch nor transformers; the command itself imports what it needs."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]):
    """A PEP 562 `__getattr__` and `__dir__` for `package`: each name in `exports` is imported from the module named
    there on first access; any submodule (`tinyseek.hf`) is reachable as an attribute too."""

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Run `callback` once the module `name` has been imported: now if it already is, else right after
    whoever imports it first has executed it."""
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


class _AfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # found by the finders that come after this one
        if spec is None or spec.loader is None:
            return spec
        execute, callback = spec.loader.exec_module, self.callback

        def exec_module(module):
            execute(module)
            callback()

        spec.loader.exec_module = exec_module
        return spec


def is_importing(module_name: str) -> bool:
    """Whether `module_name` is being executed right now (imported, but not yet complete)."""
    module = sys.modules.get(module_name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))
