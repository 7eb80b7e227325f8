"""Train a tiny Llama on synthetic rows with `lorakit.train.loop.fit`: the subprocess of the train tests.

    python tests/train_tiny.py OUT --steps 12 [--save-every 2] [--resume] [--sleep 0.05] [--dropout 0.1]
Run under `python -m torch.distributed.run --nproc_per_node 2` it trains data-parallel. The final adapter is
saved to OUT/adapter (PEFT format) by rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import lorakit  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from lorakit.train import TrainConfig, distributed, loop  # noqa: E402


def examples(n: int = 24, seed: int = 0, vocab: int = 128) -> list:
    """Rows of 6..20 tokens; the first 3 tokens carry no loss, so rows have different loss-token counts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(6, 21, (1,), generator=g))
        ids = torch.randint(3, vocab, (k,), generator=g).tolist()
        out.append(SimpleNamespace(input_ids=ids, labels=[-100] * 3 + ids[3:]))
    return out


def preference_examples(mode: str, n: int = 24) -> list:
    """Pairs (mode "dpo" / "orpo") or labelled rows ("kto") of arithmetic prompts, tokenized by the tiny
    character tokenizer through `load_preference` (answers of different lengths; KTO labels mixed)."""
    import tempfile

    from conftest import tiny_tokenizer
    from lorakit.data.preference import load_preference

    if mode == "kto":
        rows = [
            {"prompt": f"say {i}", "completion": f"{i}" if i % 3 else f"not {i}!", "label": i % 3 != 0}
            for i in range(n)
        ]
    else:
        rows = [
            {
                "prompt": f"what is {i} + {i}?",
                "chosen": str(2 * i),
                "rejected": f"{2 * i + 1} or so" * (1 + i % 2),
            }
            for i in range(n)
        ]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return load_preference(path, tiny_tokenizer(), mode, max_len=64).examples


def model_with_adapter(
    seed: int = 0, dropout: float = 0.0, checkpointing: bool = False, quantized: str = "", moe: bool = False
):
    """The tiny Llama with r=4 adapters on all linear layers. `quantized`: a model directory loaded in 4-bit
    (bitsandbytes) instead; `moe`: a tiny Mixtral, its fused experts adapted too (target_parameters)."""
    if quantized:
        from lorakit.models import load_model

        model, _ = load_model(quantized, quantize="4bit")
    elif moe:
        model = tiny_mixtral(seed=seed)
    else:
        model = tiny_llama(seed=seed)
    if checkpointing:
        from lorakit.train.prepare import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    torch.manual_seed(seed + 1)
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if moe else None
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, dropout=dropout, target_parameters=experts))
    return model


def tiny_mixtral(seed: int = 0):
    """A tiny random Mixtral: 4 experts stored as fused 3-D parameters, top-2 routing."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
    )  # fmt: skip
    return MixtralForCausalLM(cfg).eval()


def config(output, **kw) -> TrainConfig:
    base = dict(output=str(output), steps=12, lr=1e-2, warmup=0.2, batch_size=2, grad_accum=2, log_every=1)
    return TrainConfig(**{**base, **kw})


def stop_after(steps: int) -> None:
    """Ask the loop to stop (as Ctrl-C does) during step `steps`: it finishes that step and checkpoints."""
    plain = loop.set_lr

    def set_lr(optimizer, cfg, step, total, warmup):
        if step == steps - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return plain(optimizer, cfg, step, total, warmup)

    loop.set_lr = set_lr


def held_base_bytes(model) -> int:
    """Bytes of storage the frozen parameters hold right now, each storage once: a DTensor shard counts its
    local storage, a gathered (unsharded) parameter its full storage (FSDP's all-gather buffer)."""
    seen, total = set(), 0
    for module in model.modules():
        for p in module._parameters.values():
            if p is None or p.requires_grad:
                continue
            t = p.to_local() if hasattr(p, "to_local") else p
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes():
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def base_memory_probe(model) -> dict:
    """{"single": the base's bytes unsharded, "peak": the most `held_base_bytes` seen inside any decoder
    layer's forward (one layer gathered at a time, plus the root's parameters), "fast_lora_calls": forwards
    through the fast LoRA Function}; updated as training runs."""
    from lorakit.train.distributed import decoder_layers

    memory = {"single": held_base_bytes(model), "peak": 0, "fast_lora_calls": 0}
    import lorakit.fast as fast

    plain = fast.lora_linear_train

    def counted(*args, **kw):  # the hand-derived LoRA Function (lorakit.fast.linear), counted
        memory["fast_lora_calls"] += 1
        return plain(*args, **kw)

    fast.lora_linear_train = counted

    def probe(module, args, output=None):
        memory["peak"] = max(memory["peak"], held_base_bytes(model))

    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(probe)
        layer.register_forward_hook(probe)
    return memory


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("output")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per micro-batch, to be killed mid-run")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default=None, help="e.g. cuda (default: the process's device, CPU here)")
    p.add_argument("--distributed", default="ddp", help="ddp or fsdp")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--loss-chunk", type=int, default=TrainConfig.loss_chunk)
    p.add_argument("--stop-after", type=int, default=0, help="stop (as on Ctrl-C) after this many steps")
    p.add_argument("--report-memory", action="store_true", help="write OUT/memory-rank<r>.json")
    p.add_argument("--quantized-model", default="", help="a model directory, loaded in 4-bit (QLoRA)")
    p.add_argument("--moe", action="store_true", help="a tiny Mixtral with LoRA on its fused experts")
    p.add_argument("--no-packing", action="store_true", help="pad every micro-batch (packing off)")
    p.add_argument(
        "--mode", default="sft", help="sft, or a preference mode (dpo, orpo, kto) on `preference_examples`"
    )
    p.add_argument("--beta", type=float, default=0.1)
    a = p.parse_args()
    torch.set_num_threads(1)
    ctx = distributed.init(a.distributed)
    cfg = config(
        a.output, steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, save_every=a.save_every,
        dropout=a.dropout, resume=a.resume, distributed=a.distributed, loss_chunk=a.loss_chunk,
        packing=False if a.no_packing else None, mode=a.mode, beta=a.beta,
    )  # fmt: skip
    model = model_with_adapter(
        dropout=a.dropout, checkpointing=a.gradient_checkpointing, quantized=a.quantized_model, moe=a.moe
    )
    if not a.quantized_model:
        model.to(a.device or ctx.device)
    if a.sleep:
        plain = loop.causal_lm_loss

        def slow(*args, **kw):
            time.sleep(a.sleep)
            return plain(*args, **kw)

        loop.causal_lm_loss = slow
    if a.stop_after:
        stop_after(a.stop_after)
    memory = base_memory_probe(model) if a.report_memory else None
    try:
        rows = examples(vocab=model.config.vocab_size) if a.mode == "sft" else preference_examples(a.mode)
        loop.fit(model, rows, cfg, pad_id=0, ctx=ctx)
    except KeyboardInterrupt:
        return 130
    if memory is not None:
        memory["rest"] = held_base_bytes(model)
        with open(os.path.join(a.output, f"memory-rank{ctx.rank}.json"), "w") as f:
            json.dump(memory, f)
    with distributed.engine_of(model).gathered_trainable():  # FSDP: the adapter's tensors in full
        if ctx.is_main:
            lorakit.save_adapter(model, os.path.join(a.output, "adapter"))
    distributed.barrier(ctx)
    distributed.close(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
