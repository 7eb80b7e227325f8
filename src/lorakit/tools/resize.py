"""resize: every ΔW of an adapter replaced by its best rank-K approximation (truncated SVD, Eckart–Young)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import functional as LF
from .adapter_file import build_config, check_output, module_tensors, open_adapter, write_result


@dataclass
class ModuleResize:
    """One module: ranks before / after and ‖ΔW' - ΔW‖_F / ‖ΔW‖_F (= √(tail energy) by Eckart–Young)."""

    name: str
    rank_before: int
    rank_after: int
    rel_error: float


@dataclass
class ResizeReport:
    modules: list[ModuleResize]
    notes: list[str]


def energy_kept(S: Tensor) -> Tensor:
    """Share of ‖ΔW‖_F² kept by the best rank-k approximation, k = 1..len(S): cumsum(S²) / sum(S²).

    A zero ΔW keeps everything (1.0 at every rank)."""
    sq = S.double() ** 2
    total = sq.sum()
    if total == 0:
        return torch.ones_like(sq)
    return sq.cumsum(0) / total


def rank_for_energy(S: Tensor, energy: float) -> int:
    """The smallest k ≥ 1 whose best rank-k approximation keeps at least `energy` of ‖ΔW‖_F²."""
    kept = energy_kept(S)
    # A tolerance so that energy=1.0 does not ask for noise-level singular values.
    return int((kept < energy - 1e-12).sum().item()) + 1 if len(kept) else 1


def resize(
    src: str | os.PathLike,
    output: str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
    overwrite: bool = False,
) -> ResizeReport:
    """Write `src` to `output` with each ΔW = s·B·A replaced by its best rank-K approximation.

    Exactly one of `rank` (the same K everywhere, capped at each module's current rank) or `energy` (per
    module, the smallest K keeping that share of ‖ΔW‖_F²) is given. The output stores ΔW with scaling 1
    (see adapter_file); ranks that differ per module go to rank_pattern / alpha_pattern. Other tensors
    (modules_to_save, trainable tokens, biases) and the base fingerprint are kept. A DoRA adapter keeps its
    magnitude vectors: its direction update is truncated, the reported error is that of ΔW.

    Returns:
        ResizeReport: one ModuleResize per module (name order) and notes for the user.
    Raises:
        AdapterFileError: `src` missing or malformed. ValueError: bad rank / energy, or `output` holds an
            adapter and not `overwrite`. Nothing is written on any error.
    """
    if (rank is None) == (energy is None):
        raise ValueError("resize: give exactly one of --rank K or --energy FRACTION")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"resize: --rank {rank!r} is invalid: expected a positive integer")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"resize: --energy {energy!r} is invalid: expected a fraction in (0, 1]")
    view = open_adapter(src)
    check_output(output, [view.path], overwrite)
    tensors: dict[str, Tensor] = dict(view.other)
    ranks: dict[str, int] = {}
    report = []
    for name, m in view.modules.items():
        U, S, Vh = LF.delta_svd(m.A, m.B, m.scale)
        k = min(rank, len(S)) if rank is not None else rank_for_energy(S, energy)
        A, B = LF.svd_factors(U, S, Vh, k)
        tensors.update(module_tensors(m, A, B, m.A.dtype))
        ranks[name] = A.shape[0]
        kept = energy_kept(S)[k - 1].item()
        report.append(ModuleResize(name, m.r, A.shape[0], max(0.0, 1.0 - kept) ** 0.5))
    config = build_config(view.raw_config, ranks, same_modules=True)
    write_result(output, config, tensors, view.fingerprint, overwrite)
    notes = []
    capped = [r.name for r in report if rank is not None and r.rank_after < rank]
    if capped:
        notes.append(
            f"{len(capped)} modules keep a rank below {rank} (their ΔW has no more singular values), "
            "stored exactly"
        )
    if view.config.use_dora:
        notes.append(
            "DoRA: magnitude vectors kept as they are; the errors are those of the direction update ΔW"
        )
    return ResizeReport(report, notes)
