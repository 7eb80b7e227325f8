"""TrainConfig: every option of `lorakit train`, loaded from YAML with command-line overrides.

The resolved config is saved beside the adapter (`train_config.yaml`), so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("sft", "cpt")
QUANTIZE = ("none", "4bit", "8bit")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Options of one training run. Field names are the CLI flags with '-' as '_'.

    Args:
        model: "default" (the embedded SmolLM2-135M-Instruct), a local HF model directory or a .gguf file.
        data / eval_data: JSONL, CSV or Parquet files; `data=None` trains on the embedded demo dataset.
        output: the adapter directory (checkpoints, metrics and the resolved config go inside it).
        mode: "sft" (chat or prompt/completion rows, loss on answers only) or "cpt" (raw text, packed).
        rank / alpha / dropout / targets: the LoRA config (alpha None: 2·rank).
        steps / epochs: training length; at most one of them is set (neither: one epoch).
        lr, warmup (fraction of the steps), weight_decay, max_grad_norm: AdamW with warmup + cosine decay.
        batch_size, grad_accum: micro-batch rows and how many micro-batches make one optimizer step.
        max_len: tokens per row (SFT) or per packed block (CPT).
        eval_every / save_every: steps between evaluations / checkpoints (0: only at the end).
        log_every: steps between progress lines when stderr is not a terminal (and metrics.jsonl records).
        quantize: "none", "4bit" (NF4, QLoRA) or "8bit" base weights (bitsandbytes).
        train_embeddings: CPT: input embeddings and output head train in full and are saved.
        new_tokens: a text file, one new token per line: tokenizer and embeddings grow, only new rows train.
        skip_bad_rows: skip (and count) malformed rows instead of stopping at the first one.
        loss_chunk: compute the cross-entropy this many tokens at a time (never all logits at once); 0: off.
        target_parameters: parameters to adapt besides `targets`, e.g. fused MoE experts
            "mlp.experts.gate_up_proj,mlp.experts.down_proj" (lorakit.param_lora).
        distributed: under torchrun, "ddp" (DistributedDataParallel, every process holds the model) or
            "fsdp" (FSDP2: the base sharded across processes; without torchrun, FSDP over one process).
    """

    model: str = "default"
    data: str | None = None
    eval_data: str | None = None
    output: str = "runs/lorakit"
    mode: str = "sft"
    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int = 512
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    quantize: str = "none"
    gradient_checkpointing: bool = False
    seed: int = 0
    resume: bool = False
    train_embeddings: bool = False
    new_tokens: str | None = None
    skip_bad_rows: bool = False
    loss_chunk: int = 0
    dtype: str | None = None
    distributed: str = "ddp"
    target_parameters: str | list[str] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the option and what was expected."""

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(
                f"--{name.replace('_', '-')}={getattr(self, name)!r} is invalid: expected {expected}"
            )

        if self.mode not in MODES:
            raise bad("mode", f"one of {MODES}")
        if self.quantize not in QUANTIZE:
            raise bad("quantize", f"one of {QUANTIZE}")
        if self.distributed not in DISTRIBUTED:
            raise bad("distributed", f"one of {DISTRIBUTED}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise bad("rank", "a positive integer")
        for name in ("batch_size", "grad_accum", "max_len", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, "a positive integer")
        for name in ("eval_every", "save_every", "loss_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "an integer >= 0")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("--steps and --epochs are exclusive: give one of them")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps <= 0):
            raise bad("steps", "a positive integer")
        if self.epochs is not None and not self.epochs > 0:
            raise bad("epochs", "a positive number")
        if not self.lr > 0:
            raise bad("lr", "a positive number")
        if not 0.0 <= self.warmup < 1.0:
            raise bad("warmup", "a fraction of the steps in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "a probability in [0, 1)")
        if not self.max_grad_norm >= 0:
            raise bad("max_grad_norm", "a number >= 0 (0: no clipping)")
        if not self.weight_decay >= 0:
            raise bad("weight_decay", "a number >= 0")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Options from a YAML mapping, then `overrides` (None values are ignored: flags not given).

        Raises:
            ValueError: naming the file and the unknown option or bad value.
            FileNotFoundError: no such file.
        """
        return cls.resolve(path, overrides)

    @classmethod
    def resolve(
        cls,
        path: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> TrainConfig:
        """`defaults`, then the YAML file at `path` (if any), then `overrides` (None values ignored).

        Raises:
            ValueError: an unknown option or bad value, naming the file when it came from one.
            FileNotFoundError: `path` does not exist.
        """
        data = dict(defaults or {})
        data.update(read_yaml(path) if path is not None else {})
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}" if path is not None else str(err)) from err

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (atomically)."""
        import yaml

        from ..atomic import write_text

        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The options in a YAML config file ('-' in names read as '_').

    Raises:
        FileNotFoundError: no such file.
        ValueError: not YAML, not a mapping, or unknown option names; the message names the file.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(
            str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x
        )
        raise ValueError(f"{where}: not valid YAML: {problem or err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}; known: {sorted(known)}")
    return data
