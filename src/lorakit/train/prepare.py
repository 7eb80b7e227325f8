"""Model set-up for training: load (dtype / quantization), grow the vocabulary, add the adapter.

prepare(cfg) does, in order:
1. load the base model (`--dtype`, `--quantize 4bit|8bit` through bitsandbytes);
2. `--new-tokens FILE`: add the tokens to the tokenizer and grow the input embedding and output head
   deterministically (lorakit.vocab: new rows = mean of the old rows, so loading the adapter rebuilds the
   same model bit for bit);
3. build the LoraConfig: rank / alpha / dropout / targets, plus
   - `--train-embeddings` (CPT): the input embedding and the output head train in full (modules_to_save).
     A tied head is not copied twice: it follows the embedding's trained copy and stays tied; only the
     embedding copy is saved;
   - new tokens (without --train-embeddings): only the new rows train (trainable_token_indices), on the
     embedding and, when the head is untied, on the head's rows too;
4. k-bit preparation (QLoRA): half-precision non-quantized parameters (norms, embeddings, head) go to fp32,
   as PEFT's prepare_model_for_kbit_training does, so the small trained/accumulated parts are not fp16;
5. gradient checkpointing (use_reentrant=False) with input gradients enabled, then `add_adapter`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..adapters import add_adapter, trainable_parameters
from ..atomic import replace_files
from ..config import LoraConfig
from ..inject import head_is_tied, model_modules
from ..io import save_adapter
from ..models import load_model
from ..vocab import grow_embeddings, read_new_tokens, vocab_size_for
from .config import TrainConfig


@dataclass
class Prepared:
    """A model ready to train: the adapter "default" added and active, base weights frozen."""

    model: nn.Module
    tokenizer: object
    lora_config: LoraConfig
    new_token_ids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was done, one line each, for the run log
    chat_template: str | None = None  # the template text set by --chat-template (saved with the adapter)


def prepare(
    cfg: TrainConfig, model=None, tokenizer=None, device: str | torch.device | None = None
) -> Prepared:
    """Load `cfg.model` (or take `model`/`tokenizer` as given) and set it up for training as `cfg` asks.

    `device` is where the model is loaded (a quantized model is quantized there: move a quantized model
    with this, not with .to() afterwards); None: CPU. The adapter is created on the model's device.

    Raises:
        FileNotFoundError / ValueError: as load_model, read_new_tokens (naming FILE:LINE) and LoraConfig.
        ImportError: quantization without bitsandbytes.
    """
    notes: list[str] = []
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, quantize=cfg.quantize, device=device)
        notes.append(f"model {cfg.model}: {type(model).__name__}, quantize={cfg.quantize}")
    new_ids: list[int] = []
    if cfg.new_tokens:
        tokens = read_new_tokens(cfg.new_tokens, tokenizer)
        tokenizer.add_tokens(tokens)
        new_ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
        grown = grow_embeddings(model, vocab_size_for(model, tokenizer))
        notes.append(
            f"new tokens: {len(tokens)} from {cfg.new_tokens} (ids {new_ids[0]}..{new_ids[-1]}); embeddings "
            f"grown by {len(grown)} rows, each the mean of the old rows"
        )
    emb_name, head_name, tied = embedding_names(model)
    extra: dict = {}
    if cfg.train_embeddings:
        extra["modules_to_save"] = [emb_name] + ([head_name] if head_name and not tied else [])
        what = "tied to the output head (trained once, stays tied; saved once)" if tied else "and output head"
        notes.append(f"train embeddings: {emb_name} {what} train in full and are saved with the adapter")
        if new_ids:
            notes.append("new tokens train through the full embeddings (--train-embeddings)")
    elif new_ids:
        indices = {emb_name: new_ids}
        if head_name and not tied:
            indices[head_name] = new_ids
        extra["trainable_token_indices"] = indices
        notes.append(f"only the new rows of {', '.join(indices)} train (trainable_token_indices)")
    lora_config = LoraConfig(
        r=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        targets=parse_targets(cfg.targets),
        target_parameters=_split(cfg.target_parameters),
        base_model_name_or_path=str(cfg.model),
        init="default" if cfg.init == "eva" else cfg.init,  # eva: re-made once the data is loaded (eva_init)
        **extra,
    )
    if cfg.quantize != "none":
        notes.append(prepare_kbit(model))
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
        notes.append("gradient checkpointing on (use_reentrant=False, input grads enabled)")
    add_adapter(model, lora_config)
    notes.append(str(trainable_parameters(model)))
    return Prepared(model, tokenizer, lora_config, new_ids, notes)


def save_prepared(prepared: Prepared, output_dir: str | os.PathLike) -> Path:
    """Save adapter "default" (PEFT format) into `output_dir`, plus the tokenizer when the vocabulary grew
    (load_model(adapter=output_dir) then grows the base the same way), plus `chat_template.jinja` when the run
    replaced the template (`--chat-template`), all in one all-or-nothing save."""
    from ..data.templates import SAVED_NAME

    def extra(stage: Path) -> None:
        if prepared.new_token_ids:  # the tokenizer files carry its template (SAVED_NAME) themselves
            prepared.tokenizer.save_pretrained(str(stage))
        elif prepared.chat_template is not None:
            (stage / SAVED_NAME).write_text(prepared.chat_template)

    out = save_adapter(prepared.model, output_dir, extra=extra)
    if not prepared.new_token_ids and prepared.chat_template is None:
        (out / SAVED_NAME).unlink(missing_ok=True)  # an overwritten run's template is not this run's
    return out


def use_chat_template(prepared: Prepared, spec: str | None) -> None:
    """`--chat-template FILE|NAME`: replace the tokenizer's template (kept in `prepared` to be saved)."""
    if spec is not None:
        from ..data.templates import set_chat_template

        prepared.chat_template = set_chat_template(prepared.tokenizer, spec)
        prepared.notes.append(f"chat template: {spec}")


def check_output(cfg: TrainConfig) -> None:
    """Refuse to train into an output directory holding a finished run, unless `cfg.overwrite`.

    A finished run is one with an adapter file in `cfg.output`. (--resume of a finished run is answered by
    the checkpoint logic; an unfinished run's checkpoint is refused there without --resume.)

    Raises:
        FileExistsError: naming the directory and the two ways on.
    """
    from ..io.files import WEIGHTS_NAME

    out = Path(cfg.output)
    if cfg.overwrite or cfg.resume or not (out / WEIGHTS_NAME).is_file():
        return
    raise FileExistsError(
        f"{out} holds a finished run ({WEIGHTS_NAME}); pass --overwrite to replace it, or choose another --output"
    )


def save_tokenizer(tokenizer, output_dir: str | os.PathLike) -> None:
    """tokenizer.save_pretrained into `output_dir`, its files replaced all together (atomic.replace_files)."""
    replace_files(output_dir, lambda stage: tokenizer.save_pretrained(str(stage)))


def embedding_names(model: nn.Module) -> tuple[str, str | None, bool]:
    """(input embedding module name, output head name or None, whether the head shares its weight)."""
    emb = model.get_input_embeddings()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = {id(m): n for n, m in model_modules(model)}
    if id(emb) not in names:
        raise ValueError("the model's input embedding is not one of its modules")
    head_name = names.get(id(head)) if head is not None else None
    tied = head is not None and head_is_tied(model)
    return names[id(emb)], head_name, tied


def parse_targets(targets: str | list[str]) -> str | list[str]:
    """--targets: "all-linear", a comma-separated list of module names ("q_proj,v_proj"), or a regex."""
    if isinstance(targets, list) or targets == "all-linear":
        return targets
    if re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", targets.strip()):
        return [t.strip() for t in targets.split(",")]
    return targets


def _split(names: str | list[str] | None) -> list[str] | None:
    """--target-parameters: comma-separated parameter names (or a YAML list); None or "" for none."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return list(names) if names else None


def prepare_kbit(model: nn.Module) -> str:
    """QLoRA preparation: base frozen; fp16/bf16 parameters that are not quantized (norms, embeddings, head)
    go to fp32 so their outputs (and the gradients flowing through them) keep full precision."""
    cast = 0
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ not in (
            "Params4bit",
            "Int8Params",
        ):
            p.data = p.data.float()
            cast += p.numel()
    return f"k-bit preparation: {cast:,} half-precision non-quantized parameters cast to fp32"


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (use_reentrant=False). Input embeddings output requires grad, so
    LoRA layers inside checkpointed blocks get gradients even when the embedding itself is frozen."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name for it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
