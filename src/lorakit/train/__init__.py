"""Training: `lorakit train` for SFT and continual pre-training, plus eval / generate / merge.

Layout (one file per concern):
    config.py     TrainConfig: every option of `lorakit train`, from YAML and command-line overrides
    loop.py       the training loop, read top to bottom
    loop_records.py  what the loop does around its steps: start or resume, report, evaluate, checkpoint, stop
    scaffold.py   what every mode's run does before and after its fit (SFT / CPT, DPO / ORPO / KTO, GRPO)
    order.py      the data order of a run: a pure function of (seed, step)
    packing.py    padding-free packed micro-batches (rows concatenated, each attending only to itself)
    row_attention.py  packed rows' attention computed row by row (sdpa is_causal per row segment)
    optim.py      the optimizer and learning-rate schedule (LoRA+ included)
    compile.py    `--compile`: torch.compile of the transformer body, for training only
    checkpoint.py atomic checkpoints and exact resume
    metrics.py    metrics.jsonl, the progress line, loss.png
    tracking.py   experiment tracking (tensorboard, mlflow, wandb, trackio), every backend offline
    signals.py    stopping cleanly on Ctrl-C / SIGTERM
    preference/   DPO / ORPO / KTO and GRPO
    sweep.py      one run per rank on the same data (`lorakit sweep`)
    run_defaults.py  what a run recorded beside its adapter, as defaults for later commands
    eva_init.py   `--init eva`: the adapter re-made with EVA from the run's training rows
    distributed.py  DDP / FSDP2 over torchrun processes (gloo / NCCL), one or more nodes
    prepare.py    model + adapter set-up: quantization, trainable embeddings, new tokens
    evaluate.py   loss, perplexity and greedy exact match
    commands.py   registers the subcommands (cmd_*.py), each a thin layer over the library
"""

from .config import TrainConfig


def run(cfg: TrainConfig) -> dict:
    """Train as `cfg` says and write the adapter and the run's records; see `lorakit.train.loop.run`."""
    from .loop import run as _run

    return _run(cfg)


__all__ = ["TrainConfig", "run"]
