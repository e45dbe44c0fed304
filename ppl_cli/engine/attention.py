"""Causal self-attention for bfloat16 on CPU as blocked matmuls, registered with transformers.

torch's CPU flash-attention kernel runs bfloat16 at about 110 GFLOP/s on an AVX512-BF16 CPU,
where bfloat16 matmuls reach about 800: it took 43% of SmolLM2-135M's forward time at a
1024-token window. Here each block of BLOCK queries attends to the keys up to its own end with
two matmuls, so the masked upper triangle is skipped except inside the diagonal block. Anything
else (a mask, non-causal layers, float32, GPUs) goes to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import torch

NAME = "ppl_eval_cpu_blocked"
BLOCK = 128  # query rows per block; measured fastest of 64/128/256 at 1024 tokens


def blocked_causal_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """query [B, H, L, D], key/value [B, KV, L, D] -> output [B, L, H, D], as SDPA's wrapper returns."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (
        query.device.type != "cpu"
        or query.dtype != torch.bfloat16
        or attention_mask is not None
        or not causal
        or dropout
        or length < 2
        or key.shape[2] != length
        or value.shape[-1] != dim
        or heads % kv_heads
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = heads // kv_heads  # query heads sharing one key/value head (GQA)
    scale = scaling if scaling is not None else dim**-0.5
    q = (query * scale).contiguous().view(batch, kv_heads, groups, length, dim)
    out = torch.empty(batch, length, heads, dim, dtype=query.dtype, device=query.device)
    for start in range(0, length, BLOCK):
        end = min(start + BLOCK, length)
        rows = end - start
        q_block = q[:, :, :, start:end].reshape(batch, kv_heads, groups * rows, dim)
        scores = torch.matmul(q_block, key[:, :, :end].transpose(-1, -2))  # [B, KV, G*rows, end]
        scores = scores.view(batch, kv_heads, groups, rows, end)
        future = torch.ones(rows, rows, dtype=torch.bool, device=query.device).triu(1)
        scores[..., start:end].masked_fill_(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, groups * rows, end)
        block = torch.matmul(probs, value[:, :, :end])  # [B, KV, G*rows, D]
        out[:, start:end] = block.view(batch, heads, rows, dim).transpose(1, 2)
    return out, None


def use_blocked_attention(model) -> bool:
    """Switch a bfloat16 model on CPU from SDPA to the blocked kernel; False where it cannot."""
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return False
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, blocked_causal_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # same masks as SDPA: None where causal suffices
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError, AttributeError):  # a model without the attention interface
        return False
    return True
