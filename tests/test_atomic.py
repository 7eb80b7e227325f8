"""All-or-nothing saves under real `kill -9`: adapters, whole directories (merge / export), temporaries.

Each save is killed before every one of its renames in turn (every state it can leave on disk), and at
random wall-clock moments; after each kill the directory must hold the complete old or the complete new
content. POSIX only (fork + SIGKILL).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_llama
from killpoints import kill_after, kill_at_rename
from lorakit import atomic
from lorakit.io import read_adapter

pytestmark = pytest.mark.skipif(os.name != "posix", reason="fork + SIGKILL")


def _adapter(r: int, seed: int):
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=r, targets=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=seed)
    return model


def _which(path: Path, refs: dict[str, dict]) -> str:
    """The name of the reference adapter `path` holds exactly (and loads onto a model), else fail."""
    files = read_adapter(path)
    found = [name for name, ref in refs.items() if _same(files, ref)]
    assert found, f"{path}: neither adapter (config r={files.config['r']}, tensors {_shapes(files.tensors)})"
    lorakit.load_adapter(tiny_llama(), path)  # and it loads
    return found[0]


def _same(files, ref) -> bool:
    return (
        files.config == ref.config
        and set(files.tensors) == set(ref.tensors)
        and all(torch.equal(files.tensors[k], ref.tensors[k]) for k in ref.tensors)
    )


def _shapes(tensors):
    return sorted({tuple(t.shape) for t in tensors.values()})


def test_save_adapter_killed_before_every_rename_leaves_old_or_new(tmp_path):
    # Rank 2 and rank 4: a mixed directory (new weights, old config) would not even load.
    models = {"r2": _adapter(2, seed=1), "r4": _adapter(4, seed=2)}
    refs = {}
    for name, m in models.items():
        lorakit.save_adapter(m, tmp_path / f"ref-{name}")
        refs[name] = read_adapter(tmp_path / f"ref-{name}")
    out = tmp_path / "run"
    lorakit.save_adapter(models["r2"], out)
    (out / "notes.txt").write_text("kept")  # other files in the output are not the save's business
    current, seen_states = "r2", 0
    for _ in range(2):  # two saves, each killed before each of its renames in turn, then completed
        new = "r4" if current == "r2" else "r2"
        k = 1
        while kill_at_rename(lambda new=new: lorakit.save_adapter(models[new], out), k):
            assert _which(out, refs) in (current, new)
            seen_states += 1
            k += 1
        assert _which(out, refs) == new  # the completed save
        current = new
    assert seen_states >= 4
    assert (out / "notes.txt").read_text() == "kept"
    lorakit.save_adapter(models[current], out)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # journal finished, no temps


def test_save_adapter_killed_at_random_moments(tmp_path):
    models = [_adapter(2, seed=1), _adapter(4, seed=2)]
    refs = {}
    for i, m in enumerate(models):
        lorakit.save_adapter(m, tmp_path / f"ref{i}")
        refs[str(i)] = read_adapter(tmp_path / f"ref{i}")
    out = tmp_path / "run"
    lorakit.save_adapter(models[0], out)

    def save_forever():
        i = 0
        while True:
            lorakit.save_adapter(models[i % 2], out)
            i += 1

    rng = random.Random(0)
    deadline = time.monotonic() + 2.5
    kills = 0
    while time.monotonic() < deadline or kills < 5:
        kill_after(save_forever, rng.uniform(0.0, 0.1))
        _which(out, refs)
        kills += 1
    # The killed saves' temporaries are removed by the next save (their processes are dead).
    lorakit.save_adapter(models[0], out)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_stale_temporaries_cleaned_only_when_their_process_is_dead(tmp_path):
    model = _adapter(2, seed=1)
    out = tmp_path / "a"
    lorakit.save_adapter(model, out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    host = atomic._host()
    stale = [
        out / f".lorakit-stage.tmp-{host}-{dead_pid}-0123abcd",  # a killed save's stage
        tmp_path / f".a.tmp-{host}-{dead_pid}-0123abcd",  # a killed write_dir's temporary
        tmp_path / ".a.tmp-k2j_9xq0",  # lorakit 0.1.0's name (no pid), untouched for two hours
    ]
    live = [
        out / f".lorakit-stage.tmp-{host}-{os.getpid()}-0123abcd",  # a save in progress (this process)
        tmp_path / f".a.tmp-otherhost-{dead_pid}-0123abcd",  # another machine's: its pid means nothing here
        tmp_path / ".a.tmp-newer012",  # 0.1.0's name, but recent: may be in use
        tmp_path / ".b.tmp-k2j_9xq0",  # another target's
        tmp_path / "a.tmp-k2j_9xq0x",  # not our pattern
    ]
    for d in stale + live:
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    old = time.time() - 7200
    os.utime(tmp_path / ".a.tmp-k2j_9xq0", (old, old))
    lorakit.save_adapter(model, out)
    assert [d for d in stale if d.exists()] == []
    assert [d for d in live if not d.exists()] == []


def _fill(marker: str, n: int = 4):
    def fill(d: Path) -> None:
        for i in range(n):
            (d / f"part{i}.txt").write_text(marker * 1000)

    return fill


def _dir_state(d: Path) -> str:
    """The one marker every file of `d` holds (the directory must be complete)."""
    assert d.is_dir(), f"{d} is missing"
    texts = {f.name: f.read_text() for f in d.iterdir()}
    assert sorted(texts) == [f"part{i}.txt" for i in range(4)], sorted(texts)
    markers = {t[:1] for t in texts.values()}
    assert len(markers) == 1 and all(len(t) == 1000 for t in texts.values()), markers
    return markers.pop()


@pytest.mark.parametrize("exchange", ["atomic-exchange", "two-renames"])
def test_write_dir_overwrite_killed_before_every_rename_never_leaves_none(tmp_path, monkeypatch, exchange):
    if exchange == "two-renames":
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    out = tmp_path / "merged"
    atomic.write_dir(out, _fill("a"))
    current = "a"
    for new in "bcd":
        k = 1
        while kill_at_rename(lambda new=new: atomic.write_dir(out, _fill(new), overwrite=True), k):
            if exchange == "two-renames":
                atomic._restore_aside(out)  # what the next write_dir (or a reader calling it) does first
            assert _dir_state(out) in (current, new)
            k += 1
        assert _dir_state(out) == new
        current = new
    atomic.write_dir(out, _fill("e"), overwrite=True)
    assert _dir_state(out) == "e"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # old copies and temporaries all gone


def test_write_dir_refuses_existing_without_overwrite(tmp_path):
    out = tmp_path / "m"
    atomic.write_dir(out, _fill("a"))
    with pytest.raises(FileExistsError):
        atomic.write_dir(out, _fill("b"))
    assert _dir_state(out) == "a"

    def boom(d):
        (d / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_dir(out, boom, overwrite=True)
    assert _dir_state(out) == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_replace_files_reader_sees_new_files_through_an_unfinished_journal(tmp_path):
    d = tmp_path / "d"
    atomic.replace_files(d, _write_xy("old"))
    k = 1
    while kill_at_rename(lambda: atomic.replace_files(d, _write_xy("new")), k):
        states = {atomic.resolve(d, n).read_text() for n in ("x", "y")}
        assert len(states) == 1, states  # never a mix
        k += 1
    assert k >= 4  # killed before the commit, before each of the two moves
    assert {atomic.resolve(d, n).read_text() for n in ("x", "y")} == {"new"}
    atomic.recover(d)
    assert sorted(p.name for p in d.iterdir()) == ["x", "y"]


def _write_xy(text):
    def fill(stage):
        for n in ("x", "y"):
            (stage / n).write_text(text)

    return fill


def test_merge_overwrite_killed_before_every_rename_leaves_old_or_new(tmp_path):
    from safetensors.torch import load_file

    from conftest import tiny_tokenizer
    from lorakit.cli import main

    tok = tiny_tokenizer()
    tiny_llama(vocab=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    refs = {}
    for name, seed in (("a", 1), ("b", 2)):
        model = tiny_llama(vocab=len(tok))
        lorakit.add_adapter(model, lorakit.LoraConfig(r=2, targets=["q_proj"]))
        randomize_adapters(model, std=0.5, seed=seed)
        lorakit.save_adapter(model, tmp_path / f"adapter-{name}")
        assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / f"adapter-{name}"),
                     "--output", str(tmp_path / f"ref-{name}")]) == 0  # fmt: skip
        refs[name] = load_file(tmp_path / f"ref-{name}" / "model.safetensors")
    assert not torch.equal(refs["a"]["model.layers.0.self_attn.q_proj.weight"],
                           refs["b"]["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip

    def which(out: Path) -> str:
        assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file(), f"{out} is incomplete"
        got = load_file(out / "model.safetensors")
        names = [n for n, ref in refs.items() if all(torch.equal(got[k], ref[k]) for k in ref)]
        assert names, "neither the old nor the new merged model"
        return names[0]

    out = tmp_path / "merged"
    main(
        [
            "merge",
            "--model",
            str(tmp_path / "base"),
            "--adapter",
            str(tmp_path / "adapter-a"),
            "--output",
            str(out),
        ]
    )
    argv = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter-b"),
            "--output", str(out), "--overwrite"]  # fmt: skip
    k = 1
    while kill_at_rename(lambda: main(argv), k):
        assert which(out) in ("a", "b")
        k += 1
    assert k >= 2 and which(out) == "b"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
