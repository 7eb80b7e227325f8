"""The validation half of load_adapter: every tensor of an adapter file assigned to its module and slot, checked
against the model and the config before anything is touched (io/load.py then injects the `Plan`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from .. import param_lora
from ..adapters import token_plan
from ..config import LoraConfig
from ..inject import find_modules, find_targets, model_modules, tied_heads
from ..variants import variant_for
from . import keys
from .files import CONFIG_NAME, AdapterFileError, AdapterFiles


@dataclass
class Plan:
    """Every tensor of the file, assigned to the module and slot it goes to (validated)."""

    lora: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module -> {"A", "B", "magnitude"}
    tokens: dict[str, tuple[list[int], Tensor]] = field(default_factory=dict)
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module -> its state dict
    biases: dict[str, Tensor] = field(default_factory=dict)
    base_weights: dict[str, Tensor] = field(default_factory=dict)
    params: dict[str, dict[str, Tensor]] = field(
        default_factory=dict
    )  # param_lora: "<module>.<param>" -> A, B


def validate(model: nn.Module, files: AdapterFiles, config: LoraConfig) -> Plan:
    """Every tensor of `files` assigned to its module and slot, each checked against the model and config.

    Raises AdapterFileError naming the file (and module / key) at the first problem.
    """
    check = _Checker(model, files, config)
    for k, t in files.tensors.items():
        if not t.is_floating_point():
            raise check.fail(f"tensor {k!r} has dtype {t.dtype}; adapter tensors must be floating point")
    # LoRA on parameters (fused MoE experts, target_parameters) first: what is left are module tensors.
    check.plan.params, tensors, why = param_lora.split_file_tensors(model, config, files.tensors)
    if why:
        raise check.fail(why)
    check.same_architecture(tensors)
    for k, t in tensors.items():
        check.assign(k, t)
    check.lora()
    check.tokens()
    check.saved()
    check.biases_and_base_weights()
    return check.plan


class _Checker:
    """The steps of `validate`, sharing the file, the model's modules and the plan being filled."""

    def __init__(self, model: nn.Module, files: AdapterFiles, config: LoraConfig) -> None:
        self.model, self.files, self.config = model, files, config
        self.config_file = files.path / CONFIG_NAME
        self.modules = dict(model_modules(model))
        try:
            self.saved_names = _saved_modules(model, config.modules_to_save or [])
            self.token_plan = token_plan(model, config)
        except ValueError as err:
            raise AdapterFileError(f"{self.config_file}: {err}") from err
        # Output heads tied to a saved embedding follow its copy; PEFT (ensure_weight_tying) also writes them.
        self.tied_heads = {
            h: n for n in self.saved_names for h in _tied_saved_heads(model, n, self.saved_names)
        }
        self.tied_found: dict[str, dict[str, Tensor]] = {}
        self.plan = Plan()

    def fail(self, msg: str) -> AdapterFileError:
        return AdapterFileError(f"{self.files.weights_path}: {msg}")

    def same_architecture(self, tensors: dict[str, Tensor]) -> None:
        """Modules the file names that this model lacks: one summary, not one error per key (an adapter of
        another architecture names hundreds)."""
        parsed = (keys.parse(k) for k in tensors)
        unknown = sorted({p[0] for p in parsed if p is not None and p[0] not in self.modules})
        if unknown:
            raise self.fail(
                f"this adapter was made for a different base model ({len(unknown)} of its modules are missing "
                f"from this model, e.g. {_examples(unknown)})"
            )

    def assign(self, k: str, t: Tensor) -> None:
        """Put tensor `k` in its slot of the plan, or raise for a key that fits none."""
        parsed = keys.parse(k)
        if parsed is not None and parsed[0] not in self.modules:
            raise self.fail(f"key {k!r} names module {parsed[0]!r}, which this model does not have")
        module, kind = parsed if parsed is not None else (None, None)
        if kind in ("A", "B", "magnitude"):
            self.plan.lora.setdefault(module, {})[kind] = t
        elif kind == "tokens":
            if module not in self.token_plan:
                raise self.fail(f"unexpected key {k!r}: trainable_token_indices does not name {module!r}")
            self.plan.tokens[module] = (self.token_plan[module], t)
        elif kind == "lora_bias":
            raise self.fail(f"key {k!r}: LoRA biases (lora_bias=True) are not supported")
        elif kind == "bias" and self.config.bias != "none":
            self.plan.biases[module] = t
        elif kind == "base_weight":
            self.plan.base_weights[module] = t
        else:
            self._assign_full(k, t)

    def _assign_full(self, k: str, t: Tensor) -> None:
        """A full tensor: of a modules_to_save copy, of a head tied to one, or a bias (bias="all")."""
        owner = _saved_owner(k, self.saved_names)
        tied_owner = _saved_owner(k, list(self.tied_heads))
        module = k[len(keys.PREFIX) : -len(".bias")] if k.startswith(keys.PREFIX) else None
        if owner is not None:
            self.plan.saved.setdefault(owner, {})[k[len(keys.PREFIX) + len(owner) + 1 :]] = t
        elif tied_owner is not None:
            self.tied_found.setdefault(tied_owner, {})[k[len(keys.PREFIX) + len(tied_owner) + 1 :]] = t
        elif self.config.bias == "all" and k.endswith(".bias") and module in self.modules:
            self.plan.biases[module] = t
        else:
            raise self.fail(
                f"unexpected key {k!r}: not a LoRA, trainable-token, modules_to_save or bias tensor"
            )

    def lora(self) -> None:
        """The modules with LoRA tensors are exactly the ones the config targets, each complete and in shape
        (the tensors the config's variant carries: variants.py `file_kinds`)."""
        try:
            expected = find_targets(self.model, self.config) if self.config.targets else []
        except ValueError as err:
            raise AdapterFileError(f"{self.config_file}: {err}") from err
        missing = [n for n in expected if n not in self.plan.lora]
        if missing:
            raise self.fail(
                f"no LoRA tensors for {len(missing)} modules that target_modules in {CONFIG_NAME} selects on "
                f"this model (e.g. {_examples(missing)}): was it made for a different base model?"
            )
        extra = [n for n in self.plan.lora if n not in expected]
        if extra:
            raise self.fail(
                f"unexpected LoRA tensors for modules {extra}: target_modules in {CONFIG_NAME} does not select them"
            )
        variant = variant_for(self.config.use_dora)
        for n, found in self.plan.lora.items():
            self._lora_module(n, found, variant)

    def _lora_module(self, n: str, found: dict[str, Tensor], variant) -> None:
        module, r = self.modules[n], self.config.rank_for(n)
        try:
            shapes = keys.lora_shapes(module, r)
        except TypeError as err:
            raise self.fail(f"module {n!r}: {err}") from err
        wanted = variant.file_kinds
        if any(kind not in shapes for kind in wanted):
            raise self.fail(
                f"module {n!r}: {variant.kind} needs a Linear or Conv1D, not a {type(module).__name__}"
            )
        for kind in wanted:
            if kind not in found:
                raise self.fail(f"missing key {keys.key(n, kind, module)!r} for module {n!r}")
        for kind, t in found.items():
            if kind not in wanted:
                raise self.fail(
                    f"unexpected key {keys.key(n, kind, module)!r}: use_dora is false in {CONFIG_NAME}"
                )
            if tuple(t.shape) != shapes[kind]:
                raise self.fail(
                    f"module {n!r}: {keys.key(n, kind, module)!r} has shape {tuple(t.shape)}, expected "
                    f"{shapes[kind]} (rank {r} on a {type(module).__name__})"
                )

    def tokens(self) -> None:
        for n, ids in self.token_plan.items():
            if n not in self.plan.tokens:
                raise self.fail(f"missing key {keys.key(n, 'tokens')!r} for trainable tokens of module {n!r}")
            emb = self.modules[n]
            # An Embedding's rows are (num, dim); an untied output Linear's rows are (out, in).
            rows, dim = (
                (emb.num_embeddings, emb.embedding_dim)
                if isinstance(emb, nn.Embedding)
                else (emb.out_features, emb.in_features)
            )
            bad = [i for i in ids if not 0 <= i < rows]
            if bad:
                new = ""
                if all(i >= rows for i in bad):  # trained with new tokens, on a grown vocabulary
                    new = (
                        f": new tokens beyond this model's vocabulary of {rows}; load it onto the base grown "
                        "to the adapter's tokenizer (load_model(..., adapter=DIR) grows it)"
                    )
                raise AdapterFileError(
                    f"{self.config_file}: trainable_token_indices {bad} are outside {n!r} (0..{rows - 1}){new}"
                )
            shape = tuple(self.plan.tokens[n][1].shape)
            if shape != (len(ids), dim):
                raise self.fail(
                    f"module {n!r}: trainable tokens have shape {shape}, expected {(len(ids), dim)}"
                )

    def saved(self) -> None:
        for n in self.saved_names:
            base = _own_state(self.modules[n])
            found = self.plan.saved.get(n, {})
            if sorted(found) != sorted(base):
                lost = sorted(set(base) - set(found))
                extra = sorted(set(found) - set(base))
                raise self.fail(f"modules_to_save {n!r}: missing tensors {lost}, unexpected tensors {extra}")
            for k, t in found.items():
                if t.shape != base[k].shape:
                    raise self.fail(
                        f"modules_to_save {n!r}: {k!r} has shape {tuple(t.shape)}, expected {tuple(base[k].shape)}"
                    )
        for head, found in self.tied_found.items():
            weight = self.plan.saved.get(self.tied_heads[head], {}).get("weight")
            extra = sorted(set(found) - {"weight"})
            if extra or weight is None or not torch.equal(found["weight"], weight):
                raise self.fail(
                    f"modules_to_save: {head!r} is tied to {self.tied_heads[head]!r}, but the file's "
                    f"{keys.PREFIX}{head}.weight differs from it (or carries {extra})"
                )

    def biases_and_base_weights(self) -> None:
        for n, t in self.plan.biases.items():
            bias = self.modules[n]._parameters.get("bias")
            if bias is None or bias.shape != t.shape:
                want = "no bias" if bias is None else f"shape {tuple(bias.shape)}"
                raise self.fail(
                    f"module {n!r}: bias of shape {tuple(t.shape)} in the file, the module has {want}"
                )
        for n, t in self.plan.base_weights.items():
            # PEFT saves an adapted embedding's own weight (save_embedding_layers); it must be the model's.
            w = getattr(self.modules[n], "weight", None)
            if w is None or w.shape != t.shape or not torch.equal(t.to(w.dtype), w.detach()):
                raise self.fail(
                    f"module {n!r}: the file carries a base weight ({keys.PREFIX}{n}.base_layer.weight) that "
                    "differs from the model's; resize / restore the base embedding it was trained with first"
                )


def _saved_modules(model: nn.Module, specs: list[str]) -> list[str]:
    """The modules `modules_to_save` names. Entries naming no module are skipped, as PEFT does: its configs
    for a task list every usual head name ("classifier", "score"), and a model has only one of them. A file
    tensor for a module that is not there is still refused (as an unexpected key)."""
    names = {n for n, _ in model_modules(model)}
    present = [s for s in specs if any(n == s or n.endswith("." + s) for n in names)]
    return find_modules(model, present, "modules_to_save") if present else []


def _tied_saved_heads(model: nn.Module, path: str, saved_names: list[str]) -> list[str]:
    """The output Linears tied to saved Embedding `path` (not saved themselves), as adapters._tie_saved_heads."""
    if not isinstance(model.get_submodule(path), nn.Embedding):
        return []
    return [h for h, _ in tied_heads(model, path) if h not in saved_names]


def _saved_owner(k: str, saved_names: list[str]) -> str | None:
    for n in saved_names:
        if k.startswith(f"{keys.PREFIX}{n}."):
            return n
    return None


def _own_state(module: nn.Module) -> dict[str, Tensor]:
    """A module's state dict without lorakit's saved copies (a SavedModule's `lora_copies.*`)."""
    return {k: v for k, v in module.state_dict().items() if not k.startswith("lora_copies.")}


def _examples(names: list[str], k: int = 3) -> str:
    """The first `k` names, comma-separated, and how many more there are."""
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more
