"""Issue 16, "dead ends and confusing output": the CLI's messages, defaults and file modes."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from conftest import randomize_adapters, tiny_gpt2, tiny_llama, tiny_tokenizer
from lorakit.cli import main
from lorakit.train.config import TrainConfig
from lorakit.train.prepare import prepare, save_prepared


@pytest.fixture
def run_dirs(tmp_path):
    """(base, other base of the same architecture, adapter dir trained on base)."""
    tok = tiny_tokenizer()
    for name, seed in (("base", 0), ("other", 1)):
        tiny_llama(seed=seed, vocab=len(tok)).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    p = prepare(TrainConfig(model=str(tmp_path / "base"), rank=2, targets="q_proj,v_proj"))
    randomize_adapters(p.model, std=0.3)
    save_prepared(p, tmp_path / "adapter")
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"x{i}", "completion": f"y{i}"}) + "\n" for i in range(3)))
    return tmp_path / "base", tmp_path / "other", tmp_path / "adapter", data


def test_fingerprint_message_names_the_flag_and_the_flag_loads(run_dirs, capsys, tmp_path):
    base, other, adapter, data = run_dirs
    common = ["--model", str(other), "--adapter", str(adapter)]
    assert main(["generate", "hi", *common, "--max-new-tokens", "2"]) == 1
    assert "--ignore-fingerprint" in capsys.readouterr().err
    assert main(["generate", "hi", *common, "--max-new-tokens", "2", "--ignore-fingerprint"]) == 0
    assert main(["eval", *common, "--data", str(data), "--json", "--ignore-fingerprint"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 3
    assert main(["merge", *common, "--output", str(tmp_path / "m")]) == 1
    assert main(["merge", *common, "--output", str(tmp_path / "m"), "--ignore-fingerprint"]) == 0
    import argparse

    from lorakit.serve.commands import register  # serve takes the flag too

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    args = sub.choices["serve"].parse_args(["--ignore-fingerprint"])
    assert args.ignore_fingerprint and args.device == "auto"


def test_adapter_of_another_architecture_gets_one_short_message(tmp_path):
    import lorakit

    gpt2 = tiny_gpt2()
    lorakit.add_adapter(gpt2, lorakit.LoraConfig(r=2, targets="all-linear"))
    lorakit.save_adapter(gpt2, tmp_path)
    n_modules = len(list(lorakit.adapters.lora_layers(gpt2)))
    with pytest.raises(lorakit.AdapterFileError) as err:
        lorakit.load_adapter(tiny_llama(), tmp_path)
    msg = str(err.value)
    assert f"made for a different base model ({n_modules} of its modules are missing" in msg
    assert "e.g. base_model" not in msg and "transformer.h.0." in msg and f"and {n_modules - 3} more" in msg
    assert len(msg) < 400


def test_exact_match_generation_reports_rows_and_eta(run_dirs):
    from lorakit.data import load_dataset
    from lorakit.models import load_model
    from lorakit.train.evaluate import evaluate

    base, _, adapter, data = run_dirs
    model, tok = load_model(str(base), adapter=adapter)
    out = io.StringIO()
    evaluate(model, tok, load_dataset(data, tok), batch_size=2, max_new_tokens=2, progress=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("exact match: generating: 2/3 rows") and "ETA" in lines[0]
    assert lines[-1].startswith("exact match: generating: 3/3 rows")


def _text_data(path, n=5):
    path.write_text("".join(json.dumps({"text": f"document number {i} " * 3}) + "\n" for i in range(n)))
    return path


def test_text_data_described_as_documents_tokens_blocks(tmp_path):
    from lorakit.data import load_dataset
    from lorakit.train.evaluate import describe_dataset

    tok = tiny_tokenizer()
    ds = load_dataset(_text_data(tmp_path / "t.jsonl"), tok, mode="cpt", max_len=16)
    tokens = sum(len(e.input_ids) for e in ds.examples)
    assert (
        describe_dataset(ds)
        == f"5 documents, {tokens:,} tokens in {len(ds.examples)} blocks of up to 16 tokens (text)"
    )
    assert len(ds.examples) > 5


def test_eval_takes_max_len_and_mode_from_the_runs_train_config(run_dirs, capsys):
    from lorakit.data import load_dataset
    from lorakit.models import load_model
    from lorakit.train.evaluate import evaluate

    base, _, adapter, _ = run_dirs
    text = _text_data(adapter.parent / "t.jsonl")
    TrainConfig(model=str(base), mode="cpt", max_len=16).save(adapter / "train_config.yaml")
    assert main(["eval", "--model", str(base), "--adapter", str(adapter), "--data", str(text), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model, tok = load_model(str(base), adapter=adapter)
    want = evaluate(model, tok, load_dataset(text, tok, mode="cpt", max_len=16))
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6) and got["n"] == want["n"]
    assert got["loss"] != pytest.approx(
        evaluate(model, tok, load_dataset(text, tok, mode="cpt"))["loss"], rel=1e-6
    )
    # Not JSON: it says where the defaults came from; a flag still wins.
    assert main(["eval", "--model", str(base), "--adapter", str(adapter), "--data", str(text)]) == 0
    captured = capsys.readouterr()
    assert "train_config.yaml: --max-len 16, --mode cpt" in captured.err
    assert "blocks of up to 16 tokens" in captured.out
    assert (
        main(
            ["eval", "--model", str(base), "--adapter", str(adapter), "--data", str(text), "--max-len", "32"]
        )
        == 0
    )
    assert "blocks of up to 32 tokens" in capsys.readouterr().out


def test_typo_in_a_train_flag_shows_train_usage_and_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--stpes", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lorakit train") and "--stpes (did you mean --steps?)" in err


def test_model_path_that_does_not_exist_says_path_not_found(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    assert main(["eval", "--model", "./no-such-model", "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert "model path './no-such-model' not found" in err and "download" not in err
    assert main(["eval", "--model", "org/some-model", "--data", str(data)]) == 1
    assert "huggingface-cli download" in capsys.readouterr().err  # a hub id still gets the hint


def test_rerun_into_a_finished_run_is_refused_without_overwrite(run_dirs, capsys):
    from lorakit.train.prepare import check_output

    _, _, adapter, _ = run_dirs
    assert main(["train", "--data", "x.jsonl", "--output", str(adapter)]) == 1
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "pass --overwrite" in err
    check_output(TrainConfig(output=str(adapter), overwrite=True))
    check_output(TrainConfig(output=str(adapter / "new")))


def test_help_shows_defaults_and_documents_eval_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("LoRA rank r (default 16)", "(default 0.0002)", "micro-batch (per process) (default 8)",
                 "packed block (cpt) (default 512)", "dropout on the LoRA branch input (default 0.0)"):  # fmt: skip
        assert text in out, text
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--batch-size BATCH_SIZE rows",
        "--max-len MAX_LEN tokens",
        "--max-new-tokens MAX_NEW_TOKENS most",
    ):
        assert flag in out, flag


@pytest.mark.parametrize("command", ["train", "eval", "generate", "serve"])
def test_one_device_option_everywhere(command):
    from lorakit.cli import _subparsers, build_parser
    from lorakit.models import resolve_device

    parser = _subparsers(build_parser())[command]
    action = next(a for a in parser._actions if a.dest == "device")
    assert "auto" in action.help
    assert action.default == "auto" or TrainConfig().device == "auto"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device 'gpu0' is invalid"):
        resolve_device("gpu0")


def test_help_does_not_import_torch_or_transformers():
    code = (
        "import sys, contextlib, io\nfrom lorakit.cli import main\n"
        "for c in ([], ['train'], ['eval'], ['serve'], ['inspect']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main([*c, '--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_still_resolve_lazily():
    import lorakit
    import lorakit.merge  # the submodule import must not replace the function of the same name

    assert callable(lorakit.merge) and lorakit.merge.__module__ == "lorakit.merge"
    assert {"add_adapter", "LoraConfig", "load_adapter"} <= set(dir(lorakit))
    with pytest.raises(AttributeError):
        lorakit.no_such_name  # noqa: B018


def test_inspect_sorts_modules_naturally(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.tools.inspect import inspect_adapter, natural_key

    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=12,
                      num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=1, targets=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    layers = [int(n.split(".")[2]) for n in inspect_adapter(tmp_path)["modules"]]
    assert layers == list(range(12))
    assert sorted(["a.10.b", "a.2.b", "a.1.c"], key=natural_key) == ["a.1.c", "a.2.b", "a.10.b"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_safetensors_follow_the_umask(run_dirs, tmp_path, mask):
    from lorakit.export import export_merged
    from lorakit.models import load_model

    base, _, adapter, _ = run_dirs
    old = os.umask(mask)
    try:
        model, _ = load_model(str(base), adapter=adapter)
        import lorakit

        lorakit.save_adapter(model, tmp_path / "saved")
        export_merged(str(base), adapter, tmp_path / "merged")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "saved" / "adapter_model.safetensors") == 0o666 & ~mask
    assert mode(tmp_path / "merged" / "model.safetensors") == 0o666 & ~mask
    assert mode(tmp_path / "merged") == 0o777 & ~mask


@pytest.mark.slow
def test_cached_default_model_follows_the_umask(tmp_path, monkeypatch):
    from lorakit.models import converted_gguf, default_gguf_path

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    old = os.umask(0o022)
    try:
        out = converted_gguf(default_gguf_path())
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert (out / "model.safetensors").is_file()
