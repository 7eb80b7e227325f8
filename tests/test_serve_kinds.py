"""What vLLM refuses, served per row: DoRA, trainable (new) tokens and modules_to_save adapters, in one mixed
batch with plain LoRA and base rows, equal to PEFT offline and to each served alone; reloads through the CPU
cache (validated tensors) and a file changed on disk after its first load."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest
import torch

import lorakit
import lorakit.serve.registry as registry_module
from conftest import randomize_adapters, tiny_llama, tiny_tokenizer
from lorakit.models import load_model
from lorakit.serve import AdapterRegistry, AdapterUnsupported, Engine, Request
from lorakit.serve.app import create_app

peft = pytest.importorskip("peft")
NEW = ["<x1>", "<x2>"]  # added to the tokenizer: ids 102, 103 (rows the tiny model already has)
KINDS = ("dora", "tokens", "saved", "plain")
PROMPT = "hello <x1> world<x2> ab"


def _adapter(model_dir, name, config, seed, edit=None):
    m, _ = load_model(str(model_dir))
    lorakit.add_adapter(m, config)
    randomize_adapters(m, std=0.3, seed=seed)
    if edit is not None:
        edit(m)
    lorakit.save_adapter(m, model_dir.parent / "adapters" / name)
    return model_dir.parent / "adapters" / name


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kinds")
    model_dir = tmp / "tiny"
    base = tiny_llama(seed=0)
    with torch.no_grad():
        base.lm_head.weight.mul_(8)
    base.generation_config.eos_token_id = 2
    base.save_pretrained(model_dir)
    tok = tiny_tokenizer()
    tok.add_tokens(NEW)
    tok.save_pretrained(model_dir)
    new_ids = tok.convert_tokens_to_ids(NEW)
    assert new_ids == [102, 103]

    def head_rows(m):
        # The new tokens' head rows: twice the rows of the tokens this adapter emits most, so greedy decoding
        # emits the new tokens where it would emit those.
        emitted = _greedy_peft(m, tok.encode(PROMPT), 12)
        common = (sorted(set(emitted), key=emitted.count, reverse=True) * 2)[:2]
        with torch.no_grad():
            m.lm_head.tokens["default"].values.copy_(2 * m.lm_head.weight[common].float())

    lora = dict(r=4, alpha=8, targets="all-linear")
    dirs = {
        "dora": _adapter(model_dir, "dora", lorakit.LoraConfig(**lora, use_dora=True), 11),
        "tokens": _adapter(model_dir, "tokens", lorakit.LoraConfig(
            r=4, alpha=8, targets=["q_proj", "v_proj"],
            trainable_token_indices={"embed_tokens": new_ids, "lm_head": new_ids}), 12, head_rows),
        "saved": _adapter(model_dir, "saved", lorakit.LoraConfig(
            r=4, alpha=8, targets=["q_proj"], modules_to_save=["model.norm"]), 13),
        "head": _adapter(model_dir, "head", lorakit.LoraConfig(
            r=4, alpha=8, targets=["q_proj"], modules_to_save=["lm_head"]), 15),
        "plain": _adapter(model_dir, "plain", lorakit.LoraConfig(**lora), 14),
    }  # fmt: skip
    # One PeftModel per adapter (PEFT cannot load a second adapter with trainable tokens onto one model).
    ref = {n: peft.PeftModel.from_pretrained(_hf(model_dir), str(dirs[n])).eval() for n in dirs}
    ref[None] = _hf(model_dir)
    return model_dir, dirs, ref, tok


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def _greedy_peft(model, ids, n, eos=(2, 4)):
    """Greedy decoding without a cache (the whole sequence each step): the plainest reference."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if token in eos:
                break
            out.append(token)
    return out


def _peft_greedy(ref, ids, adapter, n=10):
    return _greedy_peft(ref[adapter], ids, n)


def _registry(model_dir, dirs, kinds=KINDS, **kw):
    model, tok = load_model(str(model_dir))
    reg = AdapterRegistry(model, "tiny", **kw)
    for n in kinds:
        reg.add(n, dirs[n], load=False)
    return reg, tok


def test_each_kind_equals_peft_alone_and_in_a_mixed_batch_over_http(setup, monkeypatch):
    """Over HTTP (create_app), 10 concurrent requests over 4 adapter kinds and the base: each completion is
    PEFT's greedy one, token for token, and the one the engine gives it alone; the batch really was mixed;
    the new tokens are in the prompt and (tokens adapter) in the output."""
    model_dir, dirs, ref, tok = setup
    ids = tok.encode(PROMPT)
    assert 102 in ids and 103 in ids
    want = {n: _peft_greedy(ref, ids, n) for n in (*KINDS, None)}
    assert 102 in want["tokens"] or 103 in want["tokens"]
    assert len({tuple(v) for v in want.values()}) == 5  # every kind changes the output
    reg, _ = _registry(model_dir, dirs, max_loaded=4)
    engine = Engine(reg.model, tok, reg, max_batch=16)
    batches = []
    forward = Engine._forward
    monkeypatch.setattr(
        Engine,
        "_forward",
        lambda self, a, cache, **kw: batches.append(list(a)) or forward(self, a, cache, **kw),
    )
    with engine:
        alone = {n: engine.generate([Request(ids, n, 10, temperature=0)], 60)[0].output_ids for n in want}
        batches.clear()
        app = create_app(engine, reg, "tiny")
        models = [*KINDS, "tiny"] * 2
        texts = asyncio.run(_complete_all(app, models, PROMPT, 10))
    assert alone == want
    for model, text in zip(models, texts, strict=True):
        assert text == tok.decode(want[None if model == "tiny" else model], skip_special_tokens=True), model
    assert "<x1>" in texts[1] or "<x2>" in texts[1]
    assert max(len(set(b)) for b in batches) >= 3  # one forward held rows of >= 3 kinds


async def _complete_all(app, models, prompt, n):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:

        async def one(model):
            body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(m) for m in models))


@pytest.mark.parametrize("kinds", [KINDS, ("head", "dora", "plain")])
def test_mixed_batch_logits_equal_peft(setup, kinds):
    """The per-row forward the engine runs, one row per kind (and a base row), on the server's model with its
    slots: every row's logits are PEFT's for that adapter within 1e-5 (a tuned head among them)."""
    model_dir, dirs, ref, tok = setup
    reg, _ = _registry(model_dir, dirs, kinds, max_loaded=4)
    for n in kinds:
        assert reg.acquire(n)
    ids = torch.tensor([tok.encode(PROMPT)])
    names = [*kinds, None, "dora"]
    with torch.no_grad(), lorakit.per_row_adapters(reg.model, names):
        got = reg.model(input_ids=ids.repeat(len(names), 1)).logits
    for i, n in enumerate(names):
        with torch.no_grad():
            want = ref[n](input_ids=ids).logits[0]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0, msg=f"row {i}: {n}")


def test_reloads_through_the_cache_stay_equal_without_revalidating(setup, monkeypatch):
    """2 slots for 4 kinds, requests alternating: every adapter is evicted and reloaded from the CPU cache
    (validated tensors: no disk read, no prepare_adapter) and every output stays PEFT's."""
    model_dir, dirs, ref, tok = setup
    ids = tok.encode(PROMPT)
    want = {n: _peft_greedy(ref, ids, n, 6) for n in KINDS}
    reg, _ = _registry(model_dir, dirs, max_loaded=2)
    prepares = []
    real = registry_module.prepare_adapter
    monkeypatch.setattr(
        registry_module, "prepare_adapter", lambda *a, **k: prepares.append(1) or real(*a, **k)
    )
    reads = reg.disk_reads
    order = [*KINDS, *reversed(KINDS), *KINDS]
    with Engine(reg.model, tok, reg, max_batch=2, max_passed=0) as eng:  # arrival order: every one reloads
        reqs = eng.generate([Request(ids, n, 6, temperature=0) for n in order], 120)
    assert [r.error for r in reqs] == [None] * len(reqs)
    assert [r.output_ids for r in reqs] == [want[n] for n in order]
    assert reg.disk_reads == reads and prepares == [] and reg.loads >= 8


def test_a_file_changed_on_disk_is_noticed_at_the_next_load(setup, tmp_path):
    """The cache serves what is on disk: an adapter saved over after its first load (a new inode, size or
    time) is read and validated again when it next loads; unchanged files are never read again."""
    model_dir, dirs, ref, tok = setup
    ids = tok.encode(PROMPT)
    where = tmp_path / "x"
    shutil.copytree(dirs["plain"], where)
    reg, _ = _registry(model_dir, dirs, max_loaded=1)
    reg.add("x", where, load=False)
    with Engine(reg.model, tok, reg, max_batch=1) as eng:
        first = eng.generate([Request(ids, "x", 6, temperature=0)], 60)[0].output_ids
        eng.generate([Request(ids, "dora", 2, temperature=0)], 60)  # evicts x
        reads = reg.disk_reads
        again = eng.generate([Request(ids, "x", 6, temperature=0)], 60)[0].output_ids
        assert reg.disk_reads == reads  # unchanged: from the cache
        eng.generate([Request(ids, "dora", 2, temperature=0)], 60)
        m, _ = load_model(str(model_dir))
        lorakit.load_adapter(m, dirs["dora"])
        lorakit.save_adapter(m, where)  # another adapter in x's directory
        changed = eng.generate([Request(ids, "x", 6, temperature=0)], 60)[0].output_ids
    assert first == again == _peft_greedy(ref, ids, "plain", 6)
    assert changed == _peft_greedy(ref, ids, "dora", 6) and reg.disk_reads == reads + 1


def test_a_copy_and_an_adapter_of_one_module_are_refused_at_registration(setup):
    """`head` keeps its own lm_head (modules_to_save), `tokens` adapts lm_head's rows: one model cannot hold
    both, so the second registered is refused, naming both and the module (over HTTP: a 400), in either order."""
    model_dir, dirs, _, _ = setup
    for first, second in (("tokens", "head"), ("head", "tokens")):
        reg, _ = _registry(model_dir, dirs, (first,), max_loaded=2)
        with pytest.raises(
            AdapterUnsupported, match=f"adapter {second!r} .* beside adapter {first!r}.*lm_head"
        ):
            reg.add(second, dirs[second])
        assert reg.names() == [first]


def test_adapter_from_bytes_reads_what_read_adapter_reads(setup):
    """The server's bytes path gives the same config, tensors and metadata (the fingerprint) as reading the
    directory, and names the file for a corrupt one."""
    from lorakit.io import read_adapter
    from lorakit.io.files import AdapterFileError, adapter_from_bytes

    _, dirs, _, _ = setup
    d = dirs["tokens"]
    config, weights = (d / "adapter_config.json").read_bytes(), (d / "adapter_model.safetensors").read_bytes()
    got, want = adapter_from_bytes(d, config, weights), read_adapter(d)
    assert (
        got.config == want.config and got.metadata == want.metadata and "lorakit.fingerprint" in got.metadata
    )
    assert got.tensors.keys() == want.tensors.keys()
    assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors)
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors: unreadable"):
        adapter_from_bytes(d, config, weights[:100])
    with pytest.raises(AdapterFileError, match="adapter_config.json: expected a JSON object"):
        adapter_from_bytes(d, b"[1]", weights)
