"""lorakit's DPO (sigmoid, IPO, hinge), ORPO and KTO losses and gradients equal TRL's (trl 1.16) within 1e-5.

The same tiny Llama, the same rows, the same adapter weights: TRL trains a PEFT adapter (its reference is the
adapter disabled, as lorakit's), lorakit an adapter holding PEFT's tensors. DPO and KTO go through TRL's
own trainers (dataset tokenization, collator, compute_loss); ORPO through TRL's ORPOTrainer.concatenated_forward
and odds_ratio_loss (its NLL term differs by design, see test_orpo_matches_trl).
"""

import json

import pytest
import torch

import lorakit
from conftest import tiny_llama, tiny_tokenizer
from lorakit.data.preference import collate_kto, collate_pairs, load_preference
from lorakit.train.preference.objective import PreferenceObjective

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"question {i}?"}],
        "chosen": [{"role": "assistant", "content": "yes " * (i % 3 + 1) + str(i)}],
        "rejected": [{"role": "assistant", "content": f"no, {i * 7}!"}],
    }
    for i in range(4)
]
KTO_ROWS = [
    {
        "prompt": [{"role": "user", "content": f"q{i}"}],
        "completion": [{"role": "assistant", "content": f"answer {i * 3}" + "!" * i}],
        "label": i % 3 != 1,
    }
    for i in range(4)
]


def _peft_config():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)


def _randomize_peft(model, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _lorakit_twin(peft_model):
    """A fresh tiny Llama (the same base weights) with a lorakit adapter holding the PEFT adapter's tensors."""
    ours = tiny_llama()
    lorakit.add_adapter(ours, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS))
    theirs = dict(peft_model.named_parameters())
    mine = dict(ours.named_parameters())
    mapping = {}
    for n, p in theirs.items():
        if "lora_" not in n:
            continue
        key = n.removeprefix("base_model.model.").replace("lora_A.default.weight", "lora.default.A")
        key = key.replace("lora_B.default.weight", "lora.default.B")
        with torch.no_grad():
            mine[key].copy_(p)
        mapping[key] = n
    assert len(mapping) == sum(1 for n in mine if ".lora." in n) > 0
    return ours, mapping


def _assert_same_grads(ours, peft_model, mapping):
    theirs = dict(peft_model.named_parameters())
    for key, p in ours.named_parameters():
        if key in mapping:
            torch.testing.assert_close(p.grad, theirs[mapping[key]].grad, atol=1e-5, rtol=1e-4)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trainer(kind, rows, tmp_path, seed=5, **cfg):
    args_cls = {"dpo": trl.DPOConfig, "kto": trl.KTOConfig}[kind]
    trainer_cls = {"dpo": trl.DPOTrainer, "kto": trl.KTOTrainer}[kind]
    args = args_cls(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), report_to=[], use_cpu=True,
        max_length=None, logging_steps=1, **cfg,
    )  # fmt: skip
    tr = trainer_cls(
        model=tiny_llama(), args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tiny_tokenizer(), peft_config=_peft_config(),
    )  # fmt: skip
    _randomize_peft(tr.model, seed)
    tr.model.train()
    return tr, tr.data_collator([tr.train_dataset[i] for i in range(len(rows))])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_trl(loss_type, tmp_path):
    beta = 0.1 if loss_type != "ipo" else 0.5
    tr, batch = _trainer("dpo", PAIRS, tmp_path, beta=beta, loss_type=[loss_type])
    expected = tr.compute_loss(tr.model, batch)
    expected.backward()

    ours, mapping = _lorakit_twin(tr.model)
    ds = load_preference(_write(tmp_path / "pairs.jsonl", PAIRS), tiny_tokenizer(), "dpo", max_len=64)
    mine = collate_pairs(ds.examples, pad_id=0)
    # The same tokens and the same loss mask (TRL's completion mask, shifted as the labels are read).
    torch.testing.assert_close(mine["input_ids"], batch["input_ids"])
    assert torch.equal(mine["labels"][:, 1:] != -100, batch["completion_mask"][:, 1:].bool())

    s, n, metrics = PreferenceObjective("dpo", beta, loss_type).micro_loss(ours, ds.examples, pad_id=0)
    (s / n).backward()
    assert abs(expected.item()) > 1e-3  # a loss with something in it
    torch.testing.assert_close(s / n, expected.detach(), atol=1e-5, rtol=1e-5)
    _assert_same_grads(ours, tr.model, mapping)
    trl_acc = tr._metrics["train"]["rewards/accuracies"][-1]
    assert metrics["reward_accuracy"] / n == pytest.approx(trl_acc)
    assert metrics["reward_margin"] / n == pytest.approx(
        tr._metrics["train"]["rewards/margins"][-1], abs=1e-5
    )


KTO_SEED = 7


def test_kto_matches_trl(tmp_path):
    # KTO_SEED: adapter weights under which the mismatched pairs' mean log-ratio is > 0 (not clamped away)
    tr, batch = _trainer(
        "kto", KTO_ROWS, tmp_path, seed=KTO_SEED, beta=0.2, desirable_weight=1.3, undesirable_weight=0.7
    )
    expected = tr.compute_loss(tr.model, batch)
    expected.backward()

    ours, mapping = _lorakit_twin(tr.model)
    ds = load_preference(_write(tmp_path / "kto.jsonl", KTO_ROWS), tiny_tokenizer(), "kto", max_len=64)
    mine = collate_kto(ds.examples, pad_id=0)
    torch.testing.assert_close(mine["input_ids"], batch["input_ids"])
    torch.testing.assert_close(mine["kl_input_ids"], batch["KL_input_ids"])  # the same mismatched pairs
    obj = PreferenceObjective("kto", beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    s, n, metrics = obj.micro_loss(ours, ds.examples, pad_id=0)
    (s / n).backward()
    assert metrics["kl"] / n == pytest.approx(tr._metrics["train"]["kl"][-1], abs=1e-6)
    assert metrics["kl"] > 0  # the KL term is active (not clamped to 0)
    torch.testing.assert_close(s / n, expected.detach(), atol=1e-5, rtol=1e-5)
    _assert_same_grads(ours, tr.model, mapping)


def test_orpo_matches_trl(tmp_path):
    """The odds-ratio term through TRL's own forward and loss; lorakit's NLL term covers the chosen answer's
    tokens only (as SFT), where TRL's covers the prompt too, so that term is checked against the same
    answer-only cross-entropy taken from TRL's forward."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    ds = load_preference(_write(tmp_path / "pairs.jsonl", PAIRS), tiny_tokenizer(), "orpo", max_len=64)
    trainer = ORPOTrainer.__new__(ORPOTrainer)  # only its forward and loss are used: no dataset processing
    trainer.args = ORPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, beta=0.25)
    trainer.beta, trainer.is_encoder_decoder, trainer.padding_value, trainer.aux_loss_enabled = (
        0.25,
        False,
        0,
        False,
    )
    from accelerate import Accelerator

    trainer.accelerator = Accelerator(cpu=True)
    theirs = peft.get_peft_model(tiny_llama(), _peft_config())
    _randomize_peft(theirs)
    b = collate_pairs(ds.examples, pad_id=0)
    k = len(ds.examples)
    batch = {
        f"{side}_{key}": b[name][rows]
        for side, rows in (("chosen", slice(0, k)), ("rejected", slice(k, 2 * k)))
        for key, name in (
            ("input_ids", "input_ids"),
            ("attention_mask", "attention_mask"),
            ("labels", "labels"),
        )
    }
    chosen_lp, rejected_lp, chosen_logits, _, _ = trainer.concatenated_forward(theirs, batch)
    losses, *_ = trainer.odds_ratio_loss(chosen_lp, rejected_lp)
    labels = batch["chosen_labels"][:, 1:]
    token_nll = torch.nn.functional.cross_entropy(chosen_logits.transpose(1, 2), labels, reduction="none")
    nll = (token_nll.sum(1) / (labels != -100).sum(1)).mean()  # per answer, mean over its tokens
    expected = nll - losses.mean()
    expected.backward()

    ours, mapping = _lorakit_twin(theirs)
    s, n, _ = PreferenceObjective("orpo", beta=0.25).micro_loss(ours, ds.examples, pad_id=0)
    (s / n).backward()
    torch.testing.assert_close(s / n, expected.detach(), atol=1e-5, rtol=1e-5)
    _assert_same_grads(ours, theirs, mapping)


def test_group_advantages():
    from lorakit.train.preference.losses import group_advantages

    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0, 3.0])
    got = group_advantages(r, 4)
    want = torch.cat([(g - g.mean()) / (g.std() + 1e-4) for g in (r[:4], r[4:])])
    torch.testing.assert_close(got, want)
    assert torch.equal(
        group_advantages(torch.ones(4), 4), torch.zeros(4)
    )  # a group all alike teaches nothing


@pytest.mark.parametrize("beta,epsilon_high", [(0.0, None), (0.05, None), (0.05, 0.28)])
def test_grpo_objective_matches_trl(beta, epsilon_high, tmp_path):
    """GRPOTrainer._compute_loss (loss_type "grpo") on a fixed batch of completions: the same loss and
    gradients, with ratios inside and outside the clip range (symmetric, or TRL's epsilon_high) and the
    optional KL term to the reference."""
    from lorakit.train.preference.losses import grpo_loss
    from lorakit.train.preference.objective import token_logps

    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=4, report_to=[],
        use_cpu=True, bf16=False, beta=beta, epsilon=0.2, epsilon_high=epsilon_high, max_completion_length=8, logging_steps=1, loss_type="grpo",
    )  # fmt: skip
    tr = trl.GRPOTrainer(
        model=tiny_llama(), reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
        train_dataset=datasets.Dataset.from_list([{"prompt": "hi"}] * 4), processing_class=tiny_tokenizer(),
        peft_config=_peft_config(),
    )  # fmt: skip
    _randomize_peft(tr.model)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(6, 100, (1, 5), generator=g).expand(4, 5)
    completion = torch.randint(6, 100, (4, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0], [1] * 2 + [0] * 4])
    advantages = torch.tensor([1.2, -0.4, 0.7, -1.5])

    ours, mapping = _lorakit_twin(tr.model)
    ids = torch.cat([prompt, completion], 1)
    labels = torch.cat([torch.full_like(prompt, -100), completion.masked_fill(mask == 0, -100)], 1)
    attention = torch.cat([torch.ones_like(prompt), mask], 1)
    logps = token_logps(ours, ids, attention, labels)[:, prompt.shape[1] - 1 :]
    # The sampling policy's log-probs: off by up to ±0.4 nats, so some ratios leave [0.8, 1.2] (clipped).
    old = (logps.detach() + (torch.rand(logps.shape, generator=g) - 0.5) * 0.8) * mask
    ref = (logps.detach() + (torch.rand(logps.shape, generator=g) - 0.5) * 0.5) * mask
    ratio = torch.exp(logps.detach() - old)[mask.bool()]
    assert ((ratio < 0.8) | (ratio > 1.2)).any() and ((ratio > 0.8) & (ratio < 1.2)).any()
    assert ((ratio > 1.2) & (ratio < 1.28)).any() and (ratio > 1.28).any()  # epsilon_high matters

    inputs = {
        "prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
        "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }  # fmt: skip
    expected = tr._compute_loss(tr.model, inputs)
    expected.backward()
    mine = grpo_loss(
        logps, old, advantages, mask, epsilon=0.2, beta=beta, ref_logps=ref, epsilon_high=epsilon_high
    ).mean()
    mine.backward()
    torch.testing.assert_close(mine, expected.detach(), atol=1e-5, rtol=1e-5)
    _assert_same_grads(ours, tr.model, mapping)


def test_kto_step_kl_is_trls_over_processes(tmp_path):
    """TRL on N processes: z0 = clamp(mean over processes of each one's micro-batch mean log-ratio on its
    mismatched pairs). lorakit takes one z0 per optimizer step, over all its micro-batches and processes: with
    the two halves of KTO_ROWS as the step's micro-batches (two processes, or one with 2 accumulation steps),
    it equals TRL's two-process value, built from TRL's KL of each half (each > 0, so clamping each half
    first changes nothing). A z0 per micro-batch (lorakit before, TRL under accumulation) would not."""
    from lorakit.train import distributed

    halves = [KTO_ROWS[:2], KTO_ROWS[2:]]
    trl_kl = []
    for i, half in enumerate(halves):
        tr, batch = _trainer("kto", half, tmp_path / f"trl{i}", seed=KTO_SEED, beta=0.2)
        tr.compute_loss(tr.model, batch)
        trl_kl.append(tr._metrics["train"]["kl"][-1])
    assert min(trl_kl) > 0 and abs(trl_kl[0] - trl_kl[1]) > 1e-3, trl_kl

    ours, _ = _lorakit_twin(tr.model)
    ds = load_preference(_write(tmp_path / "kto.jsonl", KTO_ROWS), tiny_tokenizer(), "kto", max_len=64)
    micros = [ds.examples[:2], ds.examples[2:]]
    obj = PreferenceObjective("kto", beta=0.2)
    ctx = distributed.Context()
    shared = obj.step_options(distributed.wrap(ours, ctx, "ddp"), micros, 0, ctx)
    assert shared["kl"] == pytest.approx(sum(trl_kl) / 2, abs=1e-5)  # float32 sums of ~30-nat log-probs
    # Each micro-batch's loss uses that z0 (the KL metric reports it), not its own estimate.
    for micro, own in zip(micros, trl_kl):
        _, n, metrics = obj.micro_loss(ours, micro, pad_id=0, **shared)
        assert metrics["kl"] / n == pytest.approx(shared["kl"], abs=1e-6)
        assert obj.micro_loss(ours, micro, pad_id=0)[2]["kl"] / n == pytest.approx(own, abs=1e-5)
