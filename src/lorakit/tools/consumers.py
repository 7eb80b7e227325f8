"""Will an adapter load in PEFT, vLLM and llama.cpp, and if not, why: the rules each loader applies, read off
its source (PEFT 0.21 `AutoPeftModel` / `PeftModel.from_pretrained`; vLLM `lora/peft_helper.py`,
`lora/utils.py parse_fine_tuned_lora_name`, `lora/lora_model.py`; llama.cpp `src/llama-adapter.cpp`).

Each consumer gets {"loads": bool, "problems": [why it will not load or will compute something else],
"notes": [what to pass or know]}. No model is loaded; this reads the adapter directory only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# vLLM accepts only these --max-lora-rank values (vllm/config/lora.py), and defaults to 16.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_RANK = 16
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def consumer_report(view) -> dict[str, dict[str, Any]]:
    """{"peft": ..., "vllm": ..., "llama.cpp": ...} for an `AdapterView` (tools.adapter_file.open_adapter)."""
    return {"peft": _peft(view), "vllm": _vllm(view), "llama.cpp": _llama_cpp(view)}


def _result(problems: list[str], notes: list[str]) -> dict[str, Any]:
    return {"loads": not problems, "problems": problems, "notes": notes}


def _peft(view) -> dict[str, Any]:
    """PeftModel.from_pretrained(base, dir) reads any valid LoRA config; AutoPeftModelForCausalLM also needs
    task_type (to pick the class) and a base it can load (base_model_name_or_path)."""
    cfg = view.raw_config
    problems, notes = [], []
    if cfg.get("task_type") is None:
        problems.append(
            "task_type is null: AutoPeftModelForCausalLM fails ('Cannot infer the auto class from the config'); "
            "PeftModel.from_pretrained(base, dir) still works"
        )
    base = cfg.get("base_model_name_or_path")
    if not base:
        problems.append("base_model_name_or_path is not set: AutoPeftModel* cannot find the base model")
    elif base == "default":
        problems.append("base_model_name_or_path is lorakit's alias 'default', which PEFT cannot resolve")
    elif Path(base).expanduser().exists():
        if not Path(base).is_absolute():
            notes.append(
                f"base_model_name_or_path {base!r} is relative: it resolves only from this directory"
            )
    elif _HUB_ID.match(base):
        notes.append(f"AutoPeftModel* loads the base {base!r} from the Hub (or its cache)")
    else:
        problems.append(f"base_model_name_or_path {base!r} is neither an existing path nor a hub id")
    return _result(problems, notes)


def _vllm(view) -> dict[str, Any]:
    cfg = view.raw_config
    problems, notes = [], []
    if view.config.use_dora:
        problems.append("DoRA: 'vLLM does not yet support DoRA' (peft_helper.py)")
    if cfg.get("modules_to_save"):
        problems.append(
            f"modules_to_save {cfg['modules_to_save']}: 'vLLM only supports modules_to_save being None'"
        )
    if cfg.get("trainable_token_indices") or any("token_adapter" in k for k in view.other):
        problems.append(
            "trainable tokens: vLLM releases reject their tensors as 'unsupported LoRA weight' (only the newest "
            "vLLM reads trainable_token_indices)"
        )
    if view.config.bias != "none":
        problems.append(f"bias={view.config.bias!r}: vLLM requires bias 'none' (peft_helper validate_legal)")
    extra = sorted(k for k in view.other if "token_adapter" not in k and "modules_to_save" not in k)
    if extra:
        problems.append(f"non-LoRA tensors {extra[:2]}: 'unsupported LoRA weight' (vLLM reads lora_A/B only)")
    conv = sorted(n for n, m in view.modules.items() if len(m.a_shape) != 2)
    if conv:
        problems.append(f"LoRA on conv modules {conv[:2]}: vLLM applies LoRA to linear layers only")
    embed = sorted(n for n, m in view.modules.items() if m.embedding)
    if embed:
        notes.append(f"embedding LoRA {embed[:2]}: loads only for models whose vLLM class lists embed_tokens")
    scales = {round(m.scale, 9) for m in view.modules.values()}
    if len(scales) > 1:
        problems.append(
            "modules have different scales (rank_pattern / alpha_pattern): vLLM applies one lora_alpha / r to "
            f"every module, so outputs differ (scales {sorted(scales)[:4]})"
        )
    r = max(m.r for m in view.modules.values())
    if r > VLLM_RANKS[-1]:
        problems.append(f"rank {r} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")
    elif r > VLLM_DEFAULT_RANK:
        need = next(k for k in VLLM_RANKS if k >= r)
        notes.append(
            f"rank {r} > vLLM's default max_lora_rank {VLLM_DEFAULT_RANK}: start vLLM with --max-lora-rank {need}"
        )
    return _result(problems, notes)


def _llama_cpp(view) -> dict[str, Any]:
    problems = llama_cpp_problems(view)
    notes = ["convert first: lorakit export --adapter DIR --format gguf-lora (scales folded per module)"]
    if problems:
        notes = ["the merged export carries it: lorakit export --adapter DIR --format gguf"]
    return _result(problems, notes)


def llama_cpp_problems(view) -> list[str]:
    """Why llama.cpp's LoRA loader cannot apply this adapter as a LoRA GGUF ([] when it can)."""
    cfg = view.raw_config
    problems = []
    if view.config.use_dora:
        problems.append("DoRA (use_dora): its magnitude renormalisation is not a low-rank delta")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']}: full tensors, not LoRA pairs")
    if cfg.get("trainable_token_indices"):
        problems.append("trainable_token_indices: embedding rows, not LoRA pairs")
    extra = sorted(k for k in view.other if "modules_to_save" not in k and "token_adapter" not in k)
    if extra:
        problems.append(f"non-LoRA tensors (e.g. biases) {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    embed = sorted(n for n, m in view.modules.items() if m.embedding or len(m.a_shape) != 2)
    if embed:
        problems.append(f"LoRA on embedding / conv modules {embed[:3]} (not exported to llama.cpp's format)")
    return problems
