"""convert: an adapter's tensors cast to another floating dtype (bf16 / fp16 halve an fp32 file)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .adapter_file import check_output, dir_bytes, open_adapter, write_result

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class ConvertReport:
    bytes_before: int
    bytes_after: int
    max_rel_error: float  # max over tensors of max |x' - x| / max |x|


def convert(
    src: str | os.PathLike, output: str | os.PathLike, dtype: str, overwrite: bool = False
) -> ConvertReport:
    """Write `src` to `output` with every tensor cast to `dtype` ("bf16", "fp16" or "fp32").

    The config and metadata (base fingerprint included) are kept as they are. Values change only by the
    rounding of the new dtype.

    Raises:
        AdapterFileError: `src` missing or malformed. ValueError: unknown dtype, a value outside fp16's
            range (naming the tensor: use bf16), or `output` holds an adapter and not `overwrite`.
            Nothing is written on any error.
    """
    if dtype not in DTYPES:
        raise ValueError(f"convert: --dtype {dtype!r} is invalid: expected one of {sorted(DTYPES)}")
    view = open_adapter(src)
    check_output(output, [view.path], overwrite)
    target = DTYPES[dtype]
    tensors = {}
    worst = 0.0
    for key, t in sorted(view.tensors.items()):
        new = t.to(target)
        if not torch.isfinite(new).all() and torch.isfinite(t).all():
            raise ValueError(
                f"{view.weights_path}: tensor {key!r} has values up to {t.abs().max().item():.3g}, outside "
                f"the range of {dtype}; use --dtype bf16"
            )
        scale = t.abs().max().double().item()
        if scale > 0:
            worst = max(worst, (new.double() - t.double()).abs().max().item() / scale)
        tensors[key] = new
    before = view.file_bytes
    out = write_result(output, view.raw_config, tensors, view.fingerprint, overwrite)
    return ConvertReport(before, dir_bytes(out), worst)
