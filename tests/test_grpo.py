"""GRPO: reward loading, the step's loss against grpo_loss by hand, rollouts from the live adapter, resume,
prompt-row and CLI errors (tiny random models, seconds each). The loss itself is checked against TRL's
GRPOTrainer in test_preference_trl.py."""

import json
import math
import os
import re
import signal

import pytest
import torch

import lorakit
from conftest import quantizable_llama_dir, randomize_adapters, tiny_llama, tiny_tokenizer
from lorakit.data import DataError
from lorakit.data.prompts import load_prompts
from lorakit.train import TrainConfig, loop, optim
from lorakit.train.preference import grpo as grpo_mod
from lorakit.train.preference.grpo import GrpoObjective
from lorakit.train.preference.losses import group_advantages, grpo_loss
from lorakit.train.preference.rewards import Reward, RewardError, extract_answer, load_rewards
from lorakit.train.preference.rollout import LiveEngine, sample


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n=4):
    return [{"prompt": f"add {i} {i}", "answer": str(2 * i), "level": i % 2} for i in range(n)]


def checksum(prompts, completions, **fields):
    """A reward with spread on random text: the completion's characters summed, mod 5."""
    return [float(sum(map(ord, c)) % 5) for c in completions]


def _setup(tmp_path, n=4, seed=1, dropout=0.0):
    tok = tiny_tokenizer()
    model = tiny_llama()
    torch.manual_seed(seed)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, dropout=dropout))
    randomize_adapters(model, std=0.2, seed=seed)
    ds = load_prompts(_write(tmp_path / "p.jsonl", _rows(n)), tok, max_len=64, max_new_tokens=6)
    return model, tok, ds


def _objective(model, tok, beta=0.0, g=4):
    engine = LiveEngine(model, tok, max_batch=16).start()
    rewards = [Reward("checksum", "tests:checksum", checksum), *load_rewards(["exact"])]
    return GrpoObjective(rewards, engine, num_generations=g, temperature=0.9, max_new_tokens=6, beta=beta)


# -- reward functions ----------------------------------------------------------------------------------------


def test_reward_specs_load_and_name_the_spec_on_errors(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(
        "def good(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
        "def short(prompts, completions, **kw):\n    return [1.0]\n"
        "def nan(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n"
        "def words(prompts, completions, **kw):\n    return ['a'] * len(completions)\n"
        "def boom(prompts, completions, **kw):\n    raise KeyError('answer')\n"
        "NOT_CALLABLE = 3\n"
    )
    (tmp_path / "broken.py").write_text("import no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module, by_file = load_rewards(["myrewards:good", f"{tmp_path}/myrewards.py:good"])
    assert (by_module.name, by_file.name) == ("good", "good_2")
    assert by_file(["p", "q"], ["a", "b"], {}) == [1.0, 1.0]
    cases = {
        "nosuchmod_xyz:f": "cannot import module 'nosuchmod_xyz'",
        "myrewards:missing": "has no attribute 'missing'",
        "myrewards:NOT_CALLABLE": "is a int, not callable",
        f"{tmp_path}/nope.py:f": "no such file",
        f"{tmp_path}/broken.py:f": "importing .* failed: ModuleNotFoundError",
        "justaname": "not a built-in",
        "regex:(": "invalid regular expression",
    }
    for spec, why in cases.items():
        with pytest.raises(RewardError, match=rf"--reward {re.escape(spec)}: .*{why}"):
            load_rewards([spec])
    with pytest.raises(RewardError, match="no --reward given"):
        load_rewards([])
    calls = {
        "myrewards:short": "returned 1 scores for 2 completions",
        "myrewards:nan": "score nan for completion 0",
        "myrewards:words": r"returned \['a', 'a'\]; expected a list of 2 numbers",
        "myrewards:boom": "the function raised KeyError",
    }
    for spec, why in calls.items():
        (reward,) = load_rewards([spec])
        with pytest.raises(RewardError, match=f"--reward {spec}: {why}"):
            reward(["p", "q"], ["a", "b"], {})


def test_builtin_rewards():
    exact, fmt = load_rewards(["exact", r"regex:\d+"])
    completions = ["The answer is 14.", "7 + 7 = 14", r"\boxed{15}", "#### 1,4", "fourteen"]
    assert exact(["p"] * 5, completions, {"answer": ["14"] * 5}) == [1.0, 1.0, 0.0, 1.0, 0.0]
    chat = [[{"role": "assistant", "content": c}] for c in ("14", " 14 ", "14 apples")]
    assert fmt([[]] * 3, chat, {}) == [1.0, 1.0, 0.0]  # conversational completions, whole-text match
    (other,) = load_rewards(["exact:target"])
    assert other(["p"], ["3.50"], {"target": ["3.5"]}) == [1.0]
    with pytest.raises(RewardError, match="--reward exact:target: the function raised KeyError"):
        other(["p"], ["3"], {"answer": ["3"]})
    assert [extract_answer(t) for t in ("Answer: Paris.\nmore", "nothing", "-7", "2, then 3")] == [
        "Paris", "nothing", "-7", "3",
    ]  # fmt: skip


# -- the step ------------------------------------------------------------------------------------------------


def _hand_logps(model, ex_list, rollouts, temperature):
    """(policy log-probs (N, W) with gradients, reference log-probs (N, W), mask (N, W)) of the completion
    tokens, each prompt + completion its own unpadded forward."""
    width = max(len(r.ids) for r in rollouts)
    ref, mask = torch.zeros(len(rollouts), width), torch.zeros(len(rollouts), width)
    rows = []
    for i, r in enumerate(rollouts):
        p = ex_list[r.prompt].prompt_ids
        seq = torch.tensor([p + r.ids])
        lp = torch.log_softmax(model(seq).logits[0].float() / temperature, -1)
        rows.append(torch.stack([lp[len(p) - 1 + j, t] for j, t in enumerate(r.ids)]))
        with torch.no_grad(), lorakit.disable_adapters(model):
            lr_ = torch.log_softmax(model(seq).logits[0].float() / temperature, -1)
        ref[i, : len(r.ids)] = torch.stack([lr_[len(p) - 1 + j, t] for j, t in enumerate(r.ids)])
        mask[i, : len(r.ids)] = 1
    logps = torch.stack([torch.nn.functional.pad(x, (0, width - len(x))) for x in rows])
    return logps, ref, mask


def _by_hand(model, ex_list, rollouts, rewards, g, temperature, beta):
    """grpo_loss on the same completions, each prompt + completion its own unpadded forward."""
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float32), g)
    logps, ref, mask = _hand_logps(model, ex_list, rollouts, temperature)
    return grpo_loss(logps, logps.detach(), adv, mask, beta=beta, ref_logps=ref).mean()


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_step_loss_and_gradient_equal_grpo_loss_by_hand(beta, tmp_path):
    model, tok, ds = _setup(tmp_path, n=3)
    obj = _objective(model, tok, beta=beta, g=3)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    try:
        torch.manual_seed(5)
        s, n, metrics = obj.micro_loss(model, ds.examples, 0)
        (s / n).backward()
        got = [p.grad.clone() for p in params]
        model.zero_grad()
        torch.manual_seed(5)  # the same request seeds: the same completions
        rollouts = obj.rollouts(ds.examples, 3, 0.9)
    finally:
        obj.engine.stop()
    texts = [r.text for r in rollouts]
    assert n == 9 and len(set(texts)) > 6  # sampled, not greedy
    rewards = checksum(None, texts)
    assert metrics["reward_checksum"] == pytest.approx(sum(rewards)) and metrics["reward_exact"] == 0.0
    assert metrics["completion_length"] == sum(len(r.ids) for r in rollouts)
    assert ("kl" in metrics) == (beta > 0)
    want = _by_hand(model, ds.examples, rollouts, rewards, 3, 0.9, beta)
    want.backward()
    torch.testing.assert_close(s / n, want.detach(), atol=1e-6, rtol=1e-5)
    assert any(float(g.abs().max()) > 1e-4 for g in got)  # a real gradient
    for a, p in zip(got, params):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-4)


def test_second_update_replays_the_batch_against_the_old_logps(tmp_path):
    """--grpo-iterations 2: the first update is the on-policy step bit for bit; after a large update, the
    second one's loss and gradient are grpo_loss by hand on the same completions against the log-probs of
    the policy before the update (the clip binds: clipped tokens counted, the gradient differs unclipped)."""
    model, tok, ds = _setup(tmp_path, n=2)
    obj = _objective(model, tok, beta=0.1, g=4)
    obj.iterations, obj.epsilon_high = 2, 0.3
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def grads(loss, retain=False):
        loss.backward(retain_graph=retain)
        out = [p.grad.clone() for p in params]
        model.zero_grad()
        return out

    try:
        torch.manual_seed(5)
        first, second = obj.updates([ds.examples], 0)
        s1, n1, m1 = first[0](model)
        g1 = grads(s1 / n1)
        torch.manual_seed(5)
        obj.iterations = 1
        (only,) = obj.updates([ds.examples], 0)
        s0, n0, m0 = only[0](model)  # what --grpo-iterations 1 computes
        obj.iterations = 2
        assert torch.equal(s0, s1) and all(torch.equal(a, b) for a, b in zip(grads(s0 / n0), g1))
        assert m1 == {**m0, "kl": m0["kl"] / 2, "clip_ratio_low": 0.0, "clip_ratio_high": 0.0,
                      "clip_ratio_region": 0.0}  # fmt: skip
        torch.manual_seed(5)
        rollouts = obj.rollouts(ds.examples, 4, 0.9)
        adv = group_advantages(torch.tensor(checksum(None, [r.text for r in rollouts])), 4)
        with torch.no_grad():
            old, _, mask = _hand_logps(model, ds.examples, rollouts, 0.9)
            norm = torch.sqrt(sum((g**2).sum() for g in g1))
            for p, g in zip(params, g1):
                p -= 8.0 * g / norm  # a large step: many ratios leave [0.8, 1.3]
        s2, n2, m2 = second[0](model)
        g2 = grads(s2 / n2)
    finally:
        obj.engine.stop()
    logps, ref, _ = _hand_logps(model, ds.examples, rollouts, 0.9)
    want = grpo_loss(logps, old, adv, mask, 0.2, 0.1, ref, epsilon_high=0.3).mean()
    torch.testing.assert_close(s2 / n2, want.detach(), atol=1e-6, rtol=1e-5)
    for a, b in zip(g2, grads(want, retain=True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    ratio, a = torch.exp(logps.detach() - old), adv.unsqueeze(1)
    low, high = (ratio < 0.8) & (a < 0) & (mask > 0), (ratio > 1.3) & (a > 0) & (mask > 0)
    per = [
        (x.sum(1) / mask.sum(1)).sum().item() / 2 for x in (low, high, low | high)
    ]  # 1/2: mean of 2 updates
    assert [m2[f"clip_ratio_{k}"] for k in ("low", "high", "region")] == pytest.approx(per, abs=1e-6)
    assert m2["clip_ratio_low"] > 0 and m2["clip_ratio_high"] > 0
    unclipped = grads(grpo_loss(logps, old, adv, mask, 1e9, 0.1, ref).mean())
    assert max(float((a - b).abs().max()) for a, b in zip(g2, unclipped)) > 1e-3


def test_rollouts_come_from_the_live_adapter(tmp_path):
    """The engine's completions are the model's as it is now: greedy ones equal `generate_answers` with the
    adapter on, and change, without restarting the engine, when the adapter's weights change in place."""
    from lorakit.train.evaluate import generate_answers

    model, tok, ds = _setup(tmp_path)
    prompts = [ex.prompt_ids for ex in ds.examples]
    engine = LiveEngine(model, tok, max_batch=8).start()
    try:
        seeds = list(range(len(prompts) * 2))
        before = [r.text for r in sample(engine, prompts, 1, 0.0, 6)]
        sampled = [r.text for r in sample(engine, prompts, 2, 1.0, 6, seeds)]
        assert before == generate_answers(model, tok, prompts, 6)
        with lorakit.disable_adapters(model):
            assert [r.text for r in sample(engine, prompts, 1, 0.0, 6)] != before  # the adapter matters
        randomize_adapters(model, std=0.5, seed=9)  # the optimizer's kind of change: in place
        after = [r.text for r in sample(engine, prompts, 1, 0.0, 6)]
        assert after == generate_answers(model, tok, prompts, 6) and after != before
        assert [r.text for r in sample(engine, prompts, 2, 1.0, 6, seeds)] != sampled
    finally:
        engine.stop()


# -- the loop: resume ----------------------------------------------------------------------------------------


def _fit(tmp_path, name, **kw):
    model, tok, ds = _setup(tmp_path, n=6)
    cfg = TrainConfig(
        output=str(tmp_path / name), mode="grpo", reward="exact", steps=4, lr=5e-2, warmup=0.0, batch_size=2,
        log_every=1, num_generations=3, **kw,
    )  # fmt: skip
    obj = _objective(model, tok, beta=cfg.beta, g=3)
    obj.iterations, obj.epsilon_high = cfg.grpo_iterations, cfg.epsilon_high
    try:
        loop.fit(model, ds.examples, cfg, pad_id=0, objective=obj)
    finally:
        obj.engine.stop()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("iterations", [1, 2])
def test_resume_after_interrupt_is_exact(iterations, tmp_path, monkeypatch):
    """Ctrl-C mid-run checkpoints; --resume samples the same completions and ends with the same adapter; with
    --grpo-iterations 2 each step is 2 updates (the schedule counts them) and logs clip ratios."""
    opts = dict(beta=0.05, grad_accum=2, grpo_iterations=iterations, epsilon_high=0.28)
    whole = _fit(tmp_path, "whole", **opts)
    calls = {"n": 0}
    plain = grpo_mod.GrpoObjective.micro_loss

    def interrupting(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 2: the loop finishes it, checkpoints and stops
            os.kill(os.getpid(), signal.SIGINT)
        return plain(self, *args, **kw)

    monkeypatch.setattr(grpo_mod.GrpoObjective, "micro_loss", interrupting)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path, "cut", **opts)
    monkeypatch.setattr(grpo_mod.GrpoObjective, "micro_loss", plain)
    resumed = _fit(tmp_path, "cut", resume=True, **opts)
    assert whole.keys() == resumed.keys()
    assert max(float((whole[k] - resumed[k]).abs().max()) for k in whole) < 1e-6
    records = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    straight = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_checksum"] for r in records] == [r["reward_checksum"] for r in straight]
    assert [r["lr"] for r in records] == [
        5e-2 * optim.lr_factor(iterations * s, iterations * 4, 0) for s in range(4)
    ]
    assert all(("clip_ratio_region" in r) == (iterations > 1) for r in records)


# -- data and CLI --------------------------------------------------------------------------------------------


def test_prompt_rows_name_file_and_line(tmp_path):
    tok = tiny_tokenizer()
    rows = _rows(3)
    del rows[1]["answer"]
    with pytest.raises(DataError, match=r"p\.jsonl:2: field 'answer' is missing"):
        load_prompts(_write(tmp_path / "p.jsonl", rows), tok, 64, 6, required=("answer",))
    rows = _rows(3)
    rows[2]["prompt"] = "x" * 60
    with pytest.raises(DataError, match=r"p\.jsonl:3: the prompt is \d+ tokens, and with max_new_tokens=6"):
        load_prompts(_write(tmp_path / "p.jsonl", rows), tok, 64, 6)
    bad = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    with pytest.raises(DataError, match=r"p\.jsonl:1: the conversation ends with an assistant turn"):
        load_prompts(_write(tmp_path / "p.jsonl", bad), tok, 64, 6)
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'prompt' is missing and there is no 'messages'"):
        load_prompts(_write(tmp_path / "p.jsonl", [{"answer": "1"}]), tok, 64, 6)
    chat = load_prompts(
        _write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]), tok
    )
    assert (
        tok.decode(chat.examples[0].prompt_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        _rows(1)[0]["level"]
        == load_prompts(_write(tmp_path / "p.jsonl", _rows(1)), tok).examples[0].fields["level"]
    )


def test_cli_errors(tmp_path, capsys):
    from lorakit.cli import main

    data = _write(tmp_path / "p.jsonl", _rows())
    model_dir = quantizable_llama_dir(tmp_path / "model")
    base = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--mode",
        "grpo",
        "--output",
        str(tmp_path / "o"),
    ]
    for extra, why in (
        ([], "--mode grpo needs at least one --reward"),
        (
            ["--reward", "exact", "--num-generations", "1"],
            "--num-generations=1 is invalid: expected an integer >= 2",
        ),
        (["--reward", "exact", "--temperature", "0"], r"--temperature=0.0 is invalid"),
        (["--reward", "exact", "--beta", "-1"], r"--beta=-1.0 is invalid: expected a positive number or 0"),
        (["--reward", "exact", "--grpo-iterations", "0"], r"--grpo-iterations=0 is invalid: expected an int"),
        (["--reward", "exact", "--epsilon", "0"], r"--epsilon=0.0 is invalid: expected a finite number > 0"),
        (["--reward", "exact", "--epsilon", "nan"], r"--epsilon=nan is invalid"),
        (["--reward", "exact", "--epsilon-high", "inf"], r"--epsilon-high=inf is invalid"),
        (["--reward", "exact", "--epsilon-high", "-0.1"], r"--epsilon-high=-0.1 is invalid"),
        (["--reward", "nosuchmod_xyz:f"], "--reward nosuchmod_xyz:f: cannot import module"),
        (["--reward", "exact:gold", "--max-len", "64"], r"p\.jsonl:1: field 'gold' is missing"),
        (["--reward", "exact", "--max-len", "16"], r"p\.jsonl:1: the prompt is \d+ tokens, and with max_new"),
    ):
        capsys.readouterr()
        assert main(base + extra) != 0
        assert re.search(why, capsys.readouterr().err), (extra, why)
    assert not (tmp_path / "o").exists()  # nothing written by a refused run
    assert main(["train", "--mode", "grpo", "--reward", "exact", "--model", str(model_dir)]) != 0
    assert "--mode grpo needs --data" in capsys.readouterr().err


def test_cli_run_writes_grpo_metrics(tmp_path, capsys):
    from lorakit.cli import main

    model_dir = quantizable_llama_dir(tmp_path / "model")
    data = _write(tmp_path / "p.jsonl", _rows())
    out = tmp_path / "run"
    code = main(
        ["train", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data), "--mode", "grpo",
         "--reward", "exact", "--reward", r"regex:\d+", "--output", str(out), "--steps", "2", "--batch-size", "2",
         "--num-generations", "3", "--max-new-tokens", "4", "--lr", "0.05", "--rank", "4", "--max-len", "64",
         "--beta", "0.1", "--eval-every", "2", "--log-every", "1", "--grpo-iterations", "2", "--epsilon-high", "0.3"]
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for m in (results["before"], results["after"]):
        assert m["n"] == 4 and m["reward"] == m["reward_exact"] + m["reward_regex"]
        assert m["exact_match"] == m["reward_exact"] and 1 <= m["completion_length"] <= 5
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    keys = {"reward", "reward_std", "reward_exact", "reward_exact_std", "reward_regex", "exact_match", "kl",
            "completion_length", "truncated", "frac_reward_zero_std", "clip_ratio_low", "clip_ratio_high",
            "clip_ratio_region"}  # fmt: skip
    assert all(keys <= r.keys() for r in steps)
    assert any("eval_reward" in r and "eval_exact_match" in r for r in records)
    err = capsys.readouterr().err
    assert "reward " in err and "step 2: eval reward" in err and " clip " in err
    assert "2 updates per rollout batch (clip epsilon 0.2, epsilon high 0.3)" in err
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()


def test_resume_refuses_another_objective(tmp_path):
    """A checkpoint of a GRPO run does not resume under another number of updates per rollout batch."""
    from lorakit.train import checkpoint

    config = {"mode": "grpo", "grpo_iterations": 1, "epsilon": 0.2}
    ckpt = checkpoint.Checkpoint(tmp_path / "checkpoint", 1, 4, 0, 0.0, config, {}, {}, [])
    with pytest.raises(ValueError, match="grpo_iterations: checkpoint 1, now 2"):
        checkpoint.check_config(ckpt, {"mode": "grpo", "grpo_iterations": 2, "epsilon": 0.2}, 4)
    checkpoint.check_config(ckpt, {"mode": "grpo", "grpo_iterations": 1, "epsilon": 0.2}, 4)
