"""The adapters a server knows (name -> directory), which of them are on the model, and where they may come from.

Known adapters are loaded on demand and kept in least-recently-used order; beyond `max_loaded` the least recently
used one that no running request holds is deleted from the model (it stays known and reloads when asked for).
The files of known adapters are kept in a CPU cache (bytes, least recently used dropped beyond `cache_bytes`),
so hundreds can be registered and reloaded without reading the disk each time; a reload that misses the cache
reads the directory again, checked as on registration (`files.read_checked`).
Loading and deleting change the model's layers, so every method that does (`acquire`, `release`, `add`,
`remove`) must run on the engine's thread, between forwards. `names`, `is_known` and `loaded` may be called
from any thread.

Directories added over HTTP (`confined=True`) must resolve (symlinks followed) to a place under `root`, each
time they are read, and what is read is what was checked. Adapters the per-row path cannot serve (DoRA,
trainable tokens, modules_to_save) are refused when registered, not at their first request.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

import lorakit
from lorakit.adapters import adapter_records
from lorakit.adapters import check_adapter_name as check_library_name
from lorakit.config import LoraConfig
from lorakit.io.files import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, adapter_dir

from .files import AdapterAccessError, read_checked, shown, stage

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_:@+=-]{0,127}")
__all__ = [
    "AdapterAccessError",
    "AdapterConflict",
    "AdapterRegistry",
    "AdapterUnsupported",
    "check_adapter_name",
]


class AdapterConflict(ValueError):
    """A name already in use (or the base model's name)."""


class AdapterUnsupported(ValueError):
    """An adapter kind per-row serving cannot run: DoRA, trainable tokens or modules_to_save."""


def check_adapter_name(name: object) -> None:
    """Raises ValueError unless `name` is 1-128 characters of letters, digits and _ : @ + = - (not first)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown_name = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
        raise ValueError(
            f"adapter name {shown_name}: expected 1-128 characters, letters, digits and _ : @ + = - "
            "(starting with a letter, digit or _)"
        )
    check_library_name(name)


@dataclass(frozen=True)
class _Source:
    path: Path  # as given: under the root (relative or not) when confined
    confined: bool


class AdapterRegistry:
    """Adapters by name for one model. `max_loaded` None or 0: no limit. `cache_bytes`: the CPU cache of
    adapter files (0: none, every reload reads the disk)."""

    def __init__(self, model, base_name: str, root: str | os.PathLike | None = None,
                 max_loaded: int | None = None, cache_bytes: int = 1 << 30):  # fmt: skip
        self.model = model
        self.base_name = base_name
        self.root = Path(os.path.realpath(root)) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"--adapter-root {root}: not a directory")
        self.max_loaded = max_loaded or None
        self.cache_bytes = cache_bytes
        # The per-row stacks are written here, when an adapter loads (and freed when it leaves), never inside
        # a forward; without a limit there is no fixed slot count, and per_row_adapters writes them per step.
        self.slots = lorakit.RowSlots(model, self.max_loaded) if self.max_loaded else None
        self._paths: dict[str, _Source] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded adapters, least recently used first
        self._cache: OrderedDict[str, dict[str, bytes]] = OrderedDict()  # files by adapter, LRU first
        self._pins: Counter[str] = Counter()  # running requests per adapter
        self._doomed: set[str] = set()  # removed while in use: deleted from the model when released
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0
        self.disk_reads = 0
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

    def pinned(self) -> dict[str, int]:
        """Running requests per adapter (an adapter with none can be unloaded)."""
        return {n: c for n, c in list(self._pins.items()) if c}

    def confine(self, path: str | os.PathLike, name: str) -> Path:
        """The real directory that adapter `name` at `path` loads from (relative paths are under the root).

        load_adapter reads `path/name/` when that holds an adapter: the directory returned is the one it will
        read, checked like `path`, so loading it reads nothing else.

        Raises:
            AdapterAccessError: no root was configured, or the directory or one of its files resolves outside
                the root (a `..` or a symlink escaping it), or the path cannot be a path (a NUL byte, too long).
            FileNotFoundError: nothing there.
        """
        if self.root is None:
            raise AdapterAccessError(
                "loading adapters over HTTP is disabled: start the server with --adapter-root"
            )
        try:
            return self._confine(str(path), name)
        except (ValueError, OSError) as err:
            if isinstance(err, FileNotFoundError | PermissionError):
                raise
            raise AdapterAccessError(f"adapter path {str(path)[:100]!r}: unusable ({err})") from None

    def _confine(self, path: str, name: str) -> Path:
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

    def _check_inside(self, real: Path, shown_as: str) -> None:
        if real != self.root and self.root not in real.parents:
            raise AdapterAccessError(f"adapter path {shown_as!r} resolves outside the adapter root")

    # -- engine thread -----------------------------------------------------------------------------------------

    def add(self, name: str, path: str | os.PathLike, load: bool = True, confined: bool = False) -> None:
        """Make `name` known as the adapter in `path`, loading it now when a slot is free (which validates it
        completely); otherwise its files are read, its config and weights file checked, and it loads when
        first used. `confined`: `path` is under the root (see `confine`), checked again at every read.

        Raises:
            ValueError: an invalid name. AdapterConflict: the base's name, or a name in use.
            AdapterUnsupported: DoRA, trainable tokens or modules_to_save. AdapterFileError: bad files.
            AdapterAccessError / FileNotFoundError (confined): outside the root / nothing there.
        """
        check_adapter_name(name)
        if name == self.base_name or name in self._paths or name in adapter_records(self.model):
            raise AdapterConflict(f"the name {name!r} is already in use")
        source = _Source(Path(path), confined)
        files = self._read_disk(name, source)
        _check_servable(name, files, source.path)
        if load and self._make_room():
            self._load(name, files, source.path)
        else:
            _check_weights(files, source.path)
        with self._lock:
            self._paths[name] = source
        self._remember(name, files)

    def remove(self, name: str) -> None:
        """Forget `name`; it leaves the model now, or when the last request using it ends. KeyError if unknown."""
        with self._lock:
            if name not in self._paths:
                raise KeyError(f"no adapter named {name!r}")
            del self._paths[name]
            self._cache.pop(name, None)
        if self._pins[name]:
            self._doomed.add(name)
        elif name in self._lru:
            self._unload(name)

    def acquire(self, name: str) -> bool:
        """Pin `name` on the model for one request, loading it if needed. False: every slot is held by running
        requests (try again after one finishes). Raises KeyError if unknown; AdapterFileError,
        AdapterAccessError if its files broke or moved out of the root since it was registered."""
        with self._lock:
            source = self._paths.get(name)
        if source is None:
            raise KeyError(f"no adapter named {name!r}")
        if name not in self._lru:
            if not self._make_room():
                return False
            self._load(name, self._files(name, source), source.path)
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

    def _files(self, name: str, source: _Source) -> dict[str, bytes]:
        with self._lock:
            files = self._cache.get(name)
            if files is not None:
                self._cache.move_to_end(name)
                return files
        files = self._read_disk(name, source)
        self._remember(name, files)
        return files

    def _read_disk(self, name: str, source: _Source) -> dict[str, bytes]:
        """The adapter's files, read now: a confined source is resolved and checked against the root again."""
        self.disk_reads += 1
        if not source.confined:
            return read_checked(adapter_dir(source.path, name))
        real = self.confine(source.path, name)
        return read_checked(real, check=self._check_inside)

    def _remember(self, name: str, files: dict[str, bytes]) -> None:
        size = sum(len(b) for b in files.values())
        with self._lock:
            if size > self.cache_bytes or name not in self._paths:
                return
            self._cache[name] = files
            self._cache.move_to_end(name)
            while sum(len(b) for f in self._cache.values() for b in f.values()) > self.cache_bytes:
                self._cache.popitem(last=False)

    def _load(self, name: str, files: dict[str, bytes], where: Path) -> None:
        # Plain tensors even on the engine thread (which runs in inference_mode), so the adapter stays an
        # ordinary trainable-kind tensor outside the server (tests, training in the same process).
        with stage(files) as staged, torch.inference_mode(False):
            try:
                lorakit.load_adapter(
                    self.model, staged, name=name, activate=False, ignore_fingerprint=self.ignore_fingerprint
                )
            except Exception as err:  # name the user's directory, not the private copy
                named = shown(err, staged, where)
                if named is err:
                    raise
                raise named from None
        if self.slots is not None:
            self.slots.load(name)
        self.loads += 1
        with self._lock:
            self._lru[name] = None

    def _unload(self, name: str) -> None:
        lorakit.delete_adapter(self.model, name)  # frees its slot too
        with self._lock:
            self._lru.pop(name, None)


def _check_servable(name: str, files: dict[str, bytes], where: Path) -> None:
    """Raises AdapterFileError for an invalid config, AdapterUnsupported for kinds per-row serving cannot run."""
    source = f"{where}/{CONFIG_NAME}"
    try:
        raw = json.loads(files[CONFIG_NAME])
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        config = LoraConfig.from_peft_dict(raw, source=source)
    except (ValueError, TypeError, AttributeError, RecursionError) as err:
        raise AdapterFileError(
            f"{source}: invalid config ({err})" if source not in str(err) else str(err)
        ) from None
    kinds = [k for k, on in (("DoRA", config.use_dora), ("trainable tokens", config.trainable_token_indices),
                             ("modules_to_save", config.modules_to_save)) if on]  # fmt: skip
    if kinds:
        raise AdapterUnsupported(
            f"adapter {name!r} ({where}) uses {' and '.join(kinds)}: lorakit serve decodes every row of a "
            "batch with its own LoRA adapter, and cannot do that for these yet; merge it "
            "(`lorakit merge`) and serve the merged model instead"
        )


def _check_weights(files: dict[str, bytes], where: Path) -> None:
    try:
        load_safetensors(files[WEIGHTS_NAME])
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterFileError(
            f"{where}/{WEIGHTS_NAME}: unreadable safetensors file, corrupt or truncated? ({err})"
        ) from None
