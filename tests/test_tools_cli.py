"""Adapter tools through the CLI: inspect fields, reports, refusals and bad files with nothing written."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.cli import main
from lorakit.io.files import CONFIG_NAME, WEIGHTS_NAME


def save(path, cfg, seed=1, model=None):
    model = model or tiny_llama()
    lorakit.add_adapter(model, cfg)
    randomize_adapters(model, std=0.3, seed=seed)
    lorakit.save_adapter(model, path)
    return model


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


CFG = lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})


def test_inspect_json_fields(tmp_path, capsys):
    save(tmp_path / "a", CFG)
    code, out, _ = run(
        capsys, "inspect", tmp_path / "a", "--json", "--spectrum", "--plot", tmp_path / "s.png"
    )
    assert code == 0
    info = json.loads(out)
    assert info["fingerprint"] == lorakit.io.read_adapter(tmp_path / "a").metadata["lorakit.fingerprint"]
    assert info["target_modules"] == ["q_proj", "v_proj"] and info["r"] == 4 and info["alpha"] == 8
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    assert info["modules"][q] == {"rank": 4, "alpha": 8, "scale": 2.0, "shape": [32, 32], "params": 256,
                                  "kind": "linear"}  # fmt: skip
    assert info["modules"][v]["rank"] == 2 and info["modules"][v]["shape"] == [16, 32]
    assert info["rank_counts"] == {"2": 2, "4": 2}
    assert info["lora_params"] == 2 * (4 * 32 + 32 * 4) + 2 * (2 * 32 + 16 * 2) == info["total_params"]
    assert info["file_bytes"] == sum((tmp_path / "a" / f).stat().st_size for f in (CONFIG_NAME, WEIGHTS_NAME))
    assert info["dtypes"] == ["float32"]
    # Spectrum: the singular values of s·B·A and the energy shares, against torch on the dense ΔW.
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path / "a")
    w = model.get_submodule(q).lora["default"]
    S = torch.linalg.svdvals((w.B.detach().double() @ w.A.detach().double()) * w.scale)
    assert S[4:].max() < 1e-12 * S[0]  # rank 4
    S = S[:4]
    spec = info["spectrum"][q]
    torch.testing.assert_close(torch.tensor(spec["singular_values"], dtype=torch.float64), S)
    kept = (S**2).cumsum(0) / (S**2).sum()
    torch.testing.assert_close(torch.tensor(spec["energy"], dtype=torch.float64), kept)
    assert spec["rank_for_energy"] == int((kept < 0.9).sum()) + 1
    assert info["suggested_rank"] == max(s["rank_for_energy"] for s in info["spectrum"].values())
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_text_and_resize_combine_convert_reports(tmp_path, capsys):
    save(tmp_path / "a", CFG)
    code, out, _ = run(capsys, "inspect", tmp_path / "a", "--spectrum")
    assert code == 0 and "suggested rank" in out and "model.layers.1.self_attn.v_proj" in out
    code, out, _ = run(capsys, "resize", tmp_path / "a", "--rank", "1", "-o", tmp_path / "r", "--json")
    rows = json.loads(out)["modules"]
    assert code == 0 and [r["rank_after"] for r in rows] == [1, 1, 1, 1]
    code, out, _ = run(
        capsys, "combine", tmp_path / "a", tmp_path / "r", "--weights", "1", "-1", "-o", tmp_path / "c"
    )
    assert code == 0 and "relative error max" in out
    code, out, _ = run(capsys, "convert", tmp_path / "c", "--dtype", "bf16", "-o", tmp_path / "h")
    assert code == 0 and "bf16" in out
    # inspect reads all of them back
    assert json.loads(run(capsys, "inspect", tmp_path / "h", "--json")[1])["dtypes"] == ["bfloat16"]


def _break(path, how):
    if how == "missing_dir":
        return path / "nope"
    if how == "no_weights":
        (path / WEIGHTS_NAME).unlink()
    elif how == "bad_json":
        (path / CONFIG_NAME).write_text("{ not json")
    elif how == "truncated":
        data = (path / WEIGHTS_NAME).read_bytes()
        (path / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    elif how == "wrong_rank":
        cfg = json.loads((path / CONFIG_NAME).read_text())
        cfg["rank_pattern"] = {}
        (path / CONFIG_NAME).write_text(json.dumps(cfg))
    elif how == "not_lora":
        cfg = json.loads((path / CONFIG_NAME).read_text())
        cfg["peft_type"] = "IA3"
        (path / CONFIG_NAME).write_text(json.dumps(cfg))
    return path


MESSAGES = {
    "missing_dir": "not an adapter directory",
    "no_weights": "adapter_model.safetensors: missing",
    "bad_json": "not valid JSON",
    "truncated": "corrupt or truncated",
    "wrong_rank": "do not have rank 4",
    "not_lora": "expected 'LORA'",
}


@pytest.mark.parametrize("how", sorted(MESSAGES))
@pytest.mark.parametrize("command", ["inspect", "resize", "combine", "convert"])
def test_bad_adapters_clear_error_nothing_written(tmp_path, capsys, how, command):
    save(tmp_path / "a", CFG)
    save(tmp_path / "good", CFG, seed=2)
    bad = _break(tmp_path / "a", how)
    out_dir = tmp_path / "out"
    argv = {
        "inspect": ["inspect", bad, "--plot", tmp_path / "p.png"],
        "resize": ["resize", bad, "--rank", "2", "-o", out_dir],
        "combine": ["combine", tmp_path / "good", bad, "-o", out_dir],
        "convert": ["convert", bad, "--dtype", "bf16", "-o", out_dir],
    }[command]
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert err.startswith("lorakit: error: ") and MESSAGES[how] in err and str(bad) in err
    assert not out_dir.exists() and not (tmp_path / "p.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "good"]  # no temporary leftovers


def test_refusals(tmp_path, capsys):
    save(tmp_path / "a", CFG)
    save(tmp_path / "dora", CFG.replace(use_dora=True))
    save(tmp_path / "saved", CFG.replace(modules_to_save=["lm_head"]))
    other = tiny_llama(seed=5)
    save(tmp_path / "other_base", CFG, model=other)
    cases = [
        (["combine", tmp_path / "a", tmp_path / "dora", "-o", tmp_path / "o"], "is a DoRA adapter"),
        (["combine", tmp_path / "a", tmp_path / "saved", "-o", tmp_path / "o"], "carries full weights"),
        (
            ["combine", tmp_path / "a", tmp_path / "other_base", "-o", tmp_path / "o"],
            "different base weights",
        ),
        (
            ["combine", tmp_path / "a", "--weights", "1", "2", "-o", tmp_path / "o"],
            "2 weights for 1 adapters",
        ),
        (["combine", tmp_path / "a", "--method", "svd", "-o", tmp_path / "o"], "needs --rank"),
        (
            ["combine", tmp_path / "a", "--rank", "2", "-o", tmp_path / "o"],
            "svd and the task-arithmetic methods only",
        ),
        (["resize", tmp_path / "a", "--rank", "0", "-o", tmp_path / "o"], "positive integer"),
        (["resize", tmp_path / "a", "--rank", "2", "-o", tmp_path / "a"], "is an input adapter"),
        (["resize", tmp_path / "a", "--rank", "2", "-o", tmp_path / "saved"], "pass --overwrite"),
    ]
    for argv, msg in cases:
        before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
        code, _, err = run(capsys, *argv)
        assert code == 1 and msg in err, (argv, err)
        assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    # --force combines different bases and drops the fingerprint; --overwrite replaces.
    assert (
        run(capsys, "combine", tmp_path / "a", tmp_path / "other_base", "--force", "-o", tmp_path / "o")[0]
        == 0
    )
    assert "lorakit.fingerprint" not in lorakit.io.read_adapter(tmp_path / "o").metadata
    assert run(capsys, "resize", tmp_path / "a", "--rank", "1", "-o", tmp_path / "o", "--overwrite")[0] == 0
    assert lorakit.io.read_adapter(tmp_path / "o").config["r"] == 1


def test_resize_keeps_dora_magnitude_and_saved_modules(tmp_path, ids):
    from peft import PeftModel

    save(tmp_path / "a", CFG.replace(use_dora=True, modules_to_save=["lm_head"]))
    code = main(["resize", str(tmp_path / "a"), "--rank", "4", "-o", str(tmp_path / "o")])
    assert code == 0
    src, dst = lorakit.io.read_adapter(tmp_path / "a"), lorakit.io.read_adapter(tmp_path / "o")
    for k, t in src.tensors.items():
        if "magnitude" in k or "lm_head" in k:
            assert torch.equal(dst.tensors[k], t)
    # At full rank the resized adapter is the same adapter: same logits, in lorakit and PEFT.
    ref = tiny_llama()
    lorakit.load_adapter(ref, tmp_path / "a")
    ours = tiny_llama()
    lorakit.load_adapter(ours, tmp_path / "o")
    theirs = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "o"))
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(ids).logits, want, atol=1e-5, rtol=1e-5)
