"""The adapters a server knows (name -> directory), which of them are on the model, and where they may come from.

Known adapters are loaded on demand and kept in least-recently-used order; beyond `max_loaded` the least recently
used one that no running request holds is deleted from the model (it stays known and reloads when asked for).
Loading and deleting change the model's layers, so every method that does (`acquire`, `release`, `add`,
`remove`, `preload`) must run on the engine's thread, between forwards. `names`, `is_known` and `loaded` may be
called from any thread.

Directories added over HTTP must resolve (symlinks followed) to a place under `root`.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, OrderedDict
from pathlib import Path

import torch

import lorakit
from lorakit.adapters import _check_name, adapter_records
from lorakit.config import LoraConfig
from lorakit.io.files import CONFIG_NAME, WEIGHTS_NAME, adapter_dir, read_adapter


class AdapterAccessError(PermissionError):
    """A directory outside the adapter root (or HTTP loading is off)."""


class AdapterConflict(ValueError):
    """A name already in use (or the base model's name)."""


class AdapterRegistry:
    """Adapters by name for one model. `max_loaded` None or 0: no limit."""

    def __init__(
        self, model, base_name: str, root: str | os.PathLike | None = None, max_loaded: int | None = None
    ):
        self.model = model
        self.base_name = base_name
        self.root = Path(os.path.realpath(root)) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"--adapter-root {root}: not a directory")
        self.max_loaded = max_loaded or None
        self._paths: dict[str, Path] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded adapters, least recently used first
        self._pins: Counter[str] = Counter()  # running requests per adapter
        self._doomed: set[str] = set()  # removed while in use: deleted from the model when released
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0
        self.ignore_fingerprint = (
            False  # `lorakit serve --ignore-fingerprint`: load adapters of other weights
        )

    # -- any thread --------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._lock:
            return list(self._paths)

    def is_known(self, name: str) -> bool:
        with self._lock:
            return name in self._paths

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._lru)

    def confine(self, path: str, name: str) -> Path:
        """The real directory that adapter `name` at `path` loads from (relative paths are under the root).

        load_adapter reads `path/name/` when that holds an adapter: the directory returned is the one it will
        read, checked like `path`, so loading it reads nothing else.

        Raises:
            AdapterAccessError: no root was configured, or the directory or one of its files resolves outside
                the root (a `..` or a symlink escaping it). FileNotFoundError: nothing there.
        """
        if self.root is None:
            raise AdapterAccessError(
                "loading adapters over HTTP is disabled: start the server with --adapter-root"
            )
        real = Path(os.path.realpath(self.root / path))
        self._check_inside(real, path)
        for _ in range(8):
            nested = adapter_dir(real, name)
            if nested == real or not (nested / CONFIG_NAME).is_file():
                break
            real = Path(os.path.realpath(nested))
            self._check_inside(real, f"{path}/{name}")
        else:
            raise AdapterAccessError(f"adapter path {path!r}: directories nested too deep")
        if not real.is_dir():
            raise FileNotFoundError(f"adapter path {path!r}: no such directory under the adapter root")
        for file in (CONFIG_NAME, WEIGHTS_NAME):
            if (real / file).exists() or (real / file).is_symlink():
                self._check_inside(Path(os.path.realpath(real / file)), f"{path}/{file}")
        return real

    def _check_inside(self, real: Path, shown: str) -> None:
        if real != self.root and self.root not in real.parents:
            raise AdapterAccessError(f"adapter path {shown!r} resolves outside the adapter root")

    # -- engine thread -----------------------------------------------------------------------------------------

    def add(self, name: str, path: str | os.PathLike, load: bool = True) -> None:
        """Make `name` known as the adapter in `path`, loading it now when a slot is free (which validates it
        completely); otherwise its files are read and its config checked, and it loads when first used.

        Raises:
            AdapterConflict: an invalid name, the base's name, or a name in use. AdapterFileError: bad files.
        """
        try:
            _check_name(name)
        except ValueError as err:
            raise AdapterConflict(str(err)) from err
        if name == self.base_name or name in self._paths or name in adapter_records(self.model):
            raise AdapterConflict(f"the name {name!r} is already in use")
        path = Path(path)
        if load and self._make_room():
            self._load(name, path)
        else:
            files = read_adapter(adapter_dir(path, name))
            LoraConfig.from_peft_dict(files.config, source=str(files.path / CONFIG_NAME))
        with self._lock:
            self._paths[name] = path

    def remove(self, name: str) -> None:
        """Forget `name`; it leaves the model now, or when the last request using it ends. KeyError if unknown."""
        with self._lock:
            if name not in self._paths:
                raise KeyError(f"no adapter named {name!r}")
            del self._paths[name]
        if self._pins[name]:
            self._doomed.add(name)
        elif name in self._lru:
            self._unload(name)

    def acquire(self, name: str) -> bool:
        """Pin `name` on the model for one request, loading it if needed. False: every slot is held by running
        requests (try again after one finishes). Raises KeyError if unknown, AdapterFileError if its files broke."""
        with self._lock:
            path = self._paths.get(name)
        if path is None:
            raise KeyError(f"no adapter named {name!r}")
        if name not in self._lru:
            if not self._make_room():
                return False
            self._load(name, path)
        with self._lock:
            self._lru.move_to_end(name)
        self._pins[name] += 1
        return True

    def release(self, name: str) -> None:
        self._pins[name] -= 1
        if self._pins[name] <= 0:
            del self._pins[name]
            if name in self._doomed:
                self._doomed.discard(name)
                self._unload(name)

    def _make_room(self) -> bool:
        while self.max_loaded is not None and len(self._lru) >= self.max_loaded:
            idle = next((n for n in self._lru if not self._pins[n]), None)
            if idle is None:
                return False
            self._unload(idle)
            self.evictions += 1
        return True

    def _load(self, name: str, path: Path) -> None:
        # Plain tensors even on the engine thread (which runs in inference_mode): they keep a version counter,
        # which the per-row fast path checks before reusing its stacked copy of them.
        with torch.inference_mode(False):
            lorakit.load_adapter(
                self.model, path, name=name, activate=False, ignore_fingerprint=self.ignore_fingerprint
            )
        self.loads += 1
        with self._lock:
            self._lru[name] = None

    def _unload(self, name: str) -> None:
        lorakit.delete_adapter(self.model, name)
        with self._lock:
            self._lru.pop(name, None)
