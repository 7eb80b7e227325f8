"""`--no-recompute-inputs` and `--offload-activations` (issue 11): from the command line to the layers and the
loop, the same training either way, and the offload refused where it cannot help."""

from __future__ import annotations

import pytest
import torch

import lorakit.fast.recompute as recompute
from lorakit.adapters import lora_layers
from lorakit.cli import build_parser, main
from lorakit.train import TrainConfig, checkpoint, loop, metrics
from lorakit.train.cmd_train import resolve
from lorakit.train.loop import fit
from train_tiny import config, examples, model_with_adapter


def _train(tmp_path, name, **options):
    """Three steps of fit on the tiny Llama: (model, per-step losses)."""
    model = model_with_adapter()
    cfg = config(tmp_path / name, steps=3, **options)
    fit(model, examples(16), cfg, pad_id=0)
    return model, [r["loss"] for r in metrics.read(tmp_path / name / "metrics.jsonl") if "loss" in r]


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_training(a, b):
    (model_a, losses_a), (model_b, losses_b) = a, b
    assert len(losses_a) == 3 and losses_a == losses_b
    ta, tb = _trained(model_a), _trained(model_b)
    assert ta.keys() == tb.keys() and len(ta) > 10
    for n in ta:
        assert torch.equal(ta[n], tb[n]), n


def test_flags_parse_into_the_config_and_its_saved_form():
    parse = build_parser().parse_args
    plain = resolve(parse(["train", "--data", "d.jsonl"]))
    assert plain.recompute_inputs is True and plain.offload_activations is False
    cfg = resolve(parse(["train", "--data", "d.jsonl", "--no-recompute-inputs", "--offload-activations"]))
    assert cfg.recompute_inputs is False and cfg.offload_activations is True
    assert resolve(parse(["train", "--data", "d.jsonl", "--recompute-inputs"])).recompute_inputs is True
    saved = cfg.to_dict()
    assert saved["recompute_inputs"] is False and saved["offload_activations"] is True
    # Neither changes the numbers, so a run may resume with either changed.
    assert not {"recompute_inputs", "offload_activations"} & set(checkpoint.MUST_MATCH)
    with pytest.raises(ValueError, match=r"--recompute-inputs='no' is invalid: expected true or false"):
        TrainConfig(recompute_inputs="no")
    with pytest.raises(ValueError, match=r"--offload-activations=1 is invalid: expected true or false"):
        TrainConfig(offload_activations=1)


def test_no_recompute_inputs_reaches_every_layer_and_trains_the_same(tmp_path, monkeypatch):
    rebuilt = []
    real = recompute.source
    monkeypatch.setattr(recompute, "source", lambda x: rebuilt.append(1) or real(x))
    default = _train(tmp_path, "default")
    assert rebuilt  # the default tries to rebuild the LoRA inputs
    assert all(layer.recompute_input for _, layer in lora_layers(default[0]))
    rebuilt.clear()
    saved = _train(tmp_path, "saved", recompute_inputs=False)
    layers = [layer for _, layer in lora_layers(saved[0])]
    assert len(layers) > 10 and not any(layer.recompute_input for layer in layers)
    assert not rebuilt  # every layer saved its input instead
    _assert_same_training(default, saved)


def test_offload_activations_runs_each_forward_offloaded_and_trains_the_same(tmp_path, monkeypatch):
    """`fit` offloads on any device (on a CPU it copies, bit for bit); `lorakit train` refuses it there."""
    made = []
    real = loop.offload_activations

    def recording(model):  # every tensor offloaded (the tiny model's are all under the 64 KiB default)
        made.append(real(model, min_bytes=0))
        return made[-1]

    monkeypatch.setattr(loop, "offload_activations", recording)
    default = _train(tmp_path, "default", packing=False)
    assert not made
    offloaded = _train(tmp_path, "offloaded", packing=False, offload_activations=True)
    assert len(made) == 3 * 2  # one per micro-batch: 3 steps x 2 accumulated (padded)
    assert all(m.stats["tensors"] > 0 for m in made)  # activations were moved, not kept in place
    _assert_same_training(default, offloaded)


def test_offload_refused_on_cpu_before_the_model_loads_and_under_fsdp(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    argv = ["train", "--model", str(missing), "--data", str(tmp_path / "d.jsonl"), "--device", "cpu"]
    assert main([*argv, "--output", str(tmp_path / "o"), "--offload-activations"]) == 1
    err = capsys.readouterr().err
    assert "--offload-activations moves what backward needs" in err and "trains on cpu" in err
    assert "no-such-model" not in err  # refused before the model is looked for
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="--offload-activations with --distributed fsdp is not supported"):
        fit(model_with_adapter(), examples(4), config(tmp_path / "f", offload_activations=True,
                                                      distributed="fsdp"), pad_id=0)  # fmt: skip
