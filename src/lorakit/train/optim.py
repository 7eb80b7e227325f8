"""The optimizer and learning-rate schedule of a run: `--optimizer`, `--scheduler`, LoRA+ (`--lora-plus-ratio`).

    optimizer = build(params, cfg)                       # AdamW / AdamW8bit / SGD / Adafactor, param groups
    set_lr(optimizer, cfg.lr * lr_factor(step, total, warmup, cfg.scheduler))   # before each step

Optimizers (all with `cfg.weight_decay`):
- adamw: torch.optim.AdamW, betas (0.9, 0.999), eps 1e-8.
- adamw8bit: bitsandbytes' AdamW8bit (block-wise 8-bit moments for tensors of >= 4096 elements, fp32 below).
- sgd: torch.optim.SGD with momentum 0.9.
- adafactor: transformers' Adafactor with an absolute lr (scale_parameter=False, relative_step=False,
  warmup_init=False: the usual fine-tuning recipe). torch.optim.Adafactor scales each step by the parameter's
  RMS, so LoRA's B (zero at init) would barely move.

LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): the B matrices train at
lr x ratio, everything else at lr. Each param group carries `lr_scale` (1 or the ratio); `set_lr` multiplies
the scheduled lr by it, so the ratio holds at every step of the schedule.

Schedules, after a linear warmup of `warmup` steps ((step + 1) / warmup, so no step has lr 0), with
p = (step - warmup) / (total - warmup) in [0, 1): cosine 0.5 · (1 + cos(pi · p)), linear 1 - p, constant 1.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def is_lora_B(name: str) -> bool:
    """A LoRA B matrix: lorakit names them `<module>.lora.<adapter>.B`."""
    return name.endswith(".B") and ".lora." in f".{name}"


def param_groups(params: dict[str, torch.nn.Parameter], lora_plus_ratio: float | None) -> list[dict]:
    """One group (lr_scale 1), or with LoRA+ two: everything but the B matrices, then the B matrices
    (lr_scale = ratio). Raises ValueError when LoRA+ is asked for and there is no B matrix to scale."""
    if not lora_plus_ratio:
        return [{"params": list(params.values()), "lr_scale": 1.0}]
    b = [p for n, p in params.items() if is_lora_B(n)]
    rest = [p for n, p in params.items() if not is_lora_B(n)]
    if not b:
        raise ValueError("--lora-plus-ratio: the model has no trainable LoRA B matrices to give a higher lr")
    groups = [{"params": rest, "lr_scale": 1.0}] if rest else []
    return groups + [{"params": b, "lr_scale": float(lora_plus_ratio)}]


def build(params: dict[str, torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names over `params` (in param_groups' groups), at lr = cfg.lr.

    Raises:
        ImportError: adamw8bit without bitsandbytes.
    """
    groups = param_groups(params, cfg.lora_plus_ratio)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            groups, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False,
            weight_decay=cfg.weight_decay,
        )  # fmt: skip
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError(
                "--optimizer adamw8bit needs bitsandbytes: pip install 'lorakit[quant]'"
            ) from err
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    raise ValueError(f"--optimizer={cfg.optimizer!r} is invalid")  # TrainConfig.validate catches it first


def lr_factor(step: int, total: int, warmup: int, scheduler: str = "cosine") -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based); see the module docstring."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if scheduler == "linear":
        return 1.0 - p
    if scheduler == "constant":
        return 1.0
    raise ValueError(f"--scheduler={scheduler!r} is invalid: expected cosine, linear or constant")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr into every group, times the group's `lr_scale` (LoRA+)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def describe(cfg: TrainConfig) -> str:
    """The run line's tail for non-default choices ("" for AdamW + cosine without LoRA+)."""
    parts = [f"optimizer {cfg.optimizer}"] if cfg.optimizer != "adamw" else []
    parts += [f"{cfg.scheduler} schedule"] if cfg.scheduler != "cosine" else []
    parts += [f"LoRA+ (B at lr x {cfg.lora_plus_ratio:g})"] if cfg.lora_plus_ratio else []
    return "".join(f", {p}" for p in parts)


def after_restore(optimizer: torch.optim.Optimizer) -> None:
    """Put back the Python numbers a checkpoint stores as tensors: bitsandbytes and transformers' Adafactor
    keep `step` as an int (and Adafactor its `RMS` as a float); torch's optimizers keep tensors."""
    if type(optimizer).__module__.startswith("torch."):
        return
    for state in optimizer.state.values():
        for key, cast in (("step", int), ("RMS", float)):
            if torch.is_tensor(state.get(key)) and state[key].dim() == 0:
                state[key] = cast(state[key])
