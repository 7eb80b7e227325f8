"""Initialisations that derive A and B from the base weight W and change W (the "residual" inits).

    A, B, W_new, keep_init = residual_factors(init, W, r, s)

W is the module's weight as an (out, in) matrix in fp32, s the adapter's scaling. The hook in
`adapters._add_lora` copies A, B into the adapter and W_new into the base layer; when `keep_init`, the
initial factors are kept so `save_adapter` writes the plain-LoRA equivalent ΔW - ΔW₀ for the untouched base.

- "pissa" (Meng et al. 2024): top-r SVD of W (`functional.pissa_factors`); W_new = W - s·BA. Saved as LoRA.
- "olora" (Büyükakyüz 2024, "OLoRA"): the thin QR decomposition W = QR; B = Q[:, :r] (out, r, orthonormal
  columns), A = R[:r] (r, in); W_new = W - s·BA, so the output is unchanged. Saved as LoRA (like PiSSA).
  The same as PEFT's `init_lora_weights="olora"` (tested on the same weights).
- "loftq" (Li et al. 2023, "LoftQ"), for a base that is then quantized to NF4: alternate T times
      Q_t = NF4(W - s·B_{t-1}A_{t-1})  (dequantized; B₀A₀ = 0),  s·B_t A_t = best rank-r approx. of W - Q_t,
  with bitsandbytes' NF4 (block size 64, fp32 absmax: PEFT's). W_new = Q_T: NF4 values, so quantizing the
  base afterwards (`--quantize 4bit`) reproduces it exactly, and Q_T + s·BA ≈ W better than NF4(W) alone.
  The adapter is saved as it is (it belongs to the quantized base Q_T, not to W). PEFT's `loftq_init` runs
  on CUDA only; the iteration is its algorithm, with one deliberate difference: the factors are divided by s
  (PEFT fits B·A, not s·B·A, to W - Q, right only when lora_alpha = r). Tested against PEFT's own code run on
  the CPU: Q equal, and A, B equal to PEFT's over √s (equal at alpha = r), for 1 and several iterations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import functional as LF
from .config import RESIDUAL_INITS

__all__ = ["RESIDUAL_INITS", "loftq_factors", "olora_factors", "residual_factors"]
LOFTQ_BLOCK = 64


def residual_factors(init: str, W: Tensor, r: int, scale: float, loftq_iter: int = 1):
    """(A (r, in), B (out, r), W_new (out, in), keep_init) in fp32 for a residual init; see the module doc.

    Raises:
        ValueError: an init that is not one of RESIDUAL_INITS. ImportError: loftq without bitsandbytes.
    """
    W = W.float()
    if init == "pissa":
        A, B, W_res = LF.pissa_factors(W, r, scale)
        return A, B, W_res, True
    if init == "olora":
        A, B = olora_factors(W, r)
        return A, B, W - LF.delta_weight(A, B, scale), True
    if init == "loftq":
        A, B, Q = loftq_factors(W, r, scale, loftq_iter)
        return A, B, Q, False
    raise ValueError(f"init={init!r} is not one of the residual inits {RESIDUAL_INITS}")


def olora_factors(W: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """OLoRA: W = QR (thin QR); A = R[:r] (r, in), B = Q[:, :r] (out, r)."""
    Q, R = torch.linalg.qr(W.float())
    return R[:r].contiguous(), Q[:, :r].contiguous()


def nf4_roundtrip(W: Tensor) -> Tensor:
    """W quantized to NF4 by bitsandbytes (blocks of 64, fp32 absmax) and dequantized, in fp32."""
    try:
        import bitsandbytes.functional as F
    except ImportError as err:
        raise ImportError(
            "init='loftq' needs bitsandbytes (its NF4 quantizer): pip install 'lorakit[quant]'"
        ) from err
    q, state = F.quantize_4bit(W.float().contiguous(), blocksize=LOFTQ_BLOCK, compress_statistics=False,
                               quant_type="nf4")  # fmt: skip
    return F.dequantize_4bit(q, state).float().reshape(W.shape)


def loftq_factors(W: Tensor, r: int, scale: float, num_iter: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """LoftQ: (A, B, Q) with Q an NF4 tensor and Q + scale·B A ≈ W (see the module docstring)."""
    if num_iter < 1:
        raise ValueError(f"loftq: num_iter={num_iter} is invalid: expected >= 1")
    W = W.float()
    A = torch.zeros(r, W.shape[1], dtype=W.dtype, device=W.device)
    B = torch.zeros(W.shape[0], r, dtype=W.dtype, device=W.device)
    for _ in range(num_iter):
        Q = nf4_roundtrip(W - LF.delta_weight(A, B, scale))
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        A, B = LF.svd_factors(U, S, Vh, r, scale)
    return A, B, Q
