"""Atomic training checkpoints and exact resume.

A checkpoint holds everything the next step depends on, so a run resumed after `kill -9` ends with the same
adapter as one never interrupted: the trainable tensors, AdamW's moments, the step (the learning-rate schedule
and the data position are functions of it), and the RNG states of every process (python, numpy, torch, CUDA).

Layout of `<output>/checkpoint/`:
    LATEST                   the name of the newest complete checkpoint, replaced atomically (os.replace)
    step-000050/             one checkpoint, written under a temporary name and renamed when complete
                             (atomic.write_dir; temporaries of killed saves are removed by the next save)
        trainable.safetensors    every trainable parameter, by name
        optimizer.safetensors    "<param name>/<state key>" -> AdamW state tensor
        rng.safetensors          "rank<i>/torch", "rank<i>/cuda<j>" -> RNG state bytes
        state.json               step, tokens seen, python / numpy RNG states per rank, the run's config
Nothing is pickled: tensors go to safetensors, the rest to JSON. Older checkpoints are deleted once LATEST
points at a newer one, so a crash at any moment leaves one complete checkpoint to resume from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import clean_stale, resolve, write_dir, write_text

DIRNAME = "checkpoint"
RESULTS = "results.json"  # written last by a finished run: the marker `finished` looks for
# Options that change what the next step computes: a resumed run must agree with the checkpoint on them.
# The rows per optimizer step must match too (checked apart): how they split into micro-batches and
# processes may change (e.g. 2 processes x 2 rows resumed as 1 process x 2 rows x 2 accumulation).
MUST_MATCH = (
    "model", "data", "mode", "rank", "alpha", "dropout", "targets", "max_len", "seed", "quantize",
    "train_embeddings", "new_tokens", "skip_bad_rows", "dtype",
)  # fmt: skip
# The optimizer's state only loads into the same optimizer and groups; the data must be encoded the same way.
MUST_MATCH += ("optimizer", "lora_plus_ratio", "truncate", "chat_template", "init")
# The objective: a preference or GRPO run resumed with another loss would not be the run it continues
# (grpo_iterations also sets how many optimizer updates, and so lr-schedule positions, a step holds).
MUST_MATCH += ("beta", "loss_type", "reward", "num_generations", "grpo_iterations", "epsilon", "epsilon_high")


@dataclass
class Checkpoint:
    """What `load` returns: the completed step count and the saved tensors and states."""

    path: Path
    step: int
    global_batch: int
    tokens: int
    elapsed: float
    config: dict[str, Any]
    trainable: dict[str, torch.Tensor] = field(repr=False)
    optimizer: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    rng: list[dict[str, Any]] = field(repr=False)


def root(output: str | os.PathLike) -> Path:
    return Path(output) / DIRNAME


def latest(output: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory under `output`, or None."""
    pointer = root(output) / "LATEST"
    if not pointer.is_file():
        return None
    path = root(output) / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, every CUDA device)."""
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    output: str | os.PathLike,
    *,
    step: int,
    tokens: int,
    elapsed: float,
    config: dict[str, Any],
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    rngs: list[dict[str, Any]],
    global_batch: int = 0,
) -> Path:
    """Write checkpoint `step-<step>` atomically, point LATEST at it and delete older ones.

    Args:
        params: the trainable parameters by name, in the optimizer's order.
        rngs: `rng_state()` of every process, by rank.
        global_batch: rows per optimizer step; the data position is step · global_batch rows.
    Returns:
        The checkpoint directory.
    """
    base = root(output)
    base.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"

    def fill(tmp: Path) -> None:
        save_file(
            {n: p.detach().contiguous().cpu() for n, p in params.items()}, str(tmp / "trainable.safetensors")
        )
        save_file(_optimizer_tensors(params, optimizer), str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_json = {}, []
        for rank, state in enumerate(rngs):
            rng_tensors[f"rank{rank}/torch"] = state["torch"]
            for j, s in enumerate(state.get("cuda") or []):
                rng_tensors[f"rank{rank}/cuda{j}"] = s.cpu()
            rng_json.append({"python": state["python"], "numpy": state["numpy"]})
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        meta = {
            "step": step, "rows_done": step * global_batch, "global_batch": global_batch, "tokens": tokens,
            "elapsed": elapsed, "config": config, "rng": rng_json,
        }  # fmt: skip
        (tmp / "state.json").write_text(json.dumps(meta))

    final = write_dir(base / name, fill, overwrite=True)
    write_text(base / "LATEST", name)
    for old in base.iterdir():
        # Older checkpoints; temporaries only when their process is dead (one may still be saving).
        if old.name != name and old.name.startswith("step-") and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    clean_stale(base)
    return final


def load(path: str | os.PathLike) -> Checkpoint:
    """Read one checkpoint directory (all files, before anything is applied).

    Raises:
        ValueError: a missing or unreadable file, naming it.
    """
    path = Path(path)
    try:
        meta = json.loads((path / "state.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        flat = load_file(str(path / "optimizer.safetensors"))
        rng_tensors = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a complete lorakit checkpoint ({err})") from err
    optimizer: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        name, _, kind = key.rpartition("/")
        optimizer.setdefault(name, {})[kind] = t
    rng = []
    for rank, states in enumerate(meta["rng"]):
        cuda, j = [], 0
        while f"rank{rank}/cuda{j}" in rng_tensors:
            cuda.append(rng_tensors[f"rank{rank}/cuda{j}"])
            j += 1
        rng.append({**states, "torch": rng_tensors[f"rank{rank}/torch"], "cuda": cuda})
    return Checkpoint(
        path,
        meta["step"],
        meta.get("global_batch", 0),
        meta["tokens"],
        meta["elapsed"],
        meta["config"],
        trainable,
        optimizer,
        rng,
    )


def check_config(ckpt: Checkpoint, config: dict[str, Any], global_batch: int) -> None:
    """Raises ValueError listing the options where `config` differs from the checkpoint's run."""
    if ckpt.global_batch != global_batch:
        raise ValueError(
            f"--resume: {ckpt.path} was made with {ckpt.global_batch} rows per step, this run has "
            f"{global_batch} (batch size x accumulation x processes): use the same, so the data order is kept"
        )
    diff = [
        f"{k}: checkpoint {ckpt.config.get(k)!r}, now {config.get(k)!r}"
        for k in MUST_MATCH
        if ckpt.config.get(k) != config.get(k)
    ]
    if diff:
        raise ValueError(
            f"--resume: {ckpt.path} was made with other options ({'; '.join(diff)}); use the same options "
            "or another --output"
        )


def restore(
    ckpt: Checkpoint, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, rank: int
) -> None:
    """Put the checkpoint's tensors into `params` and `optimizer`, and this rank's RNG states back.

    Raises:
        ValueError: the checkpoint's trainable tensors do not match the model's (names or shapes).
    """
    if set(ckpt.trainable) != set(params) or any(
        ckpt.trainable[n].shape != p.shape for n, p in params.items()
    ):
        missing = sorted(set(params) - set(ckpt.trainable))[:3]
        extra = sorted(set(ckpt.trainable) - set(params))[:3]
        raise ValueError(
            f"{ckpt.path}: its trainable tensors do not match the model's (missing {missing}, unexpected "
            f"{extra}, or other shapes)"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ckpt.trainable[n])
    state = optimizer.state_dict()
    # State is indexed by position in the optimizer's param groups (LoRA+ groups reorder the parameters).
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state["state"] = {
        index[id(p)]: {k: v.to(p.device) if k != "step" else v for k, v in ckpt.optimizer[n].items()}
        for n, p in params.items()
        if n in ckpt.optimizer
    }
    optimizer.load_state_dict(state)
    if rank >= len(ckpt.rng):
        raise ValueError(f"{ckpt.path}: saved by {len(ckpt.rng)} processes; cannot resume rank {rank}")
    set_rng_state(ckpt.rng[rank])


def finished(output: str | os.PathLike, config: dict[str, Any]) -> dict[str, Any] | None:
    """The results of a finished run in `output` made with the same options as `config`, else None.

    A run is finished once its results.json is written (after the adapter, before the checkpoints are
    deleted), so a kill between those steps still counts as finished. A new run on the same output removes
    the old results.json when it starts (`discard_results`), so a finished run is never confused with an
    unfinished one that followed it.

    Raises:
        ValueError: the finished run had the same options but another length (--steps / --epochs): a
            finished run cannot be extended (its optimizer state is gone).
    """
    path = Path(output) / RESULTS
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    ran = results.get("config") if isinstance(results, dict) else None
    if not isinstance(ran, dict) or any(ran.get(k) != config.get(k) for k in MUST_MATCH):
        return None
    if not (
        resolve(output, "adapter_config.json").is_file()
        and resolve(output, "adapter_model.safetensors").is_file()
    ):
        return None
    longer = [f"{k}: finished run {ran.get(k)!r}, now {config.get(k)!r}" for k in ("steps", "epochs")
              if ran.get(k) != config.get(k)]  # fmt: skip
    if longer:
        raise ValueError(
            f"--resume: {output} holds a finished run of another length ({'; '.join(longer)}); it cannot be "
            "extended: train into another --output (or without --resume to start over)"
        )
    return results


def discard_results(output: str | os.PathLike) -> None:
    """A new run starts on `output`: the previous run's results.json no longer describes what it holds."""
    (Path(output) / RESULTS).unlink(missing_ok=True)


def remove(output: str | os.PathLike) -> None:
    """Delete the checkpoints of a finished run (the adapter is saved; AdamW's moments are not needed)."""
    shutil.rmtree(root(output), ignore_errors=True)


def _optimizer_tensors(params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    out = {}
    for n, p in params.items():
        for k, v in optimizer.state.get(p, {}).items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            out[f"{n}/{k}"] = t.detach().contiguous().cpu()
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple | list):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
