"""Evaluation: mean token loss, perplexity and greedy exact match of a model on a Dataset.

No adapter logic lives here: evaluate whatever model it is given (a base, a model with adapters, a merged one).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from ..data import Dataset, collate, pad_id_of
from ..data.formats import render
from ..losses import causal_lm_loss
from .metrics import RowProgress

# Generation stops this many tokens after the reference's length: a longer output cannot match it (only
# whitespace would be stripped), so decoding further only costs time.
SLACK_TOKENS = 16
# The loss takes the output head on loss tokens only, this many at a time: answers are a small part of a row.
LOSS_CHUNK = 1024


def perplexity(loss: float) -> float:
    """exp(loss), clamped where exp overflows a float (the one clamp the run log and eval share)."""
    return math.exp(min(loss, 700.0))


@torch.no_grad()
def heldout_loss(model, examples: list, batch_size: int, pad_id: int, chunk: int = 0) -> tuple[float, int]:
    """(mean cross-entropy over every loss token of `examples`, that token count); NaN when there are none.

    The one held-out loss of lorakit (the training loop's eval and `evaluate`). Runs in eval mode and
    restores the model's mode. chunk: the chunked output-head loss size (0: the plain loss).
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
            # A model the chunked loss cannot take gets the (exact) plain loss: no warning on every batch.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss_sum, n = causal_lm_loss(
                    model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk
                )
            total += float(loss_sum)
            count += n
    finally:
        model.train(was_training)
    return (total / count if count else float("nan")), count


def describe_dataset(dataset: Dataset) -> str:
    """What a Dataset holds, in the user's units: rows for SFT; documents, tokens and packed blocks for text."""
    if dataset.format == "text":
        tokens = sum(len(ex.input_ids) for ex in dataset.examples)
        longest = max((len(ex.input_ids) for ex in dataset.examples), default=0)
        return (
            f"{len(dataset.rows)} documents, {tokens:,} tokens in {len(dataset.examples)} blocks of up to "
            f"{longest} tokens (text)"
        )
    return f"{len(dataset.examples)} rows ({dataset.format})"


@torch.no_grad()
def evaluate(
    model, tokenizer, dataset: Dataset, batch_size: int = 8, max_new_tokens: int = 64, progress=None
) -> dict:
    """Loss, perplexity and (for SFT data) greedy exact match of `model` on `dataset`.

    `progress`: a stream (stderr) for a progress line of the exact-match generation (rows done, ETA); None: quiet.

    loss: the mean cross-entropy over every loss token (labels != -100) of the dataset; perplexity = exp(loss).
    exact_match: the fraction of rows whose greedy answer, generated from the row's prompt (stopped at EOS or
    after `max_new_tokens`), equals the reference answer after stripping surrounding whitespace. None for "text".

    Returns:
        {"loss", "perplexity", "exact_match", "n" (examples), "tokens" (loss tokens),
         "samples" (up to 3 dicts {"reference", "generated"})}. The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        pad_id = pad_id_of(tokenizer)
        loss, count = heldout_loss(model, dataset.examples, batch_size, pad_id, LOSS_CHUNK)
        result = {
            "loss": loss,
            "perplexity": perplexity(loss),
            "exact_match": None,
            "n": len(dataset.examples),
            "tokens": count,
            "samples": [],
        }
        if dataset.format != "text":
            refs = [ex.answer for ex in dataset.examples]
            budget = (
                max((len(ex.input_ids) - len(ex.prompt_ids) for ex in dataset.examples), default=0)
                + SLACK_TOKENS
            )
            outs = generate_answers(
                model,
                tokenizer,
                [ex.prompt_ids for ex in dataset.examples],
                min(max_new_tokens, budget),
                batch_size,
                progress=progress,
            )
            hits = [o.strip() == r.strip() for o, r in zip(outs, refs)]
            result["exact_match"] = sum(hits) / len(hits) if hits else None
            result["samples"] = [{"reference": r, "generated": o} for r, o in list(zip(refs, outs))[:3]]
        return result
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: Sequence, max_new_tokens: int = 64, batch_size: int = 8, progress=None
) -> list[str]:
    """Greedy answers to `prompts`, batched and left-padded, each stopped at its first EOS.

    Args:
        prompts: each one of: a list of token ids (used as is), a list of chat messages (rendered with the chat
            template and a generation prompt), or a string (with a chat template: one user turn; else raw text).
        max_new_tokens: the most tokens generated per prompt.
        progress: a stream for a "generating: rows done / total, ETA" line (None: quiet).

    Returns:
        The decoded answers (special tokens dropped), in the order of `prompts`.
    """
    was_training = model.training
    model.eval()
    try:
        ids = [_prompt_ids(tokenizer, p) for p in prompts]
        order = sorted(
            range(len(ids)), key=lambda i: len(ids[i])
        )  # similar lengths share a batch: less padding
        out: list[str] = [""] * len(ids)
        device, pad_id, eos = _device(model), pad_id_of(tokenizer), _eos_ids(model, tokenizer)
        bar = RowProgress(len(order), "exact match: generating", progress) if progress is not None else None
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i], dtype=torch.long)
                mask[row, width - len(ids[i]) :] = 1
            gen = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_id,
                eos_token_id=sorted(eos) or None,
            )
            for row, i in enumerate(chunk):
                new = gen[row, width:].tolist()
                cut = next((j for j, t in enumerate(new) if t in eos), len(new))
                out[i] = tokenizer.decode(new[:cut], skip_special_tokens=True)
            if bar is not None:
                bar.update(start + len(chunk))
        if bar is not None:
            bar.close()
        return out
    finally:
        model.train(was_training)


def _prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        if getattr(tokenizer, "chat_template", None):
            prompt = [{"role": "user", "content": prompt}]
        else:
            return tokenizer(prompt)["input_ids"]
    if prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        return tokenizer(render(tokenizer, list(prompt), True), add_special_tokens=False)["input_ids"]
    raise ValueError(
        f"a prompt must be a string, a list of token ids or a list of messages, got {prompt!r:.80}"
    )


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _eos_ids(model, tokenizer) -> set[int]:
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(gen_eos) if isinstance(gen_eos, list) else ({gen_eos} if gen_eos is not None else set())
    return {int(t) for t in eos}


def eval_loss(model, examples: list, batch_size: int, pad_id: int, chunk: int = 0) -> dict[str, float]:
    """Token-averaged loss and perplexity of `model` on `examples` (evaluate.heldout_loss)."""
    loss, _ = heldout_loss(model, examples, batch_size, pad_id, chunk)
    return {"eval_loss": round(loss, 6), "eval_perplexity": round(perplexity(loss), 4)}


def format_metrics(metrics: dict) -> str:
    """The before / after line of an SFT run: loss, perplexity, exact match."""
    parts = [f"loss {metrics['loss']:.4f}", f"perplexity {metrics['perplexity']:.2f}"]
    if metrics.get("exact_match") is not None:
        parts.append(f"exact match {metrics['exact_match']:.1%}")
    return "  ".join(parts)


def skipped_note(dataset) -> str:
    """ ", N bad rows skipped, M rows ... truncated" of a Dataset, or ""."""
    cut = getattr(dataset, "truncated", 0)
    truncated = f", {cut} rows longer than --max-len truncated to it" if cut else ""
    return (f", {dataset.skipped} bad rows skipped" if getattr(dataset, "skipped", 0) else "") + truncated
