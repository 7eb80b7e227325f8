"""`lorakit merge`, `lorakit eval`, `lorakit generate` on tiny models in temporary directories."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import bnb_unusable, quantizable_llama_dir, randomize_adapters, tiny_llama, tiny_tokenizer
from lorakit.cli import main
from lorakit.generation import format_prompt
from lorakit.models import load_model
from lorakit.train.config import TrainConfig
from lorakit.train.prepare import prepare, save_prepared

PROMPT = "hi there"


@pytest.fixture(params=["plain", "new-tokens-tied"])
def trained(request, tmp_path):
    """(base dir, adapter dir): a tiny Llama and a randomized adapter (optionally with new tokens, tied head)."""
    tok = tiny_tokenizer()
    tied = request.param != "plain"
    tiny_llama(vocab=len(tok), tie=tied).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    cfg = TrainConfig(model=str(tmp_path / "base"), rank=4)
    if tied:
        (tmp_path / "new.txt").write_text("<x1>\n<x2>\n")
        cfg.new_tokens = str(tmp_path / "new.txt")
    p = prepare(cfg)
    randomize_adapters(p.model, std=0.3)
    save_prepared(p, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def _ids(tokenizer, text="ab<x1>cd<x2> e"):
    return torch.tensor([tokenizer(text)["input_ids"]])


def test_merge_cli_output_equals_base_plus_adapter(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = trained
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(out)]) == 0
    assert "written to" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    merged_tok = AutoTokenizer.from_pretrained(str(out))
    model, tokenizer = load_model(str(base), adapter=adapter)
    ids = _ids(tokenizer)
    assert torch.equal(_ids(merged_tok), ids)
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(merged(ids).logits, ref, atol=1e-5, rtol=0)
        # The adapter changes the outputs: the comparison is not base vs base.
        plain, _ = load_model(str(base))
        if plain.get_input_embeddings().num_embeddings == ref.shape[-1]:
            assert (plain(ids).logits - ref).abs().max() > 1e-3
    assert not any(n for n in map(str, merged.state_dict()) if "lora" in n)

    # An existing output is never overwritten without --overwrite; a failed merge leaves nothing behind.
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert (
        main(
            [
                "merge",
                "--model",
                str(base),
                "--adapter",
                str(tmp_path / "nope"),
                "--output",
                str(tmp_path / "m2"),
            ]
        )
        == 1
    )
    assert "nope" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.skipif(bool(bnb_unusable()), reason=bnb_unusable() or "ok")
def test_merge_from_quantized_base(tmp_path, capsys):
    """A merge from a QLoRA base writes exactly dequantize(W_nf4) + ΔW, and that model is the one trained.

    Not compared with the QLoRA model's eval-mode logits: bitsandbytes >= 0.50 repacks NF4 weights on
    AVX512-BF16 CPUs in eval/no-grad forwards and multiplies in bf16 there (~1e-3 off fp32), so that figure
    measures the kernel, not the merge. The training forward (dequantize, then an fp32 matmul) is the math
    the adapter was trained under, and it is compared tightly.
    """
    import bitsandbytes as bnb
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    quantizable_llama_dir(tmp_path / "base")
    p = prepare(TrainConfig(model=str(tmp_path / "base"), rank=4, quantize="4bit", dropout=0.0))
    randomize_adapters(p.model, std=0.3)
    save_prepared(p, tmp_path / "adapter")
    out = tmp_path / "merged"
    argv = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--output", str(out), "--quantize", "4bit"]) == 0
    assert "dequantized" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert all(q.dtype == torch.float32 for q in merged.parameters())

    # 1. Weights: every adapted matrix is dequantize(W) + s·B·A, read from the PEFT file (fp32 rounding only).
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    quantized = dict(p.model.named_modules())
    merged_modules = dict(merged.named_modules())
    checked = 0
    for key, A in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        B = tensors[key.replace("lora_A", "lora_B")]
        w = quantized[module].weight
        expected = bnb.functional.dequantize_4bit(w.data, w.quant_state).float() + scale * (B @ A)
        torch.testing.assert_close(merged_modules[module].weight.detach(), expected, atol=1e-6, rtol=0)
        checked += 1
    assert checked == 14  # 7 projections x 2 layers: all-linear minus the head

    # 2. Logits: the merged model gives the QLoRA training forward's logits (dequantized NF4 + the adapter).
    ids = _ids(p.tokenizer, "hello")
    p.model.train()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, p.model(ids).logits, atol=1e-5, rtol=1e-5)


def _greedy(model, tokenizer, prompt, n):
    ids = torch.tensor([format_prompt(tokenizer, prompt)])
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True)


def test_generate_cli_greedy_matches_reference(trained, capsys):
    base, adapter = trained
    model, tokenizer = load_model(str(base), adapter=adapter)
    expected = _greedy(model, tokenizer, PROMPT, 6)
    argv = ["generate", "--model", str(base), "--adapter", str(adapter), "--max-new-tokens", "6", PROMPT]
    assert main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"
    # Sampling is seeded: the same seed gives the same text.
    sampled = [
        main([*argv, "--temperature", "1.5", "--seed", "3"]) or capsys.readouterr().out for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    assert main([*argv, "--temperature", "-1"]) == 1
    assert "temperature" in capsys.readouterr().err


def test_eval_cli_json_matches_evaluate(trained, tmp_path, capsys):
    from lorakit.data import load_dataset

    evaluate = pytest.importorskip(
        "lorakit.train.evaluate", reason="needs lorakit.train.evaluate (H1)"
    ).evaluate

    base, adapter = trained
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}b"}]}
        for i in range(5)
    ]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["eval", "--model", str(base), "--adapter", str(adapter), "--data", str(data), "--json"]
    assert main([*argv, "--batch-size", "2"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "exact_match"} <= set(got)
    model, tokenizer = load_model(str(base), adapter=adapter)
    ref = evaluate(model, tokenizer, load_dataset(data, tokenizer, mode="sft"), batch_size=2)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    assert got["exact_match"] == ref["exact_match"]
    assert got["n"] == 5

    # Text rows evaluate as CPT data (no exact match); the adapter changes the loss.
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"some text number {i} here"}) + "\n" for i in range(4)))
    assert main(["eval", "--model", str(base), "--adapter", str(adapter), "--data", str(text), "--json"]) == 0
    with_adapter = json.loads(capsys.readouterr().out)
    assert with_adapter["exact_match"] is None and with_adapter["loss"] > 0
    assert main(["eval", "--model", str(base), "--data", str(text), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] != with_adapter["loss"]


def test_sampled_generate_text_leaves_the_global_rng_alone():
    """generate_text seeds its sampling in a fork of torch's RNG: the caller's stream is untouched."""
    from lorakit.generation import generate_text

    model, tok = tiny_llama(), tiny_tokenizer()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = generate_text(model, tok, PROMPT, max_new_tokens=4, temperature=1.0, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert generate_text(model, tok, PROMPT, max_new_tokens=4, temperature=1.0, seed=5) == first
