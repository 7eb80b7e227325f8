"""inspect: what an adapter directory holds (base fingerprint, targets, rank / alpha per module, sizes) and,
with `spectrum=True`, the singular values of each ΔW = s·B·A and the rank that keeps a given energy share."""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any

from .. import functional as LF
from .adapter_file import open_adapter
from .consumers import consumer_report
from .plot import pyplot, save_figure
from .resize import energy_kept, rank_for_energy


def inspect_adapter(path: str | os.PathLike, spectrum: bool = False, energy: float = 0.9) -> dict[str, Any]:
    """A JSON-able summary of the adapter at `path`.

    Keys: path, base_model, fingerprint (None when the file has none), peft_type, target_modules (as the
    config gives them), use_rslora, use_dora, r, alpha, modules ({name: {rank, alpha, scale, shape (ΔW as
    (out, in·…)), params, kind}}), rank_counts, lora_params, total_params (every tensor of the file),
    file_bytes, dtypes, modules_to_save, trainable_token_indices, consumers ({peft, vllm, llama.cpp}:
    {loads, problems, notes}, tools.consumers). With `spectrum`: spectrum ({name:
    {singular_values, energy (share of ‖ΔW‖_F² kept at rank 1..r), rank_for_energy}}), energy and
    suggested_rank (the smallest rank keeping `energy` in every module).

    Raises:
        AdapterFileError: missing or malformed adapter. ValueError: energy outside (0, 1].
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"inspect: --energy {energy!r} is invalid: expected a fraction in (0, 1]")
    view = open_adapter(path)
    cfg = view.raw_config
    modules = {}
    for name, m in sorted(view.modules.items(), key=lambda item: natural_key(item[0])):
        kind = "embedding" if m.embedding else ("conv2d" if len(m.a_shape) == 4 else "linear")
        modules[name] = {
            "rank": m.r,
            "alpha": m.alpha,
            "scale": m.scale,
            "shape": list(m.shape),
            "params": m.A.numel() + m.B.numel() + (m.magnitude.numel() if m.magnitude is not None else 0),
            "kind": kind,
        }
    info: dict[str, Any] = {
        "path": str(view.path),
        "base_model": cfg.get("base_model_name_or_path"),
        "fingerprint": view.fingerprint,
        "peft_type": cfg.get("peft_type", "LORA"),
        "target_modules": cfg.get("target_modules"),
        "use_rslora": view.config.use_rslora,
        "use_dora": view.config.use_dora,
        "r": view.config.r,
        "alpha": view.config.alpha,
        "modules": modules,
        "rank_counts": {str(k): n for k, n in sorted(Counter(m.r for m in view.modules.values()).items())},
        "lora_params": sum(v["params"] for v in modules.values()),
        "total_params": sum(t.numel() for t in view.tensors.values()),
        "file_bytes": view.file_bytes,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in view.tensors.values()}),
        "modules_to_save": cfg.get("modules_to_save"),
        "trainable_token_indices": cfg.get("trainable_token_indices"),
        "consumers": consumer_report(view),
    }
    if spectrum:
        spec = {}
        for name in modules:
            m = view.modules[name]
            S = LF.delta_singular_values(m.A, m.B, m.scale)
            spec[name] = {
                "singular_values": [float(x) for x in S],
                "energy": [float(x) for x in energy_kept(S)],
                "rank_for_energy": rank_for_energy(S, energy),
            }
        info["spectrum"] = spec
        info["energy"] = energy
        info["suggested_rank"] = max(v["rank_for_energy"] for v in spec.values())
    return info


def natural_key(name: str) -> tuple:
    """Sort key reading digit runs as numbers: layers.2 before layers.10 (text order puts 10..19 first)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def format_info(info: dict[str, Any]) -> str:
    """The human-readable report `lorakit inspect` prints."""
    ranks = ", ".join(f"r={k}: {n}" for k, n in info["rank_counts"].items())
    lines = [
        f"adapter        {info['path']}",
        f"base model     {info['base_model'] or '(not recorded)'}",
        f"fingerprint    {info['fingerprint'] or '(none: not written by lorakit)'}",
        f"targets        {info['target_modules']}",
        f"modules        {len(info['modules'])} ({ranks})",
        f"r / alpha      {info['r']} / {info['alpha']:g}"
        + (" (rsLoRA)" if info["use_rslora"] else "")
        + (" (DoRA)" if info["use_dora"] else ""),
        f"parameters     {info['lora_params']:,} LoRA, {info['total_params']:,} in the file",
        f"file size      {info['file_bytes'] / 1e6:.2f} MB ({', '.join(info['dtypes'])})",
    ]
    if info["modules_to_save"]:
        lines.append(f"saved modules  {info['modules_to_save']}")
    if info["trainable_token_indices"]:
        lines.append(f"trained tokens {info['trainable_token_indices']}")
    lines += consumer_lines(info["consumers"])
    width = max(len(n) for n in info["modules"])
    lines.append("")
    header = f"{'module':<{width}}  rank  alpha   scale  {'ΔW shape':>11}"
    if "spectrum" in info:
        header += f"  kept@r/2  rank@{info['energy']:.0%}"
    lines.append(header)
    for name, m in info["modules"].items():
        row = f"{name:<{width}}  {m['rank']:>4}  {m['alpha']:>5g}  {m['scale']:>6.3g}  {'x'.join(map(str, m['shape'])):>11}"
        if "spectrum" in info:
            s = info["spectrum"][name]
            half = s["energy"][max(0, len(s["energy"]) // 2 - 1)]
            row += f"  {half:>8.1%}  {s['rank_for_energy']:>7}"
        lines.append(row)
    if "spectrum" in info:
        lines += [
            "",
            f"suggested rank {info['suggested_rank']} (the smallest keeping {info['energy']:.0%} of ‖ΔW‖² in every module)",
        ]
    return "\n".join(lines)


def consumer_lines(consumers: dict[str, Any]) -> list[str]:
    """One line per consumer (loads / does not load), then its reasons and notes indented."""
    lines = []
    for name, c in consumers.items():
        lines.append(f"{name + ':':<15}{'loads' if c['loads'] else 'does NOT load'}")
        lines += [f"{'':<15}- {p}" for p in c["problems"]] + [f"{'':<15}  {n}" for n in c["notes"]]
    return lines


def plot_spectrum(info: dict[str, Any], path: str | os.PathLike) -> None:
    """A PNG of the energy kept against rank: one thin line per module, the worst module in bold."""
    plt = pyplot()
    spec = info["spectrum"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    longest = max(len(s["energy"]) for s in spec.values())
    worst = [min(s["energy"][min(k, len(s["energy"]) - 1)] for s in spec.values()) for k in range(longest)]
    for s in spec.values():
        ax.plot(range(1, len(s["energy"]) + 1), s["energy"], color="tab:blue", alpha=0.25, lw=0.8)
    ax.plot(range(1, longest + 1), worst, color="black", lw=2, label="worst module")
    ax.axhline(info["energy"], color="tab:red", ls="--", lw=1, label=f"{info['energy']:.0%} energy")
    ax.axvline(info["suggested_rank"], color="tab:green", ls=":", lw=1.5,
               label=f"suggested rank {info['suggested_rank']}")  # fmt: skip
    ax.set_xlabel("rank k of the truncated ΔW")
    ax.set_ylabel("share of ‖ΔW‖²_F kept")
    ax.set_title(f"{len(spec)} modules of {os.path.basename(str(info['path']).rstrip('/'))}")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
