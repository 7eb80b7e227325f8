"""combine: a weighted sum of adapters, ΔW_C = Σᵢ wᵢ·ΔWᵢ, written as one PEFT-format adapter.

Methods (per module; a module missing from an input contributes 0 there):
- "cat": exact. A_C stacks the inputs' A, B_C puts their B side by side, each wᵢ·sᵢ applied once
  (`functional.concat_factors`): rank Σ rᵢ, mixed ranks, negative weights, rsLoRA and per-module
  alpha / rank all hold exactly, unlike PEFT's add_weighted_adapter (#3004, #3761).
- "svd": the best rank-K approximation of that exact sum (Eckart–Young), via `functional.delta_svd`.
- "linear": A_C = Σ ±√|cᵢ|·Aᵢ, B_C = Σ √|cᵢ|·Bᵢ (cᵢ = wᵢ·sᵢ), equal ranks only. Approximate: B_C A_C is the
  sum plus cross terms Bᵢ Aⱼ; the relative error per module is measured and reported.
- "ties", "dare_linear", "dare_ties", "magnitude_prune": element-wise merges of the full ΔWᵢ with `density`
  (formulas in `tools/task_arithmetic.py`), then the best rank-K factors of the result (K = `rank`, default
  the largest input rank); PEFT's `add_weighted_adapter` `*_svd` combination types. The reported error is
  the rank-K truncation's, against the merged ΔW.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .. import functional as LF
from . import task_arithmetic
from .adapter_file import (
    TARGET_KEYS,
    AdapterView,
    ModuleLora,
    build_config,
    check_output,
    module_tensors,
    open_adapter,
    write_result,
)
from .inspect import natural_key

METHODS = ("cat", "svd", "linear", *task_arithmetic.METHODS)


@dataclass
class ModuleCombine:
    """One module of the result: its rank and ‖ΔW_C - Σ wᵢΔWᵢ‖_F / ‖Σ wᵢΔWᵢ‖_F, measured on the written
    (rounded) factors."""

    name: str
    rank: int
    rel_error: float


@dataclass
class CombineReport:
    modules: list[ModuleCombine]
    notes: list[str]


def combine(
    srcs: list[str | os.PathLike],
    output: str | os.PathLike,
    weights: list[float] | None = None,
    method: str = "cat",
    rank: int | None = None,
    force: bool = False,
    overwrite: bool = False,
    density: float = 0.5,
    majority_sign: str = "total",
    seed: int = 0,
) -> CombineReport:
    """Write the adapter whose ΔW is Σᵢ weights[i]·ΔWᵢ (exactly for "cat") to `output`.

    Args:
        srcs: adapter directories (at least one). weights: one per input, any sign (default 1.0 each).
        method: "cat", "svd" (needs `rank`) or "linear" (equal ranks).
        force: combine adapters whose base fingerprints differ (the output then carries none).
        density / majority_sign / seed: of the task-arithmetic methods (ties, dare_*, magnitude_prune): the
            fraction of entries kept, TIES's sign election ("total" or "frequency"), DARE's seed.
    Returns:
        CombineReport: one ModuleCombine per module of the union (name order) and notes for the user.
    Raises:
        AdapterFileError: an input missing or malformed. ValueError: bad arguments; DoRA inputs (a sum of
            DoRA updates is no DoRA update); inputs carrying full weights (modules_to_save, trainable
            tokens, biases: combining them needs the base); a module whose shape differs between inputs;
            different fingerprints over the same modules without `force`; `output` an input or an existing adapter. Nothing is
            written on any error.
    """
    weights = _checked_args(srcs, weights, method, rank)
    task = method in task_arithmetic.METHODS
    views = [open_adapter(s) for s in srcs]
    check_output(output, [v.path for v in views], overwrite)
    _check_combinable(views)
    notes: list[str] = []
    fingerprint = _fingerprint(views, force, notes)

    names = sorted({n for v in views for n in v.modules}, key=natural_key)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    report = []
    if task:
        K = rank or max(m.r for v in views for m in v.modules.values())
        with torch.random.fork_rng(devices=[]):  # DARE's masks: seeded, without touching the caller's RNG
            torch.manual_seed(seed)
            for name in names:
                present = [(v.modules[name], w) for v, w in zip(views, weights) if name in v.modules]
                A, B, err = _task_merge(present, method, K, density, majority_sign)
                tensors.update(module_tensors(present[0][0], A, B, _dtype(m for m, _ in present)))
                ranks[name] = A.shape[0]
                report.append(ModuleCombine(name, A.shape[0], err))
    for name in names if not task else []:
        present = [(v.modules[name], w) for v, w in zip(views, weights) if name in v.modules]
        A, B, err = _exact_merge(name, present, method, rank)
        tensors.update(module_tensors(present[0][0], A, B, _dtype(m for m, _ in present)))
        ranks[name] = A.shape[0]
        report.append(ModuleCombine(name, A.shape[0], err))

    same = all(set(v.modules) == set(names) for v in views) and all(
        all(v.raw_config.get(k) == views[0].raw_config.get(k) for k in TARGET_KEYS) for v in views
    )
    config = build_config(views[0].raw_config, ranks, same_modules=same)
    bases = {v.raw_config.get("base_model_name_or_path") for v in views}
    config["base_model_name_or_path"] = bases.pop() if len(bases) == 1 else None
    write_result(output, config, tensors, fingerprint, overwrite)
    return CombineReport(report, notes)


def _checked_args(srcs: list, weights: list[float] | None, method: str, rank: int | None) -> list[float]:
    """The weights (one float per input); raises ValueError naming the argument that is wrong."""
    if not srcs:
        raise ValueError("combine: give at least one adapter directory")
    weights = [1.0] * len(srcs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(srcs):
        raise ValueError(
            f"combine: {len(weights)} weights for {len(srcs)} adapters; give one weight per adapter"
        )
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"combine: weights must be finite numbers, got {weights}")
    if method not in METHODS:
        raise ValueError(f"combine: --method {method!r} is invalid: expected one of {METHODS}")
    if method == "svd" and (not isinstance(rank, int) or rank <= 0):
        raise ValueError("combine: --method svd needs --rank K (a positive integer)")
    task = method in task_arithmetic.METHODS
    if method not in ("svd",) and not task and rank is not None:
        raise ValueError(
            f"combine: --rank applies to --method svd and the task-arithmetic methods only (method {method!r} "
            "sets the rank itself)"
        )
    if task and rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"combine: --rank {rank!r} is invalid: expected a positive integer")
    return weights


def _exact_merge(name: str, present: list, method: str, rank: int | None) -> tuple[Tensor, Tensor, float]:
    """(A, B, relative error) of one module for "cat", "svd" or "linear"; `present` pairs (module, weight)."""
    terms = [(m.A.double(), m.B.double(), w * m.scale) for m, w in present]
    exact_A, exact_B = LF.concat_factors(terms)
    if method == "cat":
        A, B = exact_A, exact_B
    elif method == "svd":
        U, S, Vh = LF.delta_svd(exact_A, exact_B, 1.0)
        A, B = LF.svd_factors(U, S, Vh, rank)
    else:
        A, B = _linear(name, present, terms)
    dtype = _dtype(m for m, _ in present)
    return A, B, _rel_error(A.to(dtype), B.to(dtype), exact_A, exact_B)


def _check_combinable(views: list[AdapterView]) -> None:
    for v in views:
        if v.config.use_dora:
            raise ValueError(
                f"combine: {v.path} is a DoRA adapter; a weighted sum of DoRA updates is not a DoRA update (each "
                "rescales W + ΔWᵢ by its own magnitude / ‖W + ΔWᵢ‖, which needs the base weights), so no exact "
                "combination exists; merge the adapters into the base model instead (lorakit merge)"
            )
        if v.other:
            shown = ", ".join(sorted(v.other)[:3]) + (", ..." if len(v.other) > 3 else "")
            raise ValueError(
                f"combine: {v.path} carries full weights besides LoRA (modules_to_save, trainable tokens or "
                f"biases: {shown}); a weighted sum of full weights needs the base model, so combine refuses "
                "them; combine adapters without them"
            )
    fan = {bool(v.raw_config.get("fan_in_fan_out", False)) for v in views}
    if len(fan) > 1:
        raise ValueError(
            "combine: the inputs disagree on fan_in_fan_out (adapters of different architectures)"
        )
    shapes: dict[str, tuple[ModuleLora, Path]] = {}
    for v in views:
        for name, m in v.modules.items():
            if name not in shapes:
                shapes[name] = (m, v.path)
                continue
            ref, where = shapes[name]
            if (m.shape, m.a_shape[1:], m.embedding) != (ref.shape, ref.a_shape[1:], ref.embedding):
                raise ValueError(
                    f"combine: module {name!r} has ΔW of shape {m.a_shape[1:]}→{m.shape[0]} in {v.path} but "
                    f"{ref.a_shape[1:]}→{ref.shape[0]} in {where}: adapters of different base models"
                )


def _fingerprint(views: list[AdapterView], force: bool, notes: list[str]) -> str | None:
    """The output's base fingerprint: the inputs' when all carry the same one over the same modules.

    A fingerprint hashes the base weights of an adapter's target modules, so two are comparable only for
    the same module set: there, different values mean different bases (an error without `force`).
    """
    same_modules = all(set(v.modules) == set(views[0].modules) for v in views)
    found = {v.fingerprint for v in views if v.fingerprint}
    if same_modules and len(found) > 1:
        listed = "; ".join(f"{v.path}: {(v.fingerprint or 'none')[:12]}" for v in views)
        if not force:
            raise ValueError(
                f"combine: the inputs were trained on different base weights (base fingerprints {listed}); "
                "pass --force to combine them anyway (the output then carries no fingerprint)"
            )
        notes.append(f"--force: the base fingerprints differ ({listed}); the output carries none")
        return None
    if len(found) == 1 and same_modules and all(v.fingerprint for v in views):
        return found.pop()
    if found:
        why = "they adapt different modules" if not same_modules else "some inputs carry none"
        notes.append(f"base fingerprints not comparable ({why}): the output carries none")
    return None


def _linear(name: str, present: list[tuple[ModuleLora, float]], terms) -> tuple[Tensor, Tensor]:
    ranks = {m.r for m, _ in present}
    if len(ranks) > 1:
        raise ValueError(
            f"combine: --method linear needs equal ranks, module {name!r} has ranks {sorted(ranks)}; "
            "use --method cat (exact) or svd"
        )
    # PEFT's linear combination: each term's coefficient split over its A (signed) and B (functional.py)
    splits = [LF.split_coefficient(c) for _, _, c in terms]
    A = sum(a * signed for (a, _, _), (_, signed) in zip(terms, splits))
    B = sum(b * root for (_, b, _), (root, _) in zip(terms, splits))
    return A, B


def _task_merge(present, method: str, rank: int, density: float, sign_method: str):
    """(A, B, relative error) of the rank-`rank` factors of one module's task-arithmetic merge."""
    deltas = [LF.delta_weight(m.A.double(), m.B.double(), m.scale) for m, _ in present]
    merged = task_arithmetic.merge_deltas(deltas, [w for _, w in present], method, density, sign_method)
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
    A, B = LF.svd_factors(U, S, Vh, rank)
    dtype = _dtype(m for m, _ in present)
    ref = merged.norm()
    diff = (B.to(dtype).double() @ A.to(dtype).double() - merged).norm()
    return A, B, float(diff / ref) if ref > 0 else (0.0 if diff == 0 else math.inf)


def _dtype(modules) -> torch.dtype:
    dtype = None
    for m in modules:
        dtype = m.A.dtype if dtype is None else torch.promote_types(dtype, m.A.dtype)
    return dtype


def _rel_error(A: Tensor, B: Tensor, exact_A: Tensor, exact_B: Tensor) -> float:
    ref = LF.delta_norm(exact_A, exact_B, 1.0)
    dA, dB = LF.concat_factors([(A.double(), B.double(), 1.0), (exact_A, exact_B, -1.0)])
    diff = LF.delta_norm(dA, dB, 1.0)
    return diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
