"""Training across processes launched by `torchrun`, on PyTorch's own engines (gloo on CPU, NCCL on CUDA).

`--distributed ddp` (the default under torchrun): every process holds the whole model; the trainable
parameters are wrapped in `torch.nn.parallel.DistributedDataParallel` (bucketed all-reduce overlapping the
backward). `--distributed fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) per decoder layer, then the
root, so every parameter (the frozen base included) is sharded across the processes; on CUDA with a
MixedPrecisionPolicy (bf16 compute, fp32 gradient reduction, fp32 master shards).

Exactness: each optimizer step's global batch is the same rows as in a single-process run, each rank runs
its share of them, and every micro-batch's loss is divided by the number of loss tokens of the *whole* global
step (counted up front). So the update equals the single-process one if gradients are *summed* over ranks
(not averaged): DDP gets a summing communication hook, FSDP a gradient divide factor of 1 with sum-only
collectives. Accumulation micro-steps skip communication (DDP `no_sync`, FSDP
`set_requires_gradient_sync(False)`); the last micro-step reduces the accumulated sum once.

The loss runs inside the wrapped module's forward (`Engine.loss`): DDP's reducer and FSDP's root hooks only
work when the forward goes through the wrapper, and the chunked loss calls the base transformer and the
output head directly (which the wrapper then covers too).

Checkpoints hold full tensors whatever the engine (FSDP gathers only the trainable tensors and their AdamW
state, with `DTensor.full_tensor()`; the base is never gathered), so one checkpoint resumes under any engine.
Without torchrun (no WORLD_SIZE in the environment) there is one process: ddp is a no-op, fsdp runs over a
one-process group (the single-GPU FSDP path).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

ENGINES = ("ddp", "fsdp")


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started: bool = False  # whether `init` created the process group (and `close` should destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(engine: str = "ddp") -> Context:
    """Join the process group torchrun describes in the environment; one process without it.

    engine "fsdp" on one process (no torchrun) creates a one-process group, which FSDP2 needs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if world <= 1 and engine != "fsdp":
        return Context(device=device)
    started = False
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        backend = "nccl" if cuda else "gloo"
        if world <= 1:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend=backend)
        started = True
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device, started)


def close(ctx: Context) -> None:
    if ctx.started and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_params(ctx: Context, params: list[torch.nn.Parameter]) -> None:
    """Give every rank rank 0's values (adapter initialisations drawn on each rank may differ)."""
    if ctx.world > 1:
        with torch.no_grad():
            for p in params:
                dist.broadcast(_local(p), src=0)


def sum_scalar(ctx: Context, value: float, device: torch.device) -> float:
    if ctx.world <= 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def any_flag(ctx: Context, flag: bool, device: torch.device) -> bool:
    """True when `flag` is set on any rank (so all ranks stop at the same step)."""
    return sum_scalar(ctx, float(flag), device) > 0 if ctx.world > 1 else flag


def gather(ctx: Context, obj: Any) -> list[Any]:
    """`obj` of every rank, by rank."""
    if ctx.world <= 1:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        dist.barrier()


# -- the engines ----------------------------------------------------------------------------------------------


class LossModule(nn.Module):
    """The training loss as a module, so that DDP / FSDP wrap the whole loss computation (see the docstring).

    forward(input_ids, attention_mask, labels) -> (loss_sum, n_tokens) = loss_fn(model, ...), e.g.
    `losses.causal_lm_loss` (the default).
    """

    def __init__(self, model: nn.Module, loss_fn=None) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args):
        """forward(fn) -> fn(model): any loss computation (a packed batch, a preference objective);
        forward(input_ids, attention_mask, labels) -> loss_fn(model, ...)."""
        if args and callable(args[0]) and not isinstance(args[0], torch.Tensor):
            return args[0](self.model)
        from ..losses import causal_lm_loss

        return (self.loss_fn or causal_lm_loss)(self.model, *args)


@dataclass
class StateView:
    """An optimizer's `.state` in another form (full tensors by full tensor), for `checkpoint.save`."""

    state: dict


class Engine:
    """How one process trains `model`: plain (one process), DDP or FSDP. Made by `wrap`.

    Attributes:
        kind: "single", "ddp" or "fsdp".
        sharded: parameters are DTensor shards; every rank must take part in every forward.
    """

    def __init__(self, kind: str, ctx: Context, model: nn.Module, runner: nn.Module) -> None:
        self.kind, self.ctx, self.model, self.runner = kind, ctx, model, runner
        self.sharded = kind == "fsdp"

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(loss_sum, n_tokens) of one micro-batch, through the wrapper."""
        return self.runner(batch["input_ids"], batch["attention_mask"], batch["labels"])

    def run(self, fn):
        """fn(model) through the wrapper (DDP's and FSDP's forward hooks see it): a micro-batch's loss."""
        return self.runner(fn)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward + backward: gradients are reduced only when `last`."""
        if self.kind == "ddp" and not last:
            with self.runner.no_sync():
                yield
            return
        if self.kind == "fsdp":
            self.runner.set_requires_gradient_sync(last)
        yield

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[nn.Module]:
        """The model to call outside the training step (evaluation, generation). Under FSDP every rank must
        enter it and run the same forwards; the root's parameters (embeddings, norm, head) stay gathered
        inside, the decoder layers gather theirs one at a time as in training."""
        if not self.sharded:
            yield self.model
            return
        self.runner.unshard()
        try:
            yield self.model
        finally:
            self.runner.reshard()

    def full_state(
        self, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer
    ) -> tuple[dict[str, torch.Tensor], Any]:
        """The trainable tensors and the optimizer state as full tensors (every rank must call it under
        FSDP: one all-gather per trainable tensor; the frozen base is never gathered)."""
        if not self.sharded:
            return params, optimizer
        full = {n: _full(p) for n, p in params.items()}
        state = {}
        for n, p in params.items():
            state[full[n]] = {k: _full(v) for k, v in optimizer.state.get(p, {}).items()}
        return full, StateView(state)

    def localize(self, ckpt, params: dict[str, nn.Parameter]):
        """The checkpoint with its full tensors cut into this rank's shards of `params` (FSDP), as is else."""
        if not self.sharded:
            return ckpt
        trainable = {n: _like(t, params[n]) for n, t in ckpt.trainable.items() if n in params}
        optimizer = {
            n: {k: _like(v, params[n]) if v.shape == params[n].shape else v for k, v in state.items()}
            for n, state in ckpt.optimizer.items()
            if n in params
        }
        return replace(ckpt, trainable=trainable, optimizer=optimizer)

    @contextlib.contextmanager
    def gathered_trainable(self) -> Iterator[None]:
        """Inside, the trainable parameters of the model are full plain tensors (so `save_adapter` writes the
        same file one process writes); every rank must enter it. Only trainable tensors are gathered."""
        if not self.sharded:
            yield
            return
        swapped = []
        for module in self.model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.requires_grad and _is_dtensor(p):
                    module._parameters[name] = nn.Parameter(p.full_tensor().detach(), requires_grad=True)
                    swapped.append((module, name, p))
        try:
            yield
        finally:
            for module, name, p in swapped:
                module._parameters[name] = p


def engine_of(model: nn.Module) -> Engine | None:
    """The Engine `wrap` put `model` under, or None."""
    return model.__dict__.get("lorakit_engine")


def wrap(model: nn.Module, ctx: Context, kind: str = "ddp", loss_fn=None) -> Engine:
    """Put `model` (adapters added, base frozen) under engine `kind`; the same Engine for a model wrapped once.

    loss_fn(model, input_ids, attention_mask, labels) -> (loss_sum, n_tokens): what `Engine.loss` runs
    inside the wrapper (default `losses.causal_lm_loss`, unchunked).

    Raises:
        ValueError: an unknown engine, or FSDP on a model it cannot shard (a bitsandbytes-quantized base).
    """
    if kind not in ENGINES:
        raise ValueError(f"--distributed={kind!r} is invalid: expected one of {ENGINES}")
    found = engine_of(model)
    if found is not None:
        return found
    if kind == "fsdp":
        engine = _wrap_fsdp(model, ctx, loss_fn)
    elif ctx.world > 1:
        engine = Engine("ddp", ctx, model, _wrap_ddp(LossModule(model, loss_fn), ctx))
    else:
        engine = Engine("single", ctx, model, LossModule(model, loss_fn))
    model.__dict__["lorakit_engine"] = engine
    return engine


def _sum_hook(state, bucket):  # no annotations: DDP checks them, and they are strings in this module
    """DDP communication hook: all-reduce SUM (the loop already divides by the global token count)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _wrap_ddp(runner: nn.Module, ctx: Context) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # init_sync=False: the frozen base is identical on every rank (loaded from the same files); only the
    # adapters, initialised per rank, are broadcast (by the loop) instead of the whole model.
    ddp = DDP(runner, device_ids=ids, init_sync=False, broadcast_buffers=False)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: transformers' `_no_split_modules` classes, else the
    entries of a ModuleList named like a layer container (layers, h, blocks, ...)."""
    from ..inject import LAYER_CONTAINERS

    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] in LAYER_CONTAINERS:
            return list(m)
    return []


def _wrap_fsdp(model: nn.Module, ctx: Context, loss_fn) -> Engine:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _check_quantized(model)
    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    mp = MixedPrecisionPolicy()
    if ctx.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"--distributed fsdp: no decoder layers found in {type(model).__name__} (no _no_split_modules and "
            "no ModuleList named layers / h / blocks); use --distributed ddp"
        )
    runner = LossModule(model, loss_fn)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(runner, mesh=mesh, mp_policy=mp)
    for m in runner.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            # Sum, not average, over ranks: each rank's loss is already divided by the global token count.
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return Engine("fsdp", ctx, model, runner)


def _check_quantized(model: nn.Module) -> None:
    """FSDP2 shards bitsandbytes 4-bit weights as plain bytes: a Params4bit is a flat (n, 1) uint8 tensor of
    packed values, whose dim-0 shards all-gather back to the same bytes, and `Linear4bit` restores the
    weight's quant_state from the module (bitsandbytes' `fix_4bit_weight_quant_state_from_module`, made for
    FSDP); mixed precision leaves non-float parameters alone. 8-bit weights (`Int8Params`) keep their
    per-row scales on the parameter itself, which the all-gather drops: refused.

    Raises:
        ValueError: naming the first 8-bit parameter and what to use instead.
    """
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Int8Params":
            raise ValueError(
                f"--distributed fsdp cannot shard an 8-bit bitsandbytes base ({name}.weight is an Int8Params: "
                "its per-row scales live on the parameter and do not survive FSDP2's all-gather). Use "
                "--quantize 4bit (sharded), or --distributed ddp with --quantize 8bit"
            )
        if type(weight).__name__ == "Params4bit" and getattr(module, "quant_state", None) is None:
            raise ValueError(
                f"--distributed fsdp: {name} holds a 4-bit weight without a module-level quant_state "
                "(bitsandbytes restores the weight's quant_state from it after the all-gather); quantize the "
                "model by moving it to its device before sharding"
            )


def check_resume(ckpt, ctx: Context, dropout: float):
    """The checkpoint to restore on this process count, or ValueError saying why it cannot be.

    A checkpoint holds full tensors, so any process count can load it. With dropout the processes draw
    their masks from per-process RNG streams (seeded seed + rank), which cannot be re-split over another
    count: refused. Without dropout nothing in a step draws random numbers, so rank 0's RNG states serve every
    rank and the resumed run equals the uninterrupted one (up to the order of the gradient sum).
    """
    saved = len(ckpt.rng)
    if saved == ctx.world:
        return ckpt
    if dropout > 0:
        raise ValueError(
            f"--resume: {ckpt.path} was saved by {saved} process{'es' if saved > 1 else ''}, this run has "
            f"{ctx.world}: with dropout "
            f"({dropout}) each process draws its own dropout masks, which cannot be re-split over another "
            f"process count; resume with {saved} processes"
        )
    return replace(ckpt, rng=[ckpt.rng[0]] * ctx.world)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or hasattr(t, "full_tensor") and hasattr(t, "placements")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _full(t):
    if not torch.is_tensor(t):
        return t
    return (t.full_tensor() if _is_dtensor(t) else t).detach()


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param` (a DTensor shard of it), without communication: every rank holds `full`."""
    if not _is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
