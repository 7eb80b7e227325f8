"""examples/trainer_example.py: lorakit inside transformers.Trainer, run on a tiny model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from conftest import tiny_llama, tiny_tokenizer
from lorakit.models import load_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trainer_example.py"


def test_trainer_example_trains_and_saves_an_adapter(tmp_path):
    tok = tiny_tokenizer()
    base = tiny_llama(vocab=len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    spec = importlib.util.spec_from_file_location("trainer_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(
        ["--model", str(tmp_path / "base"), "--steps", "6", "--lr", "1e-2", "--output", str(tmp_path / "ad")]
    )
    assert len(out["losses"]) >= 2 and out["losses"][-1] < out["losses"][0]
    # The saved adapter loads back and changes the model's outputs (B was trained away from zero).
    model, _ = load_model(str(tmp_path / "base"), adapter=tmp_path / "ad")
    plain, _ = load_model(str(tmp_path / "base"))
    ids = torch.tensor([tok("What is 2 plus 3?")["input_ids"]])
    with torch.no_grad():
        assert (model(ids).logits - plain(ids).logits).abs().max() > 1e-4
