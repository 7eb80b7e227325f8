"""The adapters a server knows (name -> directory), which of them are on the model, and where they may come from.

Known adapters are made resident on demand (written into a slot of `lorakit.RowSlots`) and kept in
least-recently-used order; beyond `max_loaded` the least recently used one that no running request holds is
evicted (its slot zeroed; it stays known and is written again when asked for). Adapters are never put on the
model as adapter records: each is read, validated and fingerprinted once (`io.prepare_adapter`), its modules
wrapped once, and what the slots take (`resident.slot_content`) kept in a CPU cache (least recently used
dropped beyond `cache_bytes`), so hundreds can be registered and made resident by copying tensors into the
preallocated stacks (vLLM's set_lora), without reading, re-validating or re-wrapping anything. A cache hit
first compares the directory's files (resolved again; inode, size, modification time) with what was read: a
file changed on disk since is noticed and read again, checked as on registration (`files.read_checked`); a
reload that misses the cache does the same.
Writing and evicting slots change what the model computes, so every method that does (`acquire`, `release`,
`add`, `remove`) must run on the engine's thread, between forwards. `names`, `is_known`, `loaded` and
`resident` may be called from any thread.

Directories added over HTTP (`confined=True`) must resolve (symlinks followed) to a place under `root`, each
time they are read, and what is read is what was checked. Every kind an adapter file can hold is served per
row in a mixed batch (LoRA, DoRA, trainable tokens, modules_to_save on embeddings, heads and norms); what
cannot be (LoRA on parameters, trained base biases, a saved module of another kind) is refused when
registered (`AdapterUnsupported`, naming the adapter and why), never at its first request.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

import lorakit
from lorakit.adapters import adapter_records
from lorakit.adapters import check_adapter_name as check_library_name
from lorakit.inject import tied_heads
from lorakit.io import PreparedAdapter, prepare_adapter
from lorakit.io.files import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, adapter_dir, adapter_from_bytes
from lorakit.slots import SlotContent

from .files import FILES, AdapterAccessError, read_checked
from .resident import slot_content

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
    """An adapter per-row serving cannot run: LoRA on parameters (target_parameters), trained base biases
    (bias != "none"), or modules_to_save on a module that does not map batch rows to batch rows."""


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


@dataclass(frozen=True)
class _Cached:
    content: SlotContent  # what the slots take (resident.slot_content)
    stamp: tuple  # the files as read: (device, inode, size, mtime_ns) each


UNLIMITED_SLOTS = 8  # max_loaded None: the slots start with room for this many and double when full


class AdapterRegistry:
    """Adapters by name for one model. `max_loaded`: the slots (adapters resident at once); None or 0: no
    limit (the slots grow). `cache_bytes`: the CPU cache of validated adapters (0: none, every reload reads
    the disk). `slot_dtype`: the slots' dtype (None: the adapters'; see `lorakit.RowSlots`)."""

    def __init__(self, model, base_name: str, root: str | os.PathLike | None = None,
                 max_loaded: int | None = None, cache_bytes: int = 1 << 30, slot_dtype=None):  # fmt: skip
        self.model = model
        self.base_name = base_name
        self.root = Path(os.path.realpath(root)) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"--adapter-root {root}: not a directory")
        self.max_loaded = max_loaded or None
        self.cache_bytes = cache_bytes
        # The per-row stacks are written here, when an adapter becomes resident (and zeroed when it leaves),
        # never inside a forward.
        self.slots = lorakit.RowSlots(model, self.max_loaded or UNLIMITED_SLOTS, dtype=slot_dtype)
        self._paths: dict[str, _Source] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident adapters, least recently used first
        self._cache: OrderedDict[str, _Cached] = OrderedDict()  # validated adapters, LRU first
        self._footprints: dict[str, tuple[frozenset, frozenset]] = {}  # see _footprint
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
        """The resident adapters, least recently used first."""
        with self._lock:
            return list(self._lru)

    def resident(self, name: str) -> bool:
        """Whether `name` is in a slot now (a request for it starts without a load)."""
        with self._lock:
            return name in self._lru

    def slot(self, name: str) -> int | None:
        """The slot `name` is resident in (None: not resident). Fixed while a running request pins it."""
        with self._lock:
            return self.slots.index_of(name)

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
        """Make `name` known as the adapter in `path`: its files are read and validated in full against the
        model now (and kept in the CPU cache); it loads now when a slot is free, otherwise when first used.
        `confined`: `path` is under the root (see `confine`), checked again at every read.

        Raises:
            ValueError: an invalid name. AdapterConflict: the base's name, or a name in use.
            AdapterUnsupported: a kind per-row serving cannot run. AdapterFileError: bad files.
            AdapterAccessError / FileNotFoundError (confined): outside the root / nothing there.
        """
        check_adapter_name(name)
        if name == self.base_name or name in self._paths or name in adapter_records(self.model):
            raise AdapterConflict(f"the name {name!r} is already in use")
        source = _Source(Path(path), confined)
        cached, footprint = self._read_disk(name, source)
        if load and self._make_room():
            self._load(name, cached.content)
        with self._lock:
            self._paths[name] = source
            self._footprints[name] = footprint
        self._remember(name, cached)

    def _check_coexists(self, name: str, footprint: tuple[frozenset, frozenset]) -> None:
        """A module one adapter replaces by its own copy (modules_to_save) cannot also carry another adapter's
        LoRA or trainable tokens on the same model. Raises AdapterUnsupported naming both and the module."""
        layered, saved = footprint
        for other, (o_layered, o_saved) in list(self._footprints.items()):
            if other == name:
                continue
            clash = sorted((saved & o_layered) | (layered & o_saved))
            if clash:
                raise AdapterUnsupported(
                    f"adapter {name!r} cannot be served beside adapter {other!r}: one keeps its own copy of "
                    f"{clash} (modules_to_save) and the other adapts it (LoRA or trainable tokens), which one "
                    "model cannot hold at once; serve them from separate servers, or merge one"
                )

    def remove(self, name: str) -> None:
        """Forget `name`; it leaves the model now, or when the last request using it ends. KeyError if unknown."""
        with self._lock:
            if name not in self._paths:
                raise KeyError(f"no adapter named {name!r}")
            del self._paths[name]
            self._cache.pop(name, None)
            self._footprints.pop(name, None)
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
            self._load(name, self._content(name, source))
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
        if self.max_loaded is None and None not in self.slots.names:
            self.slots.grow(2 * self.slots.capacity)
        while self.max_loaded is not None and len(self._lru) >= self.max_loaded:
            idle = next((n for n in self._lru if not self._pins[n]), None)
            if idle is None:
                return False
            self._unload(idle)
            self.evictions += 1
        return True

    def _content(self, name: str, source: _Source) -> SlotContent:
        """The validated adapter's slot content: from the cache when its files are unchanged on disk, else
        read (and validated, checked beside the others) again."""
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached.stamp == _stamp(self._directory(name, source)):
            with self._lock:
                if name in self._cache:
                    self._cache.move_to_end(name)
            return cached.content
        cached, footprint = self._read_disk(name, source)
        with self._lock:
            self._footprints[name] = footprint
        self._remember(name, cached)
        return cached.content

    def _directory(self, name: str, source: _Source) -> Path:
        """The directory to read now: a confined source is resolved and checked against the root again."""
        return self.confine(source.path, name) if source.confined else adapter_dir(source.path, name)

    def _read_disk(self, name: str, source: _Source) -> tuple[_Cached, tuple[frozenset, frozenset]]:
        """The adapter's files read now, validated against the model, checked servable per row and beside the
        other adapters (AdapterUnsupported), and made into slot content; with its footprint."""
        self.disk_reads += 1
        directory = self._directory(name, source)
        stamp = _stamp(directory)  # before reading: a change while reading shows as a change next time
        if source.confined:
            files = read_checked(directory, check=self._check_inside)
        else:
            files = read_checked(directory)
        where = source.path if source.confined else directory
        found = adapter_from_bytes(where, files[CONFIG_NAME], files[WEIGHTS_NAME])
        try:
            prepared = prepare_adapter(self.model, found, name, ignore_fingerprint=self.ignore_fingerprint)
        except AdapterFileError as err:  # named: a server registers many (POST /v1/adapters: a 400)
            raise AdapterFileError(f"adapter {name!r}: {err}") from None
        _check_servable(name, prepared, self.model)
        footprint = _footprint(prepared, self.model)
        self._check_coexists(name, footprint)
        content = slot_content(self.slots, prepared)
        # The stacks' shape is fixed by the registered adapters, not by which are resident.
        self.slots.reserve(content)
        return _Cached(content, stamp), footprint

    def _remember(self, name: str, cached: _Cached) -> None:
        with self._lock:
            if cached.content.nbytes > self.cache_bytes or name not in self._paths:
                return
            self._cache[name] = cached
            self._cache.move_to_end(name)
            while sum(c.content.nbytes for c in self._cache.values()) > self.cache_bytes:
                self._cache.popitem(last=False)

    def _load(self, name: str, content: SlotContent) -> None:
        """Make `name` resident: its tensors copied into a free slot (set_lora), nothing else."""
        self.slots.write(name, content)
        self.loads += 1
        with self._lock:
            self._lru[name] = None

    def _unload(self, name: str) -> None:
        self.slots.evict(name)  # its slot zeroed, its records taken off their modules (reset_lora)
        with self._lock:
            self._lru.pop(name, None)


def _footprint(prepared: PreparedAdapter, model: nn.Module) -> tuple[frozenset, frozenset]:
    """(modules the adapter adapts with LoRA or trainable tokens, modules it keeps a copy of), each with the
    output heads tied to them."""
    plan = prepared.plan

    def with_tied(names) -> frozenset:
        return frozenset(n for m in names for n in (m, *(h for h, _ in tied_heads(model, m))))

    return with_tied([*plan.lora, *plan.tokens]), with_tied(plan.saved)


def _stamp(directory: Path) -> tuple:
    """What identifies the adapter's files now: (device, inode, size, mtime_ns) of each, resolved; None for
    a file that is not there (reading it then fails, naming it)."""
    out = []
    for file in FILES:
        try:
            st = os.stat(os.path.realpath(directory / file))
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


# Modules whose copy (modules_to_save) can run on a subset of the batch's rows: called with one batch-first
# tensor, each row's output depending on that row alone.
ROW_WISE = (nn.Embedding, nn.Linear, nn.LayerNorm)


def _check_servable(name: str, prepared: PreparedAdapter, model: nn.Module) -> None:
    """Raises AdapterUnsupported for what cannot run per row (see the class); naming the adapter and why."""
    config, why = prepared.config, []
    if config.target_parameters:
        why.append(f"LoRA on parameters (target_parameters={config.target_parameters}) has no per-row path")
    if config.bias != "none":
        why.append(f"bias={config.bias!r} trains the base model's biases, which every row of a batch shares")
    for module_name in prepared.plan.saved:
        module = model.get_submodule(module_name)
        kind = getattr(module, "base_class", type(module))
        if not (issubclass(kind, ROW_WISE) or kind.__name__.endswith("RMSNorm")):
            why.append(
                f"modules_to_save {module_name!r} is a {kind.__name__}: only embeddings, Linear layers (heads) "
                "and norms can run on some rows of a batch"
            )
    if why:
        raise AdapterUnsupported(
            f"adapter {name!r} ({prepared.source}) cannot be served per row: {'; '.join(why)}; merge it "
            "(`lorakit merge`) and serve the merged model instead"
        )
