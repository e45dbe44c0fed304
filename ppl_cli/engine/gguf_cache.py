"""A .gguf model de-quantized once and kept as a plain model folder, so that later runs start in seconds.

transformers de-quantizes a GGUF file's weights every time it loads one (SmolLM2-135M's: about 25 s
on 2 cores, parsing the file and building its tokenizer included). The first load writes what it
gives, float32 safetensors, the configuration and the tokenizer, into
`HF_HOME/ppl-eval/gguf/<sha256 of the .gguf file>/` (HF_HOME as huggingface_hub reads it: $HF_HOME,
else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface); every load, the first included, then
reads that folder, so the first run's numbers are every later run's, and --quantize quantizes its
float weights again. The folder is built under a temporary name beside it and renamed into place
whole: a reader never sees half a copy, and two processes that start at once both finish (the
first rename wins, the other's copy is dropped). The digest of a file is remembered by its path,
size and modification time, so a large file is hashed once. PPL_EVAL_GGUF_CACHE=0 turns the cache
off: each load de-quantizes into a temporary folder, removed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from importlib import metadata
from pathlib import Path

from ..errors import EXIT_MODEL, PplError, first_line

logger = logging.getLogger(__name__)
SWITCH = "PPL_EVAL_GGUF_CACHE"  # 0: no cache


def cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "ppl-eval" / "gguf"


def enabled() -> bool:
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def file_digest(path: Path, root: Path) -> str:
    """sha256 of a file, remembered under root/digests by its path, size and modification time."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    remembered = root / "digests" / key
    try:
        return remembered.read_text(encoding="ascii").strip()
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        remembered.parent.mkdir(parents=True, exist_ok=True)
        tmp = remembered.with_name(f".{key}.{os.getpid()}.tmp")
        tmp.write_text(digest, encoding="ascii")
        os.replace(tmp, remembered)
    except OSError:  # a read-only cache: hashed again next time
        pass
    return digest


def dequantized(folder: str, gguf_file: str, name: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The plain model folder of folder/gguf_file, built if it is not cached yet; and the temporary
    directory to keep alive while it is used, when there is no cache."""
    gguf = Path(folder) / gguf_file
    if not enabled():
        scratch = tempfile.TemporaryDirectory(prefix="ppl-eval-gguf-")
        target = Path(scratch.name) / "model"
        build(gguf, target, name, None)
        return target, scratch
    root = cache_root()
    digest = file_digest(gguf, root)
    target = root / digest
    if (target / "source.json").is_file():
        logger.info("loading %s from its de-quantized copy in %s", name, target)
        return target, None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PplError(f"cannot write the de-quantized copy of {gguf_file} under {root}: {e.strerror}; set {SWITCH}=0 to do without it", EXIT_MODEL) from None
    forget_dead_builds(root, digest)
    building = root / f".{digest}.{socket.gethostname()}.{os.getpid()}.tmp"
    logger.info("loading %s: de-quantizing %s once, into %s (later runs start from there)", name, gguf_file, target)
    try:
        build(gguf, building, name, digest)
        os.rename(building, target)
    except OSError as e:
        if not (target / "source.json").is_file():  # not another process's win: a real failure
            raise PplError(f"cannot write the de-quantized copy of {gguf_file} into {target}: {e.strerror}; set {SWITCH}=0 to do without it", EXIT_MODEL) from None
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target, None


def build(gguf: Path, target: Path, name: str, digest: str | None) -> None:
    """De-quantize a .gguf file with transformers and save what it gives (float32) as a model folder."""
    import torch
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils.logging import tqdm as transformers_tqdm

    # Its de-quantizing bar is drawn with plain tqdm: transformers' own, in its place, obeys
    # disable_progress_bar as its other bars do (off at the default verbosity, on with -v).
    gguf_loading.tqdm = transformers_tqdm
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a file it cannot read
        from .loading import explain_load_error

        raise PplError(explain_load_error(name, e), EXIT_MODEL) from None
    if hasattr(model.config, "quantization_config"):  # the float weights, no longer GGUF's
        del model.config.quantization_config
    model.hf_quantizer = None
    try:
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        source = {"gguf_file": gguf.name, "bytes": gguf.stat().st_size, "sha256": digest, "versions": {p: metadata.version(p) for p in ("transformers", "gguf", "torch")}}
        (target / "source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise PplError(f"cannot write the de-quantized copy of {gguf.name} into {target}: {first_line(e)}", EXIT_MODEL) from None


def forget_dead_builds(root: Path, digest: str) -> None:
    """Remove this host's half-built copies of `digest` whose process is gone (killed mid-build)."""
    host = socket.gethostname()
    for stale in root.glob(f".{digest}.{host}.*.tmp"):
        try:
            os.kill(int(stale.name.rsplit(".", 2)[-2]), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, PermissionError):
            pass
