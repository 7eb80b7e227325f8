"""The causal-LM training loss, plain or chunked so that large vocabularies fit in memory.

The plain loss materialises all N×V logits in fp32 and, in backward, their gradient: for SmolLM2 (V = 49152)
at 4×256 tokens that is 200 MB each, more than the rest of the LoRA step. The chunked loss takes the base
transformer's last hidden states h (N×d) and the output head, and computes the cross-entropy `chunk` rows at a
time; at no moment do more than chunk×V logits exist.

Two chunked paths:
- a plain Linear head (tied or not, frozen or trainable): `_LinearCrossEntropy` computes each chunk's loss and
  its gradients in the same pass (Liger-style), keeping only dh (N×d) and, if W trains, dW (V×d). For one
  chunk, with logits z = h Wᵀ + b, p = softmax(z), y the label rows (one-hot):
      loss = Σ_rows logsumexp(z) - z[y];   dz = p - y;   dh = dz W;   dW = dzᵀ h;   db = Σ_rows dz.
  backward only scales the stored gradients by the incoming grad_output: no recomputation.
- an adapted head (LoRA, trainable tokens, modules_to_save, any other module): the head module is called on
  each chunk under activation checkpointing, so its logits are dropped after the forward and recomputed one
  chunk at a time in backward. Exact for any row-wise head.
Models whose forward changes the logits after the head (Gemma-2 soft-capping, Cohere / Granite scaling), models
without a separate decoder, and heads with per-row adapters use the plain loss, with a warning saying why.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import rowstate

IGNORE = -100
_LOGIT_CHANGES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scaling")


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Tensor,
    chunk: int = 0,
    position_ids: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Sum of next-token cross-entropies and the number of tokens it sums over.

    Args:
        model: a transformers causal LM (`model(input_ids, attention_mask).logits`), with or without adapters.
        input_ids: (batch, seq) token ids. attention_mask: (batch, seq) or None. labels: (batch, seq), the
            targets *unshifted* (position t predicts labels[t + 1]); -100 where no loss is taken.
        chunk: 0 for the plain loss; > 0 to compute the cross-entropy `chunk` tokens at a time.
        position_ids: (batch, seq) or None; with attention_mask=None, rows packed into one sequence (positions
            restarting at 0 per row, see `lorakit.train.packing`).
    Returns:
        (loss_sum, n_tokens): a 0-dim fp32 tensor (differentiable) and a Python int. The mean loss is
        loss_sum / n_tokens; summing both over micro-batches gives the exact mean over an accumulated batch.
    Raises:
        ValueError: chunk < 0, or labels / input_ids of different shapes.
    """
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0 (0 = plain loss), got {chunk}")
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    targets = labels[:, 1:].reshape(-1)
    n_tokens = int((targets != IGNORE).sum())
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:  # only when given: not every model's forward takes position_ids
        inputs["position_ids"] = position_ids
    reason = why_not_chunked(model) if chunk > 0 else "chunk=0"
    if reason != "":
        if chunk > 0:
            warnings.warn(
                f"causal_lm_loss: chunk={chunk} not possible ({reason}); using the plain loss", stacklevel=2
            )
        logits = model(**inputs, use_cache=False).logits
        logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum"), n_tokens

    hidden = model.base_model(**inputs, use_cache=False)[0]
    keep = targets != IGNORE
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]  # only rows that carry a loss
    y = targets[keep]
    head = model.get_output_embeddings()
    if _is_plain_linear(head):
        bias = head.bias if head.bias is not None else None
        return _LinearCrossEntropy.apply(h, head.weight, bias, y, chunk), n_tokens
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        total = total + checkpoint(_head_ce, head, h[s : s + chunk], y[s : s + chunk], use_reentrant=False)
    return total, n_tokens


def _head_ce(head: nn.Module, h: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def why_not_chunked(model: nn.Module) -> str:
    """'' if the chunked loss computes exactly what model(...).logits would, else the reason it cannot."""
    from .layers import LoraLayer

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        return f"{type(model).__name__} has no separate base transformer and output head"
    config = getattr(model, "config", None)
    configs = [config]
    if config is not None and hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for c in configs:
        for attr in _LOGIT_CHANGES:
            value = getattr(c, attr, None)
            if value not in (None, 1, 1.0, False):
                return f"{type(model).__name__} changes its logits after the head ({attr}={value})"
    mapping = rowstate.current()
    if isinstance(head, LoraLayer) and mapping is not None and mapping.covers(head):
        return "the output head has per-row adapters"
    return ""


def _is_plain_linear(head: nn.Module) -> bool:
    """A head whose output is exactly F.linear(h, head.weight, head.bias)."""
    from .layers import LoraLayer

    if isinstance(head, LoraLayer):
        if head.base_class is not nn.Linear:  # a quantized Linear subclass has no usable .weight
            return False
        return not head.live_adapters()
    return type(head) is nn.Linear


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ cross_entropy(h Wᵀ + b, y), `chunk` rows at a time, gradients computed during the forward pass.

    h: (M, d), W: (V, d), b: (V,) or None, y: (M,) valid class ids. Returns a 0-dim fp32 tensor.
    """

    @staticmethod
    def forward(ctx, h: Tensor, W: Tensor, b: Tensor | None, y: Tensor, chunk: int) -> Tensor:
        need_h, need_W, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(h) if need_h else None
        dW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_W else None
        db = torch.zeros(W.shape[0], dtype=torch.float32, device=W.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s : s + chunk], y[s : s + chunk]
            z = F.linear(hc, W, b).float()  # the plain path's logits, upcast as it does
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, yc.unsqueeze(1)).squeeze(1)).sum()
            if not (need_h or need_W or need_b):
                continue
            dz = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place over the logits
            dz[torch.arange(len(yc), device=dz.device), yc] -= 1.0
            if need_b:
                db += dz.sum(0)
            if need_W:
                dW.addmm_(dz.t(), hc.float())
            if need_h:
                torch.mm(dz.to(h.dtype), W, out=dh[s : s + chunk])
        ctx.save_for_backward(dh, dW, db)
        ctx.dtypes = (W.dtype, None if b is None else b.dtype)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        dh, dW, db = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if dh is None else dh * grad.to(dh.dtype),
            None if dW is None else (dW * grad).to(w_dtype),
            None if db is None else (db * grad).to(b_dtype),
            None,
            None,
        )
