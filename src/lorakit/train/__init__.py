"""Training: `lorakit train` for SFT and continual pre-training, plus eval / generate / merge.

Layout (one file per concern):
    config.py     TrainConfig: every option of `lorakit train`, from YAML and command-line overrides
    loop.py       the training loop, read top to bottom
    checkpoint.py atomic checkpoints and exact resume
    metrics.py    metrics.jsonl, the progress line, loss.png
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
