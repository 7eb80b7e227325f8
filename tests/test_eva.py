"""EVA (lorakit.eva) against PEFT's implementation on the same tiny model and batches: the same A, the same
redistributed ranks and alphas, and an adapter file PEFT loads to the same outputs."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.eva import add_eva_adapter, eva_components
from lorakit.inject import find_targets

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TAU = 0.9  # PEFT's default is 0.99; 0.9 converges in fewer batches (seconds on a busy 2-core CI machine)


def batches(n: int = 6, b: int = 4, t: int = 16, seed: int = 0) -> list[dict]:
    """collate()-like batches: one row padded at its end, the first 4 tokens without a loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (b, t), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        labels = ids.clone()
        labels[:, :4] = -100
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def peft_eva(rho: float):
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    cfg = PeftConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                     eva_config=EvaConfig(rho=rho, tau=TAU))  # fmt: skip
    model = get_peft_model(tiny_llama(), cfg)
    initialize_lora_eva_weights(model, batches(), show_progress_bar=False)
    return model


@pytest.mark.parametrize("rho", [pytest.param(1.0, marks=pytest.mark.slow), 2.0])
def test_eva_equals_peft_on_the_same_model_and_batches(rho, ids, tmp_path):
    ref = peft_eva(rho)
    ours = tiny_llama()
    result = add_eva_adapter(
        ours, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS), batches(), rho=rho, tau=TAU
    )
    assert result.converged
    ref_layers = {n: m for n, m in ref.base_model.model.named_modules() if hasattr(m, "lora_A")}
    ours_layers = dict(lorakit.adapters.lora_layers(ours))
    assert ours_layers.keys() == ref_layers.keys()  # the same modules kept (rank 0 ones dropped)
    ranks = []
    for n, layer in ours_layers.items():
        A_ref = ref_layers[n].lora_A["default"].weight
        ranks.append(A_ref.shape[0])
        torch.testing.assert_close(layer.lora["default"].A, A_ref, atol=1e-5, rtol=0)  # same A, same sign
        assert float(layer.lora["default"].B.abs().max()) == 0.0
        assert layer.lora["default"].scale == pytest.approx(ref_layers[n].scaling["default"])
    if rho > 1:
        assert len(set(ranks)) > 1 and sum(ranks) <= 4 * len(ranks)  # redistributed, within the budget
    else:
        assert set(ranks) == {4}
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, tiny_llama()(ids).logits, atol=1e-6, rtol=0)  # B = 0
    # The saved file (rank_pattern / alpha_pattern per module) loads in PEFT with the same factors.
    from peft import PeftModel

    lorakit.save_adapter(ours, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for n, m in loaded.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            torch.testing.assert_close(m.lora_A["default"].weight, ours_layers[n].lora["default"].A)
            assert m.scaling["default"] == pytest.approx(ours_layers[n].lora["default"].scale)


def test_eva_components_stop_after_max_batches():
    model = tiny_llama()
    names = find_targets(model, lorakit.LoraConfig(r=4, targets=TARGETS))
    bounded = eva_components(model, batches(), {n: 4 for n in names}, rho=2.0, tau=TAU, max_batches=2)
    assert not bounded.converged and bounded.batches == 2
    assert sum(bounded.ranks.values()) == 4 * len(names)  # the budget is kept even unconverged
    for A in bounded.components.values():  # orthonormal rows: principal directions
        torch.testing.assert_close(A.float() @ A.float().T, torch.eye(A.shape[0]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="rho=0.5"):
        eva_components(model, batches(), {names[0]: 4}, rho=0.5)
    with pytest.raises(ValueError, match=r"\['model.embed_tokens'\] are not Linear"):
        add_eva_adapter(model, lorakit.LoraConfig(r=2, targets=["embed_tokens", "q_proj"]), batches(1))
    assert not list(lorakit.adapters.lora_layers(model))  # refused before anything was added


@pytest.mark.slow  # a whole `lorakit train` run with EVA until convergence at tau 0.99 (~25 s on a busy CPU)
def test_train_init_eva_uses_the_training_rows(tmp_path, capsys):
    import json

    from conftest import tiny_tokenizer
    from lorakit.data import collate, load_dataset
    from lorakit.train import TrainConfig, run

    tok = tiny_tokenizer()
    tiny_llama(vocab=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    rows = [{"prompt": f"say {i}", "completion": f"the number {i} twice: {i} {i}"} for i in range(12)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(model=str(tmp_path / "base"), data=str(data), output=str(tmp_path / "out"), rank=4,
                      targets="q_proj,v_proj,o_proj", steps=1, batch_size=4, init="eva")  # fmt: skip
    run(cfg)
    assert "eva: A from the layer inputs of" in capsys.readouterr().err
    # The saved ranks are EVA's on the same batches (the run's rows, --batch-size at a time, in file order).
    examples = load_dataset(data, tok, max_len=cfg.max_len).examples
    batches = [collate(examples[i : i + 4], tok.pad_token_id) for i in range(0, 12, 4)]
    model = tiny_llama(vocab=len(tok))
    names = find_targets(model, lorakit.LoraConfig(r=4, targets=["q_proj", "v_proj", "o_proj"]))
    want = eva_components(model, batches, {n: 4 for n in names}, rho=2.0, tau=0.99, max_batches=64).ranks
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    got = {n: saved["rank_pattern"].get(n.replace(".", "\\."), saved["r"]) for n in names if want[n]}
    assert got == {n: k for n, k in want.items() if k} and len(set(want.values())) > 1
