"""Whether a model's prediction at a position depends on how long its input is, which decides how
--lengths scores the prefix protocol: one pass at the largest length, or a pass per length.

A causal LM's logits at position i depend only on tokens 0..i, so the first L tokens of one pass
over the largest length give every shorter length exactly. Position scaling chosen from the
input's length breaks that: transformers' `dynamic` RoPE (NTK scaling recomputed once the input
is longer than the trained context) and Phi-3's `longrope` (short factors below the original
context, long factors above). The configuration names those; a probe catches the rest: the
decoder's hidden states over the first `shortest` positions of one input must be the same whether
the input is `shortest` or `longest` tokens long.
"""

from __future__ import annotations

from .loading import no_gradients

LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # rope types whose frequencies follow the input's length
TOLERANCE = {"float32": 1e-3}  # largest difference in the probe, relative to the largest hidden value
HALF_TOLERANCE = 5e-2  # bfloat16, float16 and quantized models: rounding alone moves them this much


def configured_dependence(model) -> str | None:
    """The model's configuration's reason to expect length-dependent logits, or None."""
    config = model.config.get_text_config()
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if not isinstance(params, dict):
            continue
        for settings in [params, *(v for v in params.values() if isinstance(v, dict))]:  # per layer type too
            rope_type = settings.get("rope_type") or settings.get("type")
            if rope_type in LENGTH_DEPENDENT_ROPE:
                return f"its configuration has {name} of type {rope_type!r}, which scales positions by the input's length"
    return None


def probed_dependence(model, device, shortest: int, longest: int) -> str | None:
    """Run the decoder over `longest` probe tokens and over their first `shortest`: the reason the
    first `shortest` positions' hidden states differ beyond rounding, or None when they agree."""
    import torch

    decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        return "it has no separate decoder to probe, so each length is scored in its own pass to be safe"
    vocab = model.get_output_embeddings().weight.shape[0]
    position = torch.arange(longest)
    ids = ((position * 7919 + position * position * 31) % vocab).unsqueeze(0).to(device)  # [1, longest], not periodic
    with no_gradients(model):
        long = decoder(input_ids=ids, use_cache=False).last_hidden_state[0, :shortest].float()  # [shortest, H]
        short = decoder(input_ids=ids[:, :shortest], use_cache=False).last_hidden_state[0].float()
    scale = short.abs().max().item() or 1.0
    difference = (long - short).abs().max().item() / scale
    dtype = str(model.dtype).removeprefix("torch.")
    tolerance = HALF_TOLERANCE if getattr(model, "is_quantized", False) else TOLERANCE.get(dtype, HALF_TOLERANCE)
    if difference <= tolerance:
        return None
    return (
        f"a probe's first {shortest} positions differ by {difference:.2g} (relative) between inputs of {shortest} and"
        f" {longest} tokens (rounding stays under {tolerance:g})"
    )


def length_dependence(model, device, shortest: int, longest: int) -> str | None:
    """Why one pass at `longest` would not give the prefixes' numbers (None: it does)."""
    return configured_dependence(model) or probed_dependence(model, device, shortest, longest)


def reset_position_state(model) -> None:
    """Make the next forward pass scale positions for its own length, as a freshly loaded model would:
    transformers' dynamic RoPE grows its frequencies with the longest input seen and keeps them for
    any shorter input still above the trained context."""
    for module in model.modules():
        original = getattr(module, "original_max_seq_len", None)
        if original is None:
            continue
        for name in [n for n in vars(module) if n.endswith("max_seq_len_cached")]:
            prefix = name.removesuffix("max_seq_len_cached")
            frequencies = getattr(module, f"{prefix}original_inv_freq", None)
            if frequencies is not None and getattr(module, name) > original:
                module.register_buffer(f"{prefix}inv_freq", frequencies.to(getattr(module, f"{prefix}inv_freq").device), persistent=False)
                setattr(module, name, original)
