"""Many adapters over few slots: making an adapter resident writes its slot (no adapter record, no re-wrapping),
evicting zeroes it; reloads give a fresh server's outputs exactly, an evicted slot keeps nothing of its last
adapter, and admission prefers resident adapters without starving the others (driven step by step)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_llama, tiny_tokenizer
from lorakit.models import load_model
from lorakit.serve import AdapterRegistry, Engine, Request

KINDS = {
    "big": dict(r=8, alpha=16, targets="all-linear"),
    "dora": dict(r=4, alpha=8, targets="all-linear", use_dora=True),
    "tok": dict(r=2, alpha=4, targets=["q_proj"], trainable_token_indices=[5, 6, 7]),
    "emb": dict(r=2, alpha=4, targets=["embed_tokens", "v_proj"]),  # LoRA on an Embedding: a layer record
    "norm": dict(r=2, alpha=4, targets=["q_proj"], modules_to_save=["model.norm"]),
}
PROMPT = [1, 5, 9, 6, 22, 7, 40, 41, 5]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slots")
    model_dir = tmp / "tiny"
    base = tiny_llama(seed=0, tie=True)  # a tied head: trainable tokens reach it through the embedding
    base.generation_config.eos_token_id = 2
    base.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    dirs = {}
    for i, (name, kw) in enumerate(KINDS.items()):
        m = tiny_llama(seed=0, tie=True)
        lorakit.add_adapter(m, lorakit.LoraConfig(**kw))
        randomize_adapters(m, std=0.3, seed=20 + i)
        dirs[name] = lorakit.save_adapter(m, tmp / "adapters" / name)
    return model_dir, dirs


def _registry(setup, max_loaded):
    model_dir, dirs = setup
    model, tok = load_model(str(model_dir))
    reg = AdapterRegistry(model, "tiny", max_loaded=max_loaded)
    for n, d in dirs.items():
        reg.add(n, d, load=False)
    return reg, tok


def _logits(reg, name):
    """Rows [name, base] of one per-row forward (what the engine runs)."""
    ids = torch.tensor([PROMPT] * 2)
    with torch.no_grad(), lorakit.per_row_adapters(reg.model, [name, None]):
        return reg.model(input_ids=ids).logits


def _fresh(setup, name, index):
    """A fresh server's rows [name, base] with `name` written into slot `index` (other adapters below it)."""
    reg, _ = _registry(setup, 2)
    for other in [n for n in KINDS if n != name][:index]:
        assert reg.acquire(other)
    assert reg.acquire(name) and reg.slots.index_of(name) == index
    return _logits(reg, name)


def test_evict_and_reload_equal_a_fresh_server_exactly(setup):
    """2 slots, 5 adapters of every kind cycled so each is evicted and written again (into either slot, beside
    various others): every forward equals, bit for bit, a fresh server's first forward for that adapter in
    that slot (and within float rounding in the other slot: a step's stacks end at its highest slot)."""
    reg, _ = _registry(setup, 2)
    seen = set()
    for n in ["big", "dora", "tok", "big", "emb", "norm", "dora", "tok", "emb", "norm", "big", "tok"]:
        assert reg.acquire(n)
        i = reg.slots.index_of(n)
        seen.add((n, i))
        got = _logits(reg, n)
        reg.release(n)
        assert torch.equal(got, _fresh(setup, n, i)), n
        torch.testing.assert_close(got, _fresh(setup, n, 1 - i), atol=1e-5, rtol=0)
        assert not torch.equal(got[0], got[1])  # the adapter changes its row
    assert lorakit.adapter_records(reg.model) == {}  # resident in slots only
    assert reg.loads == 12 and reg.evictions == 10 and reg.disk_reads == len(KINDS)
    assert {n for n, i in seen if (n, 1 - i) in seen}  # an adapter came back in the other slot


def test_an_evicted_slot_keeps_nothing_of_its_last_adapter(setup):
    """After "big" (rank 8 on every linear layer) leaves its slot for "norm" (rank 2 on q_proj, a norm copy):
    every other layer's slot is all zeros, q_proj's past rank 2 too; "big" cannot be named any more; the
    records of "tok" (its token rows on the embedding and the tied head) leave with it."""
    reg, _ = _registry(setup, 1)
    for n in ("big", "norm"):
        assert reg.acquire(n)
        reg.release(n)
    slots = reg.slots
    assert slots.names == ["norm"] and slots.rmax == 8
    for path, layer in lorakit.adapters.lora_layers(reg.model):
        s = slots.layer_slots(layer)
        if s is None:
            continue
        r = 2 if path.endswith("q_proj") else 0
        assert s.ranks == [r] and not s.A[r:].any() and not s.B[:, r:].any(), path
        assert s.A[:r].any() == bool(r)
    with pytest.raises(KeyError, match="big"):
        _logits(reg, "big")
    fresh, _ = _registry(setup, 1)
    assert fresh.acquire("norm")
    assert torch.equal(_logits(reg, "norm"), _logits(fresh, "norm"))
    assert reg.acquire("tok")
    emb, head = reg.model.get_input_embeddings(), reg.model.get_output_embeddings()
    assert emb.tokens["tok"] is head.tokens["tok"]
    reg.release("tok")
    assert reg.acquire("norm")  # evicts tok
    assert "tok" not in emb.tokens and "tok" not in head.tokens
    assert "tok" not in reg.model.get_submodule("model.norm").lora_copies


def test_a_step_multiplies_only_by_the_slots_up_to_its_highest(setup):
    """4 slots, 3 resident: a step of base rows reads no stacks at all, one whose rows use slot 0 reads slot 0
    alone, one using slot 2 reads slots 0-2; a row's logits agree across them (within float rounding)."""
    reg, _ = _registry(setup, 4)
    for n in ("big", "dora", "tok"):
        assert reg.acquire(n)
    layer = reg.model.get_submodule("model.layers.0.mlp.down_proj")
    rmax = reg.slots.rmax
    widths = {}
    for names in ([None, None], ["big", None], ["big", "tok"]):
        mapping = reg.slots.mapping(names)
        view = mapping.slots.layer_slots(layer)
        widths[tuple(names)] = None if view is None else (view.A.shape[0], view.B.shape[1])
    assert widths == {(None, None): None, ("big", None): (rmax, rmax), ("big", "tok"): (3 * rmax, 3 * rmax)}
    ids = torch.tensor([PROMPT] * 2)
    with torch.no_grad():
        with lorakit.per_row_adapters(reg.model, ["big", None]):
            alone = reg.model(input_ids=ids).logits
        with lorakit.per_row_adapters(reg.model, ["big", "tok"]):
            wide = reg.model(input_ids=ids).logits
        with lorakit.per_row_adapters(reg.model, [None, None]):
            base = reg.model(input_ids=ids).logits
    torch.testing.assert_close(alone[0], wide[0], atol=1e-5, rtol=0)
    assert torch.equal(base[1], alone[1])  # a base row gives the base output, in a step with stacks or none
    assert not torch.equal(base[1], wide[1])  # (row 1 of `wide` is tok's)


def _drive(eng, rounds, stream):
    """`rounds` turns of the engine loop (never started: deterministic), 2 requests of `stream` submitted
    before each."""
    with torch.inference_mode():
        for _ in range(rounds):
            eng.submit(next(stream))
            eng.submit(next(stream))
            eng._iterate()


def test_admission_prefers_resident_adapters_and_bounds_the_wait(setup):
    """2 slots holding "big" and "dora", a steady stream of requests for them, and one for "norm" first in
    line: requests of resident adapters go first (no load), and "norm" waits for exactly `max_passed` of
    them, then is admitted before any later one; without a bound it would wait as long as the stream lasts."""
    outcomes = {}
    for bound in (3, 10_000):
        reg, tok = _registry(setup, 2)
        for n in ("big", "dora"):
            assert reg.acquire(n)
            reg.release(n)
        eng = Engine(reg.model, tok, reg, max_batch=2, max_passed=bound)
        x = Request(PROMPT, "norm", 1, temperature=0)
        stream = iter(Request(PROMPT, ("big", "dora")[i % 2], 1, temperature=0) for i in range(1000))
        eng.submit(x)
        loads = reg.loads
        _drive(eng, 1, stream)
        assert reg.loads == loads and x.passed == 2 and not x.done.is_set()  # both rows without a load
        _drive(eng, 6, stream)
        outcomes[bound] = (x.done.is_set(), x.passed, x.finish_reason, x.output_ids)
    assert outcomes[3][:3] == (True, 3, "length") and len(outcomes[3][3]) == 1
    assert outcomes[10_000][:2] == (False, 14)  # passed over by every one of the 14 others


def test_a_request_passed_over_too_often_waits_only_for_running_rows(setup):
    """Both slots pinned by running rows (many tokens each) and the batch has room: once the waiting "norm"
    request was passed over `max_passed` times nothing behind it is admitted, so the rows drain, a slot frees
    and it runs; the others follow. Every output equals the one the request gets alone."""
    reg, tok = _registry(setup, 2)
    eng = Engine(reg.model, tok, reg, max_batch=4, max_passed=2)
    running = [Request(PROMPT, n, 6, temperature=0, ignore_eos=True) for n in ("big", "dora")]
    x = Request(PROMPT, "norm", 3, temperature=0, ignore_eos=True)
    later = [Request(PROMPT, n, 2, temperature=0, ignore_eos=True) for n in ("big", "dora", "big", "dora")]
    for r in [*running, x, *later]:
        eng.submit(r)
    admitted_before_x = 0
    with torch.inference_mode():
        for _ in range(40):
            eng._iterate()
            if x.first_token is None:
                admitted_before_x = sum(r.first_token is not None for r in later)
    assert x.passed == 2 and admitted_before_x == 2  # two got ahead of it, no more
    reqs = [*running, x, *later]
    assert all(r.finish_reason == "length" for r in reqs)
    for r in reqs:
        alone, _ = _registry(setup, 2)
        with Engine(alone.model, tok, alone, max_batch=1) as solo:
            want = solo.generate(
                [Request(PROMPT, r.adapter, r.max_tokens, temperature=0, ignore_eos=True)], 60
            )
        assert r.output_ids == want[0].output_ids, r.adapter


def test_new_tokens_beyond_the_vocabulary_are_refused_at_registration_naming_them(setup, tmp_path):
    """An adapter trained with 2 new tokens (ids 128, 129 of a grown embedding) on a base of 128 rows: one
    shared embedding cannot grow per row, so registering it fails at once (over HTTP a 400), naming the
    adapter and the ids; nothing is registered."""
    from lorakit.vocab import grow_embeddings

    model_dir, _ = setup
    m = tiny_llama(seed=0, tie=True)
    assert grow_embeddings(m, 130) == [128, 129]
    lorakit.add_adapter(m, lorakit.LoraConfig(r=2, targets=["q_proj"], trainable_token_indices=[5, 128, 129]))
    randomize_adapters(m, std=0.3, seed=3)
    lorakit.save_adapter(m, tmp_path / "grown")
    model, tok = load_model(str(model_dir))
    reg = AdapterRegistry(model, "tiny", root=tmp_path, max_loaded=2)
    with pytest.raises(ValueError, match=r"adapter 'grown': .*\[128, 129\] are outside .*beyond .* of 128"):
        reg.add("grown", tmp_path / "grown")
    assert reg.names() == []
    r = asyncio.run(_post_adapter(Engine(model, tok, reg), reg, {"name": "grown", "path": "grown"}))
    assert r.status_code == 400 and "adapter 'grown'" in r.text and "[128, 129]" in r.text, r.text
    assert reg.names() == []


async def _post_adapter(engine, reg, body):
    """POST /v1/adapters to the app (its engine started here: the test transport runs no lifespan)."""
    from lorakit.serve.app import create_app

    app = create_app(engine, reg, "tiny")
    with engine:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/adapters", json=body)


def test_a_step_with_one_adapter_reads_its_own_factors_alone(setup, monkeypatch):
    """An adapter resident in slot 2 with slots 0-1 filled: a step whose rows use it alone never takes the
    grouped pair (which would multiply by slots 0-2), and gives the logits of a step that mixes it with others
    (within float rounding); a mixed step still stacks."""
    from lorakit.fast import rows as fast_rows

    reg, _ = _registry(setup, 4)
    for n in ("big", "dora", "tok"):
        assert reg.acquire(n)
    stacked = []
    real = fast_rows._grouped_
    monkeypatch.setattr(fast_rows, "_grouped_", lambda *a: (stacked.append(1), real(*a))[1])
    ids = torch.tensor([PROMPT] * 2)
    with torch.no_grad():
        with lorakit.per_row_adapters(reg.model, ["tok", None]):
            alone = reg.model(input_ids=ids).logits
        assert stacked == []
        with lorakit.per_row_adapters(reg.model, ["tok", "big"]):
            mixed = reg.model(input_ids=ids).logits
        assert stacked  # two adapters in the step: the grouped pair
        with lorakit.per_row_adapters(reg.model, [None, None]):
            base = reg.model(input_ids=ids).logits
    torch.testing.assert_close(alone[0], mixed[0], atol=1e-5, rtol=0)
    assert torch.equal(base[1], alone[1])  # the base row beside it is untouched


def test_layer_slot_views_are_made_at_write_and_follow_resize_and_reset():
    """slot(i) hands out views made when slot i was written (not sliced on every call of every layer), into
    the stacks that hold it (B_iᵀ as contiguous rows): after `resized` into the new stacks, after `reset`
    empty."""
    from lorakit.slots import LayerSlots

    ls = LayerSlots(2, 4, 6, 5, torch.float32, "cpu")
    A, sB = torch.randn(3, 6), torch.randn(5, 3)
    ls.write(1, A, sB, None)
    a, b, factor = ls.slot(1)
    assert torch.equal(a, A) and torch.equal(b, sB) and factor is None
    assert a.data_ptr() == ls.A[4].data_ptr() and ls.slot(1)[0] is a  # the same view object every call
    assert b.t().is_contiguous()  # s·B_iᵀ is contiguous rows of the stack (what the up-projection reads)
    big = ls.resized(3, 8)
    a2, b2, _ = big.slot(1)
    assert a2.data_ptr() == big.A[8].data_ptr() and torch.equal(a2, A) and torch.equal(b2, sB)
    assert big.slot(0)[0].shape == (0, 6) and big.slot(2)[1].shape == (5, 0)
    assert big.narrowed(2).slot(1)[0] is a2
    ls.reset(1)
    assert ls.slot(1)[0].shape == (0, 6) and ls.ranks[1] == 0


def test_slot_prefixes_are_made_with_the_stacks_and_see_later_writes():
    """narrowed(used) hands out the prefix made with the stacks (the same object every time, nothing built in a
    step): its grouped operands are views of the stacks' storage, so a write or reset after it was made shows
    in them, and its ranks and DoRA factor follow the stacks."""
    from lorakit.slots import LayerSlots

    ls = LayerSlots(3, 4, 6, 5, torch.float32, "cpu")
    prefix = ls.narrowed(2)
    assert ls.narrowed(2) is prefix and prefix.A3.shape == (2, 4, 6) and prefix.sB3.shape == (2, 4, 5)
    A, sB = torch.randn(3, 6), torch.randn(5, 3)
    ls.write(1, A, sB, torch.full((5,), 0.5))
    assert torch.equal(prefix.A3[1, :3], A) and torch.equal(prefix.sB3[1, :3], sB.t())
    assert not prefix.A3[1, 3:].any() and not prefix.A3[0].any()
    assert prefix.ranks == [0, 3] and prefix.row_factor is ls.row_factor and ls.narrowed(1).row_factor is None
    ls.reset(1)
    assert (
        not prefix.A3.any() and not prefix.sB3.any() and prefix.ranks == [0, 0] and prefix.row_factor is None
    )
