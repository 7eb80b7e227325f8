"""TrainConfig from YAML with command-line overrides; bad files and values name the file and the option."""

from __future__ import annotations

import pytest

from lorakit.cli import build_parser, main
from lorakit.train import TrainConfig
from lorakit.train.cmd_train import resolve


def parse(*argv):
    return build_parser().parse_args(["train", *argv])


def test_yaml_then_flags(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("data: d.jsonl\nrank: 8\nlr: 0.001\nbatch-size: 2\nmode: cpt\n")
    cfg = resolve(parse(str(cfg_file), "--rank", "4", "--steps", "7", "--gradient-checkpointing"))
    assert (cfg.data, cfg.rank, cfg.lr, cfg.batch_size, cfg.mode) == ("d.jsonl", 4, 0.001, 2, "cpt")
    assert cfg.steps == 7 and cfg.gradient_checkpointing is True
    assert cfg.seed == TrainConfig().seed and cfg.resume is False  # untouched options keep their defaults
    # The resolved config saved beside the adapter reads back as the same config.
    cfg.save(tmp_path / "train_config.yaml")
    assert TrainConfig.from_yaml(tmp_path / "train_config.yaml") == cfg


def test_flags_without_yaml_and_demo_defaults(tmp_path, monkeypatch):
    import lorakit.data

    assert resolve(parse("--data", "x.jsonl", "--lr", "0.5")).lr == 0.5
    monkeypatch.setattr(lorakit.data, "DEMO_DEFAULTS", {"steps": 40, "lr": 1e-3})
    demo = resolve(parse("--lr", "0.01"))  # no data: the demo's defaults under the user's flags
    assert (demo.data, demo.steps, demo.lr) == (None, 40, 0.01)
    assert resolve(parse("--data", "x.jsonl")).steps is None  # own data: no demo defaults


def test_steps_and_epochs_are_exclusive():
    with pytest.raises(SystemExit):
        parse("--steps", "3", "--epochs", "1")
    with pytest.raises(ValueError, match="--steps and --epochs are exclusive"):
        TrainConfig(steps=3, epochs=1.0)


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "rank: [1, 2\n",
            r"bad\.yaml:2:1: not valid YAML: while parsing a flow sequence expected ',' or '\]'",
        ),
        ("- rank\n- 4\n", r"bad\.yaml: expected a mapping of options, got list"),
        ("rnak: 4\n", r"bad\.yaml: unknown options \['rnak'\]"),
        ("rank: -1\n", r"bad\.yaml: --rank=-1 is invalid: expected a positive integer"),
        ("mode: chat\n", r"bad\.yaml: --mode='chat' is invalid"),
        ("lr: fast\n", r"bad\.yaml: "),
    ],
)
def test_bad_yaml_names_the_file(tmp_path, text, match):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_yaml(bad)


def test_cli_reports_bad_config_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x.jsonl\nwarmup: 2\n")
    assert main(["train", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: ") and "bad.yaml" in err and "--warmup=2" in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml not found" in capsys.readouterr().err
