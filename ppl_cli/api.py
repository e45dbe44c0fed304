"""The Python API's shortcuts over evaluate(): score a list of texts, load a model once for many calls.

    from ppl_cli import load, score
    result = score(["The first text.", "The second one."])             # the default model
    model, tokenizer = load("gpt2")                                   # once ...
    result = score(texts, model=model, tokenizer=tokenizer, window=512)  # ... then as often as needed

A text is a string, or a record (a dict) read as a JSON Lines record is (its text in `text_field`,
its id in `id`, a prompt in `context_field`, a conversation in `messages_field`, ...). Ids are
`ids` when given, else a record's `id` field, else the position in the list: "0", "1", ... The
result is evaluate()'s Result, and equals `ppl-eval run` on the same texts written as JSON Lines.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

from .config import DEFAULT_MODEL, Config
from .data.sources import TEXTS_PREFIX
from .errors import PplError
from .output.run_directory import Result


def score(texts: Iterable[str | dict], model: Any = None, tokenizer: Any = None, ids: Sequence[str] | None = None, **options: Any) -> Result:
    """Score `texts` with `model`: a name (a hub id, a folder, a .gguf file; default the built-in
    SmolLM2-135M), or a model already in memory with its `tokenizer` (from load(), a training
    loop), scored as it is. `options`: any Config field (window, output, save_tokens, ...)."""
    from .pipeline import evaluate

    records = [text_record(item, options.get("text_field", "text"), k) for k, item in enumerate(texts)]
    if ids is not None:
        ids = [str(i) for i in ids]
        if len(ids) != len(records):
            raise PplError(f"score: {len(ids)} ids for {len(records)} texts")
        records = [{**record, "id": i} for record, i in zip(records, ids)]
    if not records:
        raise PplError("score: no texts to score")
    digest = hashlib.sha256(json.dumps(records, ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogatepass")).hexdigest()
    spec = f"{TEXTS_PREFIX}{len(records)} texts, sha256 {digest[:16]}"  # what summary.json and run.json name the input by
    in_memory = model is not None and not isinstance(model, str)
    if isinstance(model, str):
        options["model"] = model
    config = Config(data=(spec,), **options)
    return evaluate(config, texts=records, model=model if in_memory else None, tokenizer=tokenizer)


def text_record(item: str | dict, text_field: str, k: int) -> dict:
    if isinstance(item, str):
        return {text_field: item}
    if isinstance(item, dict):
        return item
    raise PplError(f"score: text {k} is a {type(item).__name__}, not a string or a record (dict)")


def load(model: str = DEFAULT_MODEL, **options: Any) -> tuple[Any, Any]:
    """A model and its tokenizer, loaded as `ppl-eval run --model MODEL` loads them (options: revision,
    dtype, device, device_map, quantize, ...), to score many lists without loading it again. With
    engine="vllm": a started vllm.LLM (options: tensor_parallel_size, vllm_args, ..., and the
    window or lengths it must hold, default the run's: the model's context, at most 2048)."""
    from .runtime.progress import library_bars

    with library_bars():
        return loaded(model, options)


def loaded(model: str, options: dict) -> tuple[Any, Any]:
    """load()'s work, other libraries' bars off."""
    if options.get("engine") == "vllm":
        from .engine.conventions import run_window
        from .engine.vllm_engine import open_model
        from .engine.watchdog import KEPT

        config = Config(model=model, **options)
        handle = open_model(config)
        window = run_window(config, handle.context_length)
        llm, log = handle.launch(config, window)
        if log is not None:
            log.discard()
        KEPT.append(handle.watchdog)  # the caller's engine: its processes end with this one, however it ends
        return llm, handle.tokenizer
    from .engine.loading import load_model

    lm = load_model(Config(model=model, **options))
    lm.model.ppl_eval_temporary = lm.temporary  # an offload or de-quantized folder lives as long as the model
    return lm.model, lm.tokenizer
