"""Lazy package attributes: a package names its public objects without importing their modules.

`lorakit --help` builds every subcommand's parser; importing torch / transformers for that costs seconds, so
the packages on that path (lorakit, lorakit.serve, lorakit.tools) resolve their public names on first use.
"""

from __future__ import annotations

import importlib
import sys
import types


def attach(package: str, names: dict[str, str]) -> None:
    """Make `names` (public name -> submodule defining it) attributes of `package`, imported on first use.

    A public name equal to its submodule's name (`lorakit.merge`, the function in `lorakit/merge.py`) stays
    the function: importing the submodule, which sets the package attribute, cannot replace it.
    Usage, at the end of a package's __init__: `attach(__name__, {"Engine": "engine"})`.
    """

    class LazyPackage(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            if name not in names:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
            setattr(self, name, value)  # later look-ups skip __getattr__
            return value

        def __setattr__(self, name: str, value: object) -> None:
            if (
                isinstance(value, types.ModuleType)
                and value.__name__ == f"{package}.{name}"
                and name in names
            ):
                value = getattr(value, name)  # the import system binding the submodule: keep the object
            super().__setattr__(name, value)

        def __dir__(self) -> list[str]:
            return sorted(set(vars(self)) | set(names))

    sys.modules[package].__class__ = LazyPackage
