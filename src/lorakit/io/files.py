"""Adapter directories on disk: PEFT's `adapter_config.json` + `adapter_model.safetensors`.

Low level and model-free: read or write one adapter directory as (config dict, tensors, metadata).
Writes are atomic (everything goes to a temporary directory beside the target, then renames into place),
reads never unpickle anything and raise `AdapterFileError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import follow_umask

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
    file = Path(path) / CONFIG_NAME
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
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def read_adapter(path: str | os.PathLike, device: str | torch.device = "cpu") -> AdapterFiles:
    """Read a whole adapter directory into memory (safetensors only; a .bin file is refused, never unpickled).

    Raises:
        AdapterFileError: missing files, invalid JSON, or a corrupt / truncated safetensors file.
    """
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterFileError(
                f"{path / 'adapter_model.bin'}: pickle files are never loaded (they can run code); "
                f"convert it to {WEIGHTS_NAME} in a trusted environment"
            )
        raise AdapterFileError(f"{weights}: missing")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterFileError(
            f"{weights}: unreadable safetensors file, corrupt or truncated? ({err})"
        ) from err
    return AdapterFiles(path, config, tensors, metadata)


def write_adapter(
    path: str | os.PathLike,
    config: dict,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write an adapter directory atomically: files go to a temporary sibling directory, then each is
    renamed into `path` (an existing adapter there is replaced file by file, other files are kept).

    Returns the directory written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, str(tmp / WEIGHTS_NAME), metadata=meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        follow_umask(tmp / WEIGHTS_NAME)  # save_file creates it 0600
        for f in (tmp / WEIGHTS_NAME, tmp / CONFIG_NAME):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        path.mkdir(parents=True, exist_ok=True)
        # Weights first, config last: a directory with the new config always has the new weights.
        os.replace(tmp / WEIGHTS_NAME, path / WEIGHTS_NAME)
        os.replace(tmp / CONFIG_NAME, path / CONFIG_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
