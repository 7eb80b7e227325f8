"""generate_text: one prompt in, one completion out (`lorakit generate`)."""

from __future__ import annotations

import torch


def format_prompt(tokenizer, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
    """Token ids of `prompt`: as a user turn (after a `system` turn when given) through the chat template, with
    the assistant header, when the tokenizer has one and `chat` is true, else the raw text.

    Raises:
        ValueError: a `system` prompt without a chat template to put it in.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if system:
        raise ValueError(
            "a system prompt needs a chat template (this tokenizer has none, or --raw was given)"
        )
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = True,
    system: str | None = None,
) -> str:
    """The model's completion of `prompt` (new tokens only, special tokens dropped).

    Args:
        temperature: 0 = greedy (deterministic); > 0 samples with that temperature, seeded by `seed`.
        system: a system prompt before the user turn (chat template only).
    Raises:
        ValueError: max_new_tokens < 1 or temperature < 0.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected a positive integer")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} is invalid: expected a number >= 0 (0: greedy)")
    device = next(model.parameters()).device
    ids = torch.tensor([format_prompt(tokenizer, prompt, chat, system)], device=device)
    kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    was_training = model.training
    model.eval()
    # Sampling draws from torch's global RNG (generate takes no generator): seed it inside a fork, so the
    # caller's RNG state is the same after the call as before.
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **kwargs,
            )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
