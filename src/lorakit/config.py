"""LoraConfig: what to adapt and how, with validation and PEFT's `adapter_config.json` mapping.

Field names are ours (short); `to_peft_dict` / `from_peft_dict` translate to PEFT's names so the JSON file
is exactly what PEFT writes and reads.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

INIT_METHODS = ("default", "gaussian", "pissa", "zeros", "olora", "loftq")
# Inits that derive A, B from the base weight and change it (lorakit.inits): they only run when adding a new
# adapter; a saved one loads as "default" (its tensors are what counts).
RESIDUAL_INITS = ("pissa", "olora", "loftq")
BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """How to add LoRA to a model.

    Args:
        r: rank of every adapted module (default 16); `rank_pattern` overrides it per module.
        alpha: LoRA alpha (default 2·r); scaling s = alpha / r, or alpha / sqrt(r) with `use_rslora`.
        dropout: dropout probability on the LoRA branch input only (the base path never sees it).
        targets: which modules to adapt. A list: a module matches when its full name equals an entry or ends
            with "." + entry. One string: a regex that must match the full name (`re.fullmatch`).
            "all-linear": every Linear / GPT-2 Conv1D except the output head.
        exclude: modules never adapted, same matching rules as `targets`.
        rank_pattern / alpha_pattern: {regex key: value}; a key matches a module name as `(.*\\.)?(key)$`.
        layers_to_transform: only adapt modules inside these layer indices (`layers.<i>.`, `h.<i>.`, ...).
        layers_pattern: the name of the layer container ("layers", "h", ...), when it is not one of the usual.
        use_rslora: scale by alpha / sqrt(r).
        use_dora: DoRA (weight-decomposed LoRA), Linear and Conv1D only.
        init: "default" (A kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r), B = 0), "zeros" (both 0),
            "pissa" (A, B from the top-r SVD of W; W keeps the residual so the output is unchanged), "olora"
            (A, B from the QR decomposition of W, W keeps the residual), "loftq" (for a base then quantized
            to NF4: W becomes NF4 values, A, B the best rank-r fit of the quantization error); lorakit.inits.
        bias: "none", "all" (every bias of the model trains) or "lora_only" (biases of adapted modules train).
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head).
        trainable_token_indices: embedding rows to train, e.g. new tokens: a list of ids (for the input
            embedding) or {embedding module name: ids}.
        fan_in_fan_out: set automatically for GPT-2 Conv1D (weight stored (in, out)); kept for PEFT files.
        target_parameters: parameters (not modules) to adapt, e.g. fused MoE experts
            ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]: a full parameter name equals an entry or
            ends with "." + entry (PEFT's rule; see lorakit.param_lora). `targets` may then be [] (none).

    Raises:
        ValueError: on any invalid value, naming the field and what was expected.
    """

    r: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    exclude: str | list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | None = None
    layers_pattern: str | list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    bias: str = "none"
    modules_to_save: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = 2 * self.r
        if isinstance(self.targets, tuple | set):
            self.targets = sorted(self.targets)
        for name in ("exclude", "modules_to_save", "layers_to_transform"):
            value = getattr(self, name)
            if isinstance(value, tuple | set):  # PEFT's config objects hold sets
                setattr(self, name, sorted(value) if isinstance(value, set) else list(value))
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def validate(self) -> None:
        def bad(name: str, value: Any, expected: str) -> ValueError:
            return ValueError(f"LoraConfig.{name}={value!r} is invalid: expected {expected}")

        _check_types(self, bad)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise bad("r", self.r, "a positive integer")
        if not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha) or self.alpha == 0:
            raise bad("alpha", self.alpha, "a finite non-zero number")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise bad("dropout", self.dropout, "a probability in [0, 1)")
        if not isinstance(self.targets, str | list) or not (self.targets or self.target_parameters):
            raise bad("targets", self.targets, 'a module name list, a regex string or "all-linear"')
        if self.target_parameters is not None and (
            not isinstance(self.target_parameters, list)
            or not all(isinstance(t, str) and t for t in self.target_parameters)
        ):
            raise bad("target_parameters", self.target_parameters, "a list of parameter names")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            _check_regex("targets", self.targets)
        if isinstance(self.exclude, str):
            _check_regex("exclude", self.exclude)
        for key, value in self.rank_pattern.items():
            _check_regex("rank_pattern", key)
            if not isinstance(value, int) or value <= 0:
                raise bad(f"rank_pattern[{key!r}]", value, "a positive integer")
        for key, value in self.alpha_pattern.items():
            _check_regex("alpha_pattern", key)
            if not isinstance(value, int | float) or value == 0:
                raise bad(f"alpha_pattern[{key!r}]", value, "a non-zero number")
        if self.init not in INIT_METHODS:
            raise bad("init", self.init, f"one of {INIT_METHODS}")
        if self.bias not in BIAS_MODES:
            raise bad("bias", self.bias, f"one of {BIAS_MODES}")
        if self.init in RESIDUAL_INITS and self.use_dora:
            raise bad("init", self.init, "'default' or 'gaussian' with use_dora=True")

    # -- per-module values ----------------------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        key = pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.alpha

    # -- PEFT's adapter_config.json -------------------------------------------------------------------------

    def to_peft_dict(self, target_modules: str | list[str] | None = None) -> dict[str, Any]:
        """The dict PEFT 0.21 writes as adapter_config.json (with resolved `target_modules` if given)."""
        init: Any = {"default": True, "zeros": False}.get(self.init, self.init)
        token_indices = self.trainable_token_indices
        return {
            "peft_type": "LORA",
            "task_type": None,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target_modules if target_modules is not None else self.targets,
            "exclude_modules": self.exclude,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            # A PiSSA adapter is saved converted to plain LoRA, so a loader must not re-run the SVD.
            "init_lora_weights": True if init in RESIDUAL_INITS else init,
            "bias": self.bias,
            "lora_bias": False,
            "modules_to_save": self.modules_to_save,
            "trainable_token_indices": token_indices,
            "fan_in_fan_out": self.fan_in_fan_out,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None,
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "loftq_config": {},
            "eva_config": None,
            "corda_config": None,
            "layer_replication": None,
            "use_qalora": False,
            "qalora_group_size": 16,
            "target_parameters": sorted(self.target_parameters) if self.target_parameters else None,
            "auto_mapping": None,
            "peft_version": "0.21.2",
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Build a config from PEFT's JSON. Unknown keys from newer versions are ignored with a warning.

        Raises:
            ValueError: naming `source` when the file is not a LoRA config or a value is invalid.
        """
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{source}: peft_type is {data.get('peft_type')!r}, expected 'LORA'")
        for key in ("r", "lora_alpha"):
            if key not in data:
                raise ValueError(f"{source}: missing required key {key!r}")
        if data.get("lora_bias"):
            raise ValueError(f"{source}: lora_bias=True is not supported by lorakit")
        unknown = sorted(set(data) - _KNOWN_PEFT_KEYS)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown keys {unknown}", stacklevel=2)
        init = data.get("init_lora_weights", True)
        init = {True: "default", False: "zeros"}.get(init, init)
        if init not in INIT_METHODS:
            # Other PEFT initialisations (olora, loftq, eva, ...) only matter before training; saved
            # tensors are what they are, so loading treats them as plain LoRA.
            init = "default"
        params = data.get("target_parameters") or None
        targets = data.get("target_modules") or ([] if params else "all-linear")
        try:
            return cls(
                r=data["r"],
                alpha=data["lora_alpha"],
                dropout=data.get("lora_dropout", 0.0) or 0.0,
                targets=list(targets) if isinstance(targets, list | tuple | set) else targets,
                exclude=data.get("exclude_modules"),
                rank_pattern=data.get("rank_pattern") or {},
                alpha_pattern=data.get("alpha_pattern") or {},
                layers_to_transform=data.get("layers_to_transform"),
                layers_pattern=data.get("layers_pattern"),
                use_rslora=_flag(data, "use_rslora"),
                use_dora=_flag(data, "use_dora"),
                init="default" if init in RESIDUAL_INITS else init,
                bias=data.get("bias", "none"),
                modules_to_save=data.get("modules_to_save"),
                trainable_token_indices=data.get("trainable_token_indices"),
                fan_in_fan_out=_flag(data, "fan_in_fan_out"),
                base_model_name_or_path=data.get("base_model_name_or_path"),
                target_parameters=list(params) if params else None,
            )
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err

    def replace(self, **changes: Any) -> LoraConfig:
        return dataclasses.replace(self, **changes)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to us


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _check_types(cfg: LoraConfig, bad) -> None:
    """Every field's type (booleans are not numbers, numbers are finite), before the value checks."""
    if not _is_int(cfg.r):
        raise bad("r", cfg.r, "a positive integer")
    if not _is_number(cfg.alpha):
        raise bad("alpha", cfg.alpha, "a finite non-zero number")
    if not _is_number(cfg.dropout):
        raise bad("dropout", cfg.dropout, "a probability in [0, 1)")
    if not (isinstance(cfg.targets, str) or _is_names(cfg.targets)):
        raise bad("targets", cfg.targets, 'a list of module names, a regex string or "all-linear"')
    for name in ("exclude", "layers_pattern"):
        value = getattr(cfg, name)
        if not (value is None or isinstance(value, str) or _is_names(value)):
            raise bad(name, value, "a module name list or a regex string")
    for name, check, expected in (
        ("rank_pattern", lambda v: _is_int(v) and v > 0, "a positive integer"),
        ("alpha_pattern", lambda v: _is_number(v) and v != 0, "a finite non-zero number"),
    ):
        patterns = getattr(cfg, name)
        if not isinstance(patterns, dict):
            raise bad(name, patterns, "a mapping {module regex: value}")
        for key, value in patterns.items():
            if not isinstance(key, str):
                raise bad(name, patterns, "string keys (module regexes)")
            if not check(value):
                raise bad(f"{name}[{key!r}]", value, expected)
    layers = cfg.layers_to_transform
    if layers is not None and not (isinstance(layers, list) and all(_is_int(i) and i >= 0 for i in layers)):
        raise bad("layers_to_transform", layers, "a list of layer indices (integers >= 0), e.g. [0, 1]")
    for name in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(getattr(cfg, name), bool):
            raise bad(name, getattr(cfg, name), "true or false")
    for name in ("init", "bias"):
        if not isinstance(getattr(cfg, name), str):
            raise bad(name, getattr(cfg, name), "a string")
    if cfg.modules_to_save is not None and not _is_names(cfg.modules_to_save):
        raise bad("modules_to_save", cfg.modules_to_save, "a list of module names")
    if cfg.base_model_name_or_path is not None and not isinstance(cfg.base_model_name_or_path, str):
        raise bad("base_model_name_or_path", cfg.base_model_name_or_path, "a string")
    tokens = cfg.trainable_token_indices
    ids_ok = lambda ids: isinstance(ids, list) and all(_is_int(i) and i >= 0 for i in ids)  # noqa: E731
    if tokens is not None and not (
        ids_ok(tokens)
        or (isinstance(tokens, dict) and all(isinstance(k, str) and ids_ok(v) for k, v in tokens.items()))
    ):
        raise bad(
            "trainable_token_indices", tokens, "a list of token ids (integers >= 0) or {module name: ids}"
        )


def pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """The first key of `patterns` matching `module_name` as PEFT does: `(.*\\.)?(key)$`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _flag(data: dict[str, Any], key: str) -> Any:
    """A PEFT boolean as written (null: false); validate() refuses anything but true / false."""
    value = data.get(key)
    return False if value is None else value


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"LoraConfig.{name}: {pattern!r} is not a valid regex ({err})") from err


_KNOWN_PEFT_KEYS = {
    "peft_type", "task_type", "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules",
    "exclude_modules", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "use_rslora",
    "use_dora", "init_lora_weights", "bias", "lora_bias", "modules_to_save", "trainable_token_indices",
    "fan_in_fan_out", "base_model_name_or_path", "revision", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "layer_replication", "use_qalora", "qalora_group_size", "target_parameters",
    "auto_mapping", "peft_version", "runtime_config", "lora_ga_config", "arrow_config", "ensure_weight_tying",
    "alora_invocation_tokens", "use_bdlora", "bdlora_config", "cola_config", "init_weights", "kasa_config",
    "monteclora_config", "velora_config",
}  # fmt: skip
