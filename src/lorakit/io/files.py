"""Adapter directories on disk: PEFT's `adapter_config.json` + `adapter_model.safetensors`.

Low level and model-free: read or write one adapter directory as (config dict, tensors, metadata).
Writes are all-or-nothing (`atomic.replace_files`: the new config and weights are committed together, so a kill
at any instant leaves the complete old adapter or the complete new one); reads see the last committed save,
never unpickle anything and raise `AdapterFileError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from ..atomic import clean_stale, replace_files, resolve

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    """An adapter directory or file that cannot be read: missing, malformed, truncated or inconsistent."""


@dataclass
class AdapterFiles:
    """The contents of one adapter directory."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def adapter_dir(root: str | os.PathLike, name: str = "default") -> Path:
    """Where adapter `name` lives under `root`: the root itself for "default", else `root/name` (PEFT's rule).

    For another name, `root/name` when it holds an adapter, else a root that directly holds an
    adapter_config.json is taken as the adapter itself (loading one adapter directory under a new name).
    """
    root = Path(root)
    if name == "default" or (
        (root / name / CONFIG_NAME).is_file() is False and (root / CONFIG_NAME).is_file()
    ):
        return root
    return root / name


def read_config(path: str | os.PathLike) -> dict:
    """Parse `path/adapter_config.json`. Raises AdapterFileError naming the file."""
    file = resolve(path, CONFIG_NAME)
    if not Path(path).is_dir():
        raise AdapterFileError(f"{path}: not an adapter directory (it does not exist or is not a directory)")
    if not file.is_file():
        raise AdapterFileError(
            f"{file}: missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{file}: not valid JSON ({err})") from err
    except RecursionError as err:
        raise AdapterFileError(f"{file}: JSON nested too deeply to be a config") from err
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def read_adapter(path: str | os.PathLike, device: str | torch.device = "cpu") -> AdapterFiles:
    """Read a whole adapter directory into memory (safetensors only; a .bin file is refused, never unpickled).

    Reads the last committed save: through the journal a killed save left (see atomic.replace_files), and
    again when a concurrent save moves a file away between finding and opening it.

    Raises:
        AdapterFileError: missing files, invalid JSON, a corrupt / truncated safetensors file, or NaN / inf
            in a tensor (naming the key and the count).
    """
    for attempt in range(3):
        try:
            return _read(Path(path), device)
        except FileNotFoundError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _read(path: Path, device: str | torch.device) -> AdapterFiles:
    config = read_config(path)
    weights = resolve(path, WEIGHTS_NAME)
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterFileError(
                f"{path / 'adapter_model.bin'}: pickle files are never loaded (they can run code); "
                f"convert it to {WEIGHTS_NAME} in a trusted environment"
            )
        raise AdapterFileError(f"{path / WEIGHTS_NAME}: missing")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except FileNotFoundError:
        raise  # moved by a concurrent save: read_adapter reads again
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        if not weights.exists():
            raise FileNotFoundError(weights) from err
        raise AdapterFileError(
            f"{path / WEIGHTS_NAME}: unreadable safetensors file, corrupt or truncated? ({err})"
        ) from err
    check_finite(path / WEIGHTS_NAME, tensors)
    return AdapterFiles(path, config, tensors, metadata)


def adapter_from_bytes(path: str | os.PathLike, config: bytes, weights: bytes) -> AdapterFiles:
    """An adapter directory's contents from the bytes of its two files (already read, e.g. by a server that
    opened them itself); checked as `read_adapter` checks a directory. `path`: where they came from (named
    in errors).

    Raises:
        AdapterFileError: invalid JSON, a config that is not an object, a corrupt / truncated safetensors
            file, or NaN / inf in a tensor.
    """
    path = Path(path)
    try:
        data = json.loads(config)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path / CONFIG_NAME}: not valid JSON ({err})") from None
    except RecursionError:
        raise AdapterFileError(f"{path / CONFIG_NAME}: JSON nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path / CONFIG_NAME}: expected a JSON object, got {type(data).__name__}")
    try:
        tensors = load_safetensors(weights)
        # The header (8-byte little-endian length, then JSON) holds the metadata `load` does not return.
        header = json.loads(weights[8 : 8 + int.from_bytes(weights[:8], "little")])
        metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    except (SafetensorError, OSError, RuntimeError, ValueError, AttributeError) as err:
        raise AdapterFileError(
            f"{path / WEIGHTS_NAME}: unreadable safetensors file, corrupt or truncated? ({err})"
        ) from None
    check_finite(path / WEIGHTS_NAME, tensors)
    return AdapterFiles(path, data, tensors, metadata)


def check_finite(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN / inf in any floating-point tensor: they would load silently and poison every output.

    Raises:
        AdapterFileError: naming the file, the first keys and how many values of each are not finite.
    """
    bad = []
    for key, t in tensors.items():
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"{key!r} has {n} of {t.numel()}")
    if bad:
        more = f" (and {len(bad) - 3} more tensors)" if len(bad) > 3 else ""
        raise AdapterFileError(
            f"{file}: non-finite values (NaN / inf): {'; '.join(bad[:3])}{more}; expected finite numbers"
        )


def write_adapter(
    path: str | os.PathLike,
    config: dict,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write an adapter directory all-or-nothing (atomic.replace_files): under a kill at any instant `path`
    holds the complete old adapter or the complete new one. Other files in `path` are kept.

    Args:
        extra: writes more files into the same transaction (called with the staging folder), e.g. the
            tokenizer of an adapter that grew the vocabulary.
    Returns:
        The directory written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.name)  # sibling temporaries of killed saves (lorakit 0.1.0 put them there)
    meta = {"format": "pt", **(metadata or {})}
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def fill(stage: Path) -> None:
        save_file(contiguous, str(stage / WEIGHTS_NAME), metadata=meta)
        (stage / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if extra is not None:
            extra(stage)

    return replace_files(path, fill)
