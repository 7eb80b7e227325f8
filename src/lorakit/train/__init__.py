"""Training: `lorakit train` for SFT and continual pre-training, plus eval / generate / merge.

Layout (one file per concern):
    config.py     TrainConfig: every option of `lorakit train`, from YAML and command-line overrides
    loop.py       the training loop, read top to bottom
    checkpoint.py atomic checkpoints and exact resume
    prepare.py    model + adapter set-up: quantization, trainable embeddings, new tokens
    evaluate.py   loss, perplexity and greedy exact match
    commands.py   registers the subcommands (cmd_*.py), each a thin layer over the library
"""

from .config import TrainConfig

__all__ = ["TrainConfig"]
