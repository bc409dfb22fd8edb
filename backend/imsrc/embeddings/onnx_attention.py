"""Export transformer attention as ONNX Runtime's fused `Attention` operator (com.microsoft domain).

The TorchScript exporter writes nn.MultiheadAttention as ~60 small nodes per layer (the packed projection split by
Shape/Gather/Slice arithmetic, per-head Reshape/Transpose, scaled MatMuls, Softmax), and ONNX Runtime's transformer
optimizer recognises none of it in open_clip's graph. At batch 1 (every query) those nodes cost more than the
arithmetic: each one is a separate kernel launch and, with two threads, a wake-up of the other thread. ORT's
`Attention` contrib operator does the packed QKV projection, the scaled softmax attention and the head merge in one
kernel (the out-projection stays a plain MatMul).

`fused_attention(module)` swaps every open_clip ResidualAttentionBlock's nn.MultiheadAttention for FusedAttention
for the duration of an export only; the torch model itself is never changed. The swapped module computes the same
thing in torch (scaled_dot_product_attention), and the exported file is verified against the unmodified torch graph
like every export, so a mismatch is refused, never used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

DOMAIN = "com.microsoft"
CUSTOM_OPSETS = {DOMAIN: 1}


class _AttentionOp(torch.autograd.Function):
    """Q, K, V = x @ weight + bias (packed, weight (d, 3d)), per-head softmax(Q K^T / sqrt(d_head)) V, heads merged."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, heads: int, causal: bool
    ) -> torch.Tensor:
        b, s, d = x.shape
        qkv = (x @ weight + bias).reshape(b, s, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
        return out.transpose(1, 2).reshape(b, s, d)

    @staticmethod
    def symbolic(g: Any, x: Any, weight: Any, bias: Any, heads: int, causal: bool) -> Any:
        out = g.op(f"{DOMAIN}::Attention", x, weight, bias, num_heads_i=heads, unidirectional_i=int(causal))
        out.setType(x.type())
        return out


class FusedAttention(torch.nn.Module):
    """Stands in for a batch-first nn.MultiheadAttention (self-attention, no key padding) during export."""

    def __init__(self, mha: torch.nn.MultiheadAttention, causal: bool) -> None:
        super().__init__()
        self.heads = mha.num_heads
        self.causal = causal
        # ORT wants the packed projection as (d, 3d): x @ weight. A copy, made only for the export.
        self.register_buffer("weight", mha.in_proj_weight.detach().t().contiguous())
        self.register_buffer("bias", mha.in_proj_bias.detach().clone())
        self.out_proj = mha.out_proj

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_weights: bool = False, attn_mask: Any = None
    ) -> tuple[torch.Tensor, None]:
        # The open_clip blocks pass the same tensor three times (self-attention); the mask is either absent or the
        # text tower's causal mask, which `causal` stands for (checked by fused_attention).
        out = _AttentionOp.apply(q, self.weight, self.bias, self.heads, self.causal)
        return self.out_proj(out), None


def _is_causal_mask(mask: Any) -> bool:
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    n = mask.shape[0]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


def _eligible(mha: Any) -> bool:
    return (
        isinstance(mha, torch.nn.MultiheadAttention)
        and mha.batch_first
        and mha._qkv_same_embed_dim
        and mha.in_proj_bias is not None
        and mha.bias_k is None
        and mha.bias_v is None
        and not mha.add_zero_attn
        and mha.embed_dim % mha.num_heads == 0
    )


@contextlib.contextmanager
def fused_attention(root: torch.nn.Module, causal_mask: torch.Tensor | None = None) -> Iterator[int]:
    """Swap the attention of every eligible open_clip block under `root` (a tower's transformer) for
    FusedAttention; yields how many. `causal_mask`: the mask the text tower passes, which must be open_clip's causal
    mask (checked, not assumed; otherwise nothing is swapped)."""
    from open_clip.transformer import ResidualAttentionBlock

    causal = causal_mask is not None
    if causal and not _is_causal_mask(causal_mask):
        yield 0
        return
    blocks = [m for m in root.modules() if isinstance(m, ResidualAttentionBlock) and _eligible(m.attn)]
    originals = [b.attn for b in blocks]
    try:
        for block in blocks:
            block.attn = FusedAttention(block.attn, causal)
        yield len(blocks)
    finally:
        for block, attn in zip(blocks, originals, strict=True):
            block.attn = attn
