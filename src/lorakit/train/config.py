"""TrainConfig: every option of `lorakit train`, loaded from YAML with command-line overrides.

The resolved config is saved beside the adapter (`train_config.yaml`), so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..textfile import read_utf8

MODES = ("sft", "cpt", "dpo", "orpo", "kto", "grpo")
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
QUANTIZE = ("none", "4bit", "8bit")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "adafactor")
SCHEDULERS = ("cosine", "linear", "constant")
TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
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
        loss_chunk: compute the cross-entropy this many tokens at a time (never all logits at once), and only
            over the tokens that carry a loss (an SFT prompt's tokens never reach the output head); 0: all logits
            at once. Exact up to float rounding; where the head cannot be chunked exactly (logit soft-capping),
            the plain loss is used and a warning says so once.
        packing: pack each step's rows into sequences of up to max_len tokens, attention confined to each row
            (True: required, an error if the model cannot keep packed rows apart; None: when it can; False: pad).
        compile: torch.compile the model's transformer body for training.
        beta: dpo / orpo / kto: the preference strength β. loss_type: dpo: "sigmoid", "ipo" or "hinge".
        precompute_ref: dpo / kto: the reference log-probs computed once before training (adapter disabled).
        desirable_weight / undesirable_weight: kto: the weights of desirable / undesirable rows' losses.
        device: "auto" (this process's CUDA device when there is one, else CPU), "cpu", "cuda", "cuda:1", ...
        overwrite: replace a finished run in `output` (without it, an output holding an adapter is refused).
        report_to: experiment trackers, comma-separated (tensorboard, mlflow, wandb, trackio), all offline.
        chat_template: a Jinja template file or a shipped name (chatml, llama-3, ...) replacing the tokenizer's.
        truncate: SFT rows longer than max_len are cut to it (counted) instead of refused.
        optimizer: adamw, adamw8bit (bitsandbytes), sgd (momentum 0.9) or adafactor.
        scheduler: after warmup, cosine to 0, linear to 0, or constant.
        lora_plus_ratio: LoRA+: the B matrices train at lr x this ratio (None: off; 16 is the paper's).
        init: the adapter init (LoraConfig.init: default, gaussian, pissa, olora, loftq; see lorakit.inits;
            or eva: A from the training rows' layer inputs, see lorakit.train.eva_init).
        target_parameters: parameters to adapt besides `targets`, e.g. fused MoE experts
            "mlp.experts.gate_up_proj,mlp.experts.down_proj" (lorakit.param_lora).
        distributed: under torchrun, "ddp" (DistributedDataParallel, every process holds the model) or
            "fsdp" (FSDP2: the base sharded across processes; without torchrun, FSDP over one process).
        reward: grpo: reward specs (`lorakit.train.preference.rewards.load_rewards`): "exact", "exact:FIELD",
            "regex:PATTERN", "module:function" or "path/to/file.py:function"; their scores are summed.
        num_generations: grpo: completions sampled per prompt (the group; `batch_size` counts prompts).
        temperature / max_new_tokens: grpo: the rollouts' sampling temperature and length limit.
        grpo_iterations: grpo: μ, optimizer updates per rollout batch (TRL's num_iterations; one lorakit step).
        epsilon / epsilon_high: grpo: the ratio's clip range [1 - epsilon, 1 + epsilon_high] (None: epsilon).
        recompute_inputs: each LoRA layer rebuilds its input in backward from what the base keeps, where its
            producer is recognised (lorakit.fast.recompute); False: every layer saves its input (more memory,
            faster on some machines). Numerics are the same either way.
        offload_activations: what autograd keeps for backward goes to CPU memory during each micro-batch's
            forward and comes back in backward (lorakit.fast.offload, bit for bit); for accelerators:
            `lorakit train` refuses it on a CPU device (nothing to gain) and under FSDP.
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
    loss_chunk: int = 1024
    dtype: str | None = None
    packing: bool | None = None
    compile: bool = False
    beta: float = 0.1
    loss_type: str = "sigmoid"
    precompute_ref: bool = False
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # everyday-use options (issue 16): device, overwrite, tracking, chat template, optimizer and schedule
    device: str = "auto"
    overwrite: bool = False
    report_to: str | None = None
    chat_template: str | None = None
    truncate: bool = False
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    lora_plus_ratio: float | None = None
    init: str = "default"
    distributed: str = "ddp"
    target_parameters: str | list[str] | None = None
    # grpo (issue 13): reward functions and rollouts (beta is the KL weight; 0: no reference forward)
    reward: str | list[str] | None = None
    num_generations: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 64
    grpo_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    # memory for time (issue 11): LoRA inputs rebuilt in backward or saved; activations offloaded to CPU
    recompute_inputs: bool = True
    offload_activations: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the option and what was expected."""

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(
                f"--{name.replace('_', '-')}={getattr(self, name)!r} is invalid: expected {expected}"
            )

        _check_types(self, bad)
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
        if self.packing not in (None, True, False):
            raise bad("packing", "true, false or unset (pack when the model keeps packed rows apart)")
        if self.compile not in (True, False):
            raise bad("compile", "true or false")
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
        if self.loss_type not in LOSS_TYPES:
            raise bad("loss_type", f"one of {LOSS_TYPES}")
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0 and not (
                name == "beta" and self.mode == "grpo" and self.beta == 0
            ):
                raise bad(name, "a positive number" + (" or 0 (no KL term)" if self.mode == "grpo" else ""))
        self._validate_everyday(bad)
        self._validate_grpo(bad)

    def _validate_everyday(self, bad) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"one of {OPTIMIZERS}")
        if self.scheduler not in SCHEDULERS:
            raise bad("scheduler", f"one of {SCHEDULERS}")
        if self.lora_plus_ratio is not None and not (
            isinstance(self.lora_plus_ratio, int | float) and self.lora_plus_ratio > 0
        ):
            raise bad("lora_plus_ratio", "a positive number (the B matrices' lr multiplier)")
        unknown = [t for t in self.trackers() if t not in TRACKERS]
        if unknown:
            raise bad("report_to", f"a comma-separated list of {TRACKERS} (unknown: {unknown})")
        from ..config import INIT_METHODS

        if self.init not in (*INIT_METHODS, "eva"):  # eva: lorakit.train.eva_init (it needs the data)
            raise bad("init", f"one of {(*INIT_METHODS, 'eva')}")
        if self.init == "loftq" and self.quantize != "none":
            raise ValueError(
                "--init loftq replaces the full-precision base weights by NF4 values and fits the adapter to "
                "the quantization error, so it needs the unquantized base: drop --quantize (the trained adapter "
                "then belongs to the base quantized with --quantize 4bit, which reproduces those NF4 values)"
            )
        if not isinstance(self.device, str) or not self.device:
            raise bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")

    def _validate_grpo(self, bad) -> None:
        if self.reward is not None and not (
            isinstance(self.reward, str)
            or (isinstance(self.reward, list) and all(isinstance(r, str) for r in self.reward))
        ):
            raise bad("reward", "a reward spec or a list of them")
        for name, low in (("num_generations", 2), ("max_new_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(
                    name, f"an integer >= {low}" + (" (a group needs 2 to compare)" if low == 2 else "")
                )
        mu = self.grpo_iterations
        if isinstance(mu, bool) or not isinstance(mu, int) or mu < 1:
            raise bad("grpo_iterations", "an integer >= 1 (optimizer updates per rollout batch)")
        for name in ("epsilon", "epsilon_high"):
            e = getattr(self, name)
            if (name == "epsilon" or e is not None) and (
                isinstance(e, bool) or not isinstance(e, int | float) or not 0 < e < math.inf
            ):
                raise bad(name, "a finite number > 0 (the clip range of the ratio)")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 2:
            raise bad("temperature", "a number in (0, 2] (0 would sample every completion of a group alike)")
        if self.mode == "grpo" and not self.rewards():
            raise ValueError(
                "--mode grpo needs at least one --reward (e.g. --reward exact, --reward module:function)"
            )

    def rewards(self) -> list[str]:
        """The reward specs `reward` names, in order."""
        return [self.reward] if isinstance(self.reward, str) else list(self.reward or [])

    def trackers(self) -> list[str]:
        """The experiment trackers `report_to` names, in order ("none" / empty: none)."""
        names = self.report_to if isinstance(self.report_to, list) else str(self.report_to or "").split(",")
        return [t.strip() for t in names if t.strip() and t.strip() != "none"]

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


_INTS = ("rank", "batch_size", "grad_accum", "max_len", "eval_every", "save_every", "log_every", "seed",
         "loss_chunk", "steps")  # fmt: skip
_NUMBERS = ("alpha", "dropout", "epochs", "lr", "warmup", "weight_decay", "max_grad_norm")
_FLAGS = ("gradient_checkpointing", "resume", "train_embeddings", "skip_bad_rows")
_FLAGS += ("recompute_inputs", "offload_activations")
_STRINGS = ("model", "data", "eval_data", "output", "mode", "quantize", "new_tokens", "dtype")


def _check_types(cfg: TrainConfig, bad) -> None:
    """Each option's type before its range: booleans are not numbers, numbers are finite (a YAML `1e-4`
    is a string to YAML 1.1, and gets a message saying so)."""
    import math

    for name in _INTS:
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise bad(name, "an integer")
    if not 0 <= cfg.seed < 2**63:
        raise bad("seed", "an integer in [0, 2**63)")
    for name in _NUMBERS:
        value = getattr(cfg, name)
        if value is None:
            continue
        if isinstance(value, str):
            raise bad(name, "a number (YAML reads 1e-4 as a string: write 1.0e-4)")
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise bad(name, "a finite number")
    for name in _FLAGS:
        if not isinstance(getattr(cfg, name), bool):
            raise bad(name, "true or false")
    for name in _STRINGS:
        if getattr(cfg, name) is not None and not isinstance(getattr(cfg, name), str):
            raise bad(name, "a string")
    if not isinstance(cfg.targets, str) and not (
        isinstance(cfg.targets, list) and all(isinstance(t, str) for t in cfg.targets)
    ):
        raise bad("targets", "module names (a comma-separated string or a list) or a regex")


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
    text = read_utf8(path, "UTF-8 YAML")
    try:
        data = yaml.safe_load(text) or {}
    except RecursionError as err:
        raise ValueError(f"{path}: YAML nested too deeply; expected a mapping of options") from err
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
