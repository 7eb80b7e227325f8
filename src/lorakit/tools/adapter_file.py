"""One adapter directory as the tools see it: per-module LoRA factors with their scaling, no model needed.

`open_adapter` reads and validates a PEFT-format directory (via `io.files.read_adapter`); `build_config`
and `write_result` produce a new one. Written adapters store every ΔW with scaling s = 1 (alpha = r per
module, rank_pattern / alpha_pattern where ranks differ, use_rslora off): the factors then hold ΔW exactly
and any PEFT version computes the same ΔW, whatever the inputs' alpha / rsLoRA conventions were.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..config import LoraConfig, scaling
from ..io import keys
from ..io.files import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, read_adapter, write_adapter
from ..io.save import FINGERPRINT_KEY, VERSION_KEY

# Config keys that decide which modules are adapted; an output keeps them only when its modules are the
# inputs' (else it lists its modules by full name).
TARGET_KEYS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@dataclass
class ModuleLora:
    """The LoRA of one module. `A` (r, in·…) and `B` (out, r) are flattened to matrices; `a_shape` /
    `b_shape` are the stored shapes (Conv2d: A (r, in, kh, kw), B (out, r, 1, 1))."""

    name: str
    A: Tensor
    B: Tensor
    scale: float
    alpha: float
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    embedding: bool
    magnitude: Tensor | None = None

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """ΔW as a matrix: (out, in·kh·kw)."""
        return self.B.shape[0], self.A.shape[1]

    def stored(self, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """New factors (k, in·…) / (out, k) back in this module's stored layout."""
        k = A.shape[0]
        return A.reshape(k, *self.a_shape[1:]), B.reshape(self.b_shape[0], k, *self.b_shape[2:])

    def keys(self) -> dict[str, str]:
        suffix = (
            ("lora_embedding_A", "lora_embedding_B") if self.embedding else ("lora_A.weight", "lora_B.weight")
        )
        base = f"{keys.PREFIX}{self.name}."
        return {"A": base + suffix[0], "B": base + suffix[1], "magnitude": base + "lora_magnitude_vector"}


@dataclass
class AdapterView:
    """An adapter directory read for the tools."""

    path: Path
    raw_config: dict
    config: LoraConfig
    modules: dict[str, ModuleLora]
    other: dict[str, Tensor] = field(default_factory=dict)  # modules_to_save, trainable tokens, biases
    metadata: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)  # every tensor of the file, as stored

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def fingerprint(self) -> str | None:
        return self.metadata.get(FINGERPRINT_KEY) or None

    @property
    def file_bytes(self) -> int:
        return dir_bytes(self.path)


def dir_bytes(path: Path) -> int:
    """Size on disk of an adapter directory's two files."""
    return (path / WEIGHTS_NAME).stat().st_size + (path / CONFIG_NAME).stat().st_size


def open_adapter(path: str | os.PathLike) -> AdapterView:
    """Read and check one adapter directory (safetensors only).

    Raises:
        AdapterFileError: missing directory or files, invalid JSON or config, unreadable weights, or LoRA
            tensors inconsistent with the config (incomplete pairs, ranks that disagree with r /
            rank_pattern, DoRA magnitudes that do not match use_dora); the message names the file and module.
    """
    files = read_adapter(path)
    config_file = files.path / CONFIG_NAME
    weights = files.weights_path
    try:
        config = LoraConfig.from_peft_dict(files.config, source=str(config_file))
    except (ValueError, TypeError, AttributeError) as err:
        raise AdapterFileError(str(err) if str(config_file) in str(err) else f"{config_file}: {err}") from err

    found: dict[str, dict[str, Tensor]] = {}
    other: dict[str, Tensor] = {}
    embedding: dict[str, bool] = {}
    for k, t in files.tensors.items():
        if not t.is_floating_point():
            raise AdapterFileError(f"{weights}: tensor {k!r} has dtype {t.dtype}; expected floating point")
        parsed = keys.parse(k)
        if parsed is not None and parsed[1] in ("A", "B", "magnitude"):
            found.setdefault(parsed[0], {})[parsed[1]] = t
            if parsed[1] in ("A", "B"):
                embedding[parsed[0]] = "lora_embedding_" in k
        elif parsed is not None and parsed[1] == "lora_bias":
            raise AdapterFileError(f"{weights}: key {k!r}: LoRA biases (lora_bias=True) are not supported")
        else:
            other[k] = t
    if not found:
        raise AdapterFileError(f"{weights}: no LoRA tensors (lora_A / lora_B) in the file")

    modules = {}
    for name, parts in sorted(found.items()):
        for kind in ("A", "B"):
            if kind not in parts:
                raise AdapterFileError(f"{weights}: module {name!r} has no lora_{kind} tensor")
        A, B = parts["A"], parts["B"]
        r = config.rank_for(name)
        if A.dim() < 2 or B.dim() < 2 or A.shape[0] != r or B.shape[1] != r:
            raise AdapterFileError(
                f"{weights}: module {name!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not have "
                f"rank {r}, the rank {CONFIG_NAME} gives this module (r / rank_pattern)"
            )
        if B.dim() > 2 and any(d != 1 for d in B.shape[2:]):
            raise AdapterFileError(f"{weights}: module {name!r}: lora_B {tuple(B.shape)} is not a 1×1 conv")
        mag = parts.get("magnitude")
        if config.use_dora != (mag is not None):
            state = "has no" if config.use_dora else "has a"
            raise AdapterFileError(
                f"{weights}: module {name!r} {state} DoRA magnitude but use_dora is {config.use_dora} in {CONFIG_NAME}"
            )
        if mag is not None and mag.shape != (B.shape[0],):
            raise AdapterFileError(
                f"{weights}: module {name!r}: magnitude {tuple(mag.shape)} != ({B.shape[0]},)"
            )
        alpha = config.alpha_for(name)
        modules[name] = ModuleLora(
            name=name,
            A=A.reshape(r, -1),
            B=B.reshape(B.shape[0], r),
            scale=scaling(r, alpha, config.use_rslora),
            alpha=alpha,
            a_shape=tuple(A.shape),
            b_shape=tuple(B.shape),
            embedding=embedding[name],
            magnitude=mag,
        )
    return AdapterView(files.path, files.config, config, modules, other, files.metadata, files.tensors)


def build_config(template: dict, ranks: dict[str, int], same_modules: bool) -> dict:
    """The adapter_config.json of an output whose module `m` has rank `ranks[m]` and scaling 1.

    `template` is an input's config (its other keys, e.g. task_type, are kept). r is the most common rank,
    lora_alpha = r, and every module of another rank gets rank_pattern = alpha_pattern = its rank (key: its
    escaped full name, which matches only that module). `same_modules`: the output adapts exactly the
    template's modules, so its target keys stay; otherwise target_modules lists the modules by name.
    """
    r = Counter(ranks.values()).most_common(1)[0][0]
    cfg = dict(template)
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    cfg.update(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        use_rslora=False,
        init_lora_weights=True,  # plain LoRA factors on the untouched base (no PiSSA / LoftQ re-init)
        inference_mode=True,
    )
    if not same_modules:
        cfg.update(
            target_modules=sorted(ranks), exclude_modules=None, layers_to_transform=None, layers_pattern=None
        )
    return cfg


def check_output(output: str | os.PathLike, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output that is one of the inputs, a file, or (without `overwrite`) an existing adapter.

    Called before any work, so a bad output path fails fast and nothing is written.
    """
    out = Path(output)
    if any(out.resolve() == p.resolve() for p in inputs):
        raise ValueError(f"{output}: is an input adapter; write the result to another directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{output}: exists and is not a directory")
    if (out / CONFIG_NAME).exists() and not overwrite:
        raise ValueError(f"{output}: already holds an adapter; pass --overwrite to replace it")


def write_result(
    path: str | os.PathLike,
    config: dict,
    tensors: dict[str, Tensor],
    fingerprint: str | None,
    overwrite: bool,
) -> Path:
    """Write an output adapter atomically (io.files.write_adapter), refusing to replace one unless asked.

    Raises:
        ValueError: `path` already holds an adapter and `overwrite` is False, or is a file.
    """
    from .. import __version__

    check_output(path, [], overwrite)
    metadata = {VERSION_KEY: __version__}
    if fingerprint:
        metadata[FINGERPRINT_KEY] = fingerprint
    return write_adapter(path, config, tensors, metadata)


def module_tensors(m: ModuleLora, A: Tensor, B: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """The file tensors of module `m` with new flattened factors A (k, in·…), B (out, k), cast to `dtype`."""
    A, B = m.stored(A, B)
    names = m.keys()
    out = {names["A"]: A.to(dtype).contiguous(), names["B"]: B.to(dtype).contiguous()}
    if m.magnitude is not None:
        out[names["magnitude"]] = m.magnitude
    return out
