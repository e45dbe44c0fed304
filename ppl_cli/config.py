"""The run configuration: one frozen dataclass, filled from defaults, then a YAML file, then CLI options."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from .errors import PplError

ENGINES = ("transformers", "vllm", "served")  # what computes the log-probabilities (docs/engines.md)
DEFAULT_CONCURRENCY = 16  # a served model's requests in flight
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")  # --attn-implementation, as from_pretrained takes it
QUANTIZATIONS = ("bnb-8bit", "bnb-4bit", "torchao-int8", "torchao-int4", "quanto-int8", "quanto-int4")  # --quantize
QUANTIZE_ALIASES = {"int8": "torchao-int8", "int4": "bnb-4bit"}  # the closest to float32 of each width that runs on CPU and CUDA (docs/models.md)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # --device-map, or a JSON map
DOC_SPLITS = ("file", "line", "blank-line")
ENCODING_ERRORS = ("strict", "replace")
CONVENTIONS = ("sliding", "hf-recipe", "lm-eval", "llama-cpp")
DETOKENIZERS = ("none", "wikitext")
SIGNAL_METRICS = ("min_k", "min_k_plus_plus", "zlib_ratio", "mean_entropy", "reference_ratio")  # --signals' per-document values
SELECT_METRICS = ("token_perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity", "word_perplexity_corrected", "ifd", *SIGNAL_METRICS)  # ppl-eval select --metric
BANDS = ("low", "middle", "high")  # ppl-eval select --keep
SELECT_FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")  # what ppl-eval select writes
DEFAULT_MODEL = "smollm2-135m"
GLOB = re.compile(r"[*?\[]")  # a --model with these is a glob of checkpoint folders (no hub id has them)
DEFAULT_DATA = "python-docstrings"
DEFAULT_CHAT_PROMPT = "Write a passage of text."  # --chat-wrap: the user turn each document answers
DEFAULT_SCORE_ROLES = ("assistant",)


def as_tuple(value):
    """A list (YAML, JSON) or one string (Python, `data: x`) as the tuple a config field holds."""
    if isinstance(value, str):
        return (value,)
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Config:
    # Model
    model: str = DEFAULT_MODEL
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None  # spread the layers over devices: auto, balanced, sequential, or a JSON map {module: device}
    attn_implementation: str | None = None  # None: sdpa (and on CPU in bfloat16 ppl-eval's blocked kernel)
    quantize: str | None = None  # quantize on load: one of QUANTIZATIONS
    series: tuple[str, ...] = ()  # several models (--model given several times, or a glob): each scored into OUTPUT/<name>/
    revisions: tuple[str, ...] = ()  # or several hub revisions of `model`
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load .bin/.pt weights, which can run code while unpickling
    # Engine: what turns the windows into log-probabilities
    engine: str | None = None  # transformers (this process), vllm, or served (None: served for an http(s) --model, else transformers)
    tensor_parallel_size: int | None = None  # vllm: GPUs each layer is split over (None: vLLM's default, 1)
    pipeline_parallel_size: int | None = None  # vllm: stages of layers on successive GPUs or nodes (None: 1)
    gpu_memory_utilization: float | None = None  # vllm: the share of each GPU's memory it may use (its CPU build: of RAM)
    vllm_args: tuple[str, ...] = ()  # vllm: any engine argument as KEY=VALUE, the value read as JSON where it parses
    # A served model: --model http(s)://host/v1, an OpenAI-compatible server (docs/engines.md)
    served_model: str | None = None  # its name on the server (None: the one /v1/models lists)
    tokenizer: str | None = None  # the tokenizer ppl-eval loads (None: the served model's name)
    api_key_env: str | None = None  # the environment variable holding the key (None: OPENAI_API_KEY, when set)
    concurrency: int | None = None  # requests in flight (None: DEFAULT_CONCURRENCY)
    max_retries: int = 8  # tries after the first, for a request the server fails (timeouts, refused, 429, 5xx)
    request_timeout: float = 600.0  # seconds a request may take
    insecure: bool = False  # https without verifying the server's certificate
    # A reference model P scored on the same windows: KL(P || Q) and llama.cpp's statistics
    reference_model: str | None = None
    reference_dtype: str = "auto"
    reference_device: str | None = None  # None: the same as device
    # Data
    data: tuple[str, ...] = (DEFAULT_DATA,)  # sources in order; a single string is one source
    data_config: str | None = None
    split: str | None = None
    text_field: str = "text"
    id_field: str | None = None
    doc_split: str = "file"
    encoding_errors: str = "strict"
    skip_bad_records: bool = False  # a record that cannot be read (not JSON, no text field, ...) is passed over and counted
    limit: int | None = None
    streaming: bool = False  # hub datasets: read as an IterableDataset instead of downloading whole
    # Prompts and conversations: a document whose tokens are only partly scored
    context_field: str | None = None  # a field read as the text's context, not scored (dotted paths allowed)
    context_template: str | None = None  # or a context made from fields: "{instruction}\n{input}\n"
    messages_field: str | None = None  # a list of {"role", "content"}, rendered with the chat template
    score_roles: tuple[str, ...] = DEFAULT_SCORE_ROLES  # the conversation turns that are scored
    chat_template: str | None = None  # a Jinja file used instead of the tokenizer's chat template
    chat_wrap: bool = False  # each plain document as the assistant's reply to chat_prompt
    chat_prompt: str = DEFAULT_CHAT_PROMPT
    ifd: bool = False  # also score each continuation without its context: unconditional_nll_sum and ifd
    # Membership and uncertainty signals of each document (docs/signals.md)
    signals: bool = False  # min_k, min_k_plus_plus, zlib_ratio, mean_entropy (and reference_ratio with a reference model)
    min_k: float = 0.2  # k of Min-K% and Min-K%++: the share of a document's least likely tokens averaged
    # Domains
    group_by: str | None = None  # a field (dotted path), `file` or `dir`: metrics per group
    max_groups: int = 10_000
    sample_per_group: int | None = None  # score a seeded sample of this many documents a group: an estimate
    sample: float | None = None  # or of this share of every group
    # Windows
    convention: str = "sliding"  # sliding, hf-recipe, lm-eval or llama-cpp
    detokenize: str = "none"  # "wikitext": lm-eval's WikiText detokenizer before scoring
    window: int | None = None  # None: the model's context length, capped at 2048
    stride: int | None = None  # None: window // 2
    add_bos: bool | None = None  # None: yes when the tokenizer has a BOS (or end-of-text) token
    bos_token: str | None = None  # the start token put before each document (None: the tokenizer's BOS)
    # Context lengths: perplexity at each length of a document's prefix (or, with a stride, of sliding windows that long)
    lengths: tuple[int, ...] = ()  # "2048,4096" or "1024:8192:1024" as the CLI gives it
    min_tokens: int | None = None  # the prefix protocol's bar (None: the largest length); documents shorter are skipped
    allow_beyond_context: bool = False  # a window or length longer than the model's configured context
    # Performance
    max_batch_tokens: int | None = None  # None: chosen for the device
    threads: int | None = None  # None: torch's default (all cores)
    # Statistics
    seed: int = 0
    bootstrap_samples: int = 1000
    # Scale-out
    shard: str | None = None  # "I/N": score only the documents whose index is I mod N
    # Output
    output: str | None = None
    overwrite: bool = False
    save_tokens: bool = False  # every scored token to tokens/part-*.parquet
    save_words: bool = False  # every word's surprisal to words/part-*.parquet
    words_field: str | None = None  # --save-words: a field holding the document as a list of words (the corpus's own segmentation)
    bow_correction: bool | None = None  # --save-words: the beginning-of-word correction (None: where the tokenizer defines it)

    def __post_init__(self):
        object.__setattr__(self, "data", as_tuple(self.data))
        object.__setattr__(self, "series", as_tuple(self.series))
        if isinstance(self.revisions, str):  # "a,b" as the CLI gives it
            object.__setattr__(self, "revisions", tuple(r.strip() for r in self.revisions.split(",") if r.strip()))
        object.__setattr__(self, "revisions", as_tuple(self.revisions))
        if isinstance(self.lengths, str):  # "2048,4096" or "1024:8192:1024" as the CLI gives it
            object.__setattr__(self, "lengths", parse_lengths(self.lengths))
        object.__setattr__(self, "lengths", as_tuple(self.lengths))
        if isinstance(self.score_roles, str):  # "assistant,user" as the CLI gives it
            object.__setattr__(self, "score_roles", tuple(r.strip() for r in self.score_roles.split(",") if r.strip()))
        object.__setattr__(self, "score_roles", as_tuple(self.score_roles))
        if isinstance(self.vllm_args, dict):  # a YAML mapping
            object.__setattr__(self, "vllm_args", tuple(f"{k}={json.dumps(v)}" for k, v in self.vllm_args.items()))
        object.__setattr__(self, "vllm_args", as_tuple(self.vllm_args))
        check_types(self)
        object.__setattr__(self, "lengths", tuple(sorted(set(self.lengths))))
        for name in ("dtype", "reference_dtype"):
            if getattr(self, name) not in DTYPES:
                raise PplError(f"{name.replace('_', '-')} must be one of {', '.join(DTYPES)}, not {getattr(self, name)!r}")
        if self.doc_split not in DOC_SPLITS:
            raise PplError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, not {self.doc_split!r}")
        if self.convention not in CONVENTIONS:
            raise PplError(f"convention must be one of {', '.join(CONVENTIONS)}, not {self.convention!r}")
        if self.detokenize not in DETOKENIZERS:
            raise PplError(f"detokenize must be one of {', '.join(DETOKENIZERS)}, not {self.detokenize!r}")
        if self.encoding_errors not in ENCODING_ERRORS:
            raise PplError(f"encoding_errors must be one of {', '.join(ENCODING_ERRORS)}")
        for name, low in (("limit", 1), ("window", 2), ("stride", 1), ("max_batch_tokens", 1), ("threads", 1), ("max_groups", 1),
                          ("sample_per_group", 1), ("min_tokens", 2)):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < low:
                raise PplError(f"{name.replace('_', '-')} must be at least {low}, got {value}")
        if not 0 < self.min_k <= 1:
            raise PplError(f"--min-k is a share of the tokens in (0, 1], not {self.min_k}")
        if self.min_k != 0.2 and not self.signals:
            raise PplError("--min-k sets k of the Min-K% signals: it needs --signals")
        if self.bootstrap_samples < 0:
            raise PplError("bootstrap-samples must be 0 (off) or more")
        if not self.model.strip():
            raise PplError("model must not be empty")
        if not self.data or not all(spec.strip() for spec in self.data):
            raise PplError("data must not be empty")
        if self.shard is not None:
            parse_shard(self.shard)
        for flag in ("overwrite", "save_tokens", "save_words"):
            if getattr(self, flag) and not self.output:
                raise PplError(f"--{flag.replace('_', '-')} needs an output directory (-o/--output)")
        self.check_conditional()
        self.check_model_options()
        if self.group_by is not None and not self.group_by.strip():
            raise PplError("--group-by needs a field name (a dotted path), file or dir")
        if self.sample is not None and not 0 < self.sample <= 1:
            raise PplError(f"--sample must be a share of the documents in (0, 1], not {self.sample}")
        if self.sample is not None and self.sample_per_group is not None:
            raise PplError("--sample and --sample-per-group are two ways to sample; choose one")
        if self.sample_per_group is not None and not self.group_by:
            raise PplError("--sample-per-group needs --group-by (the groups to sample from)")
        if self.sampled and self.convention in ("hf-recipe", "llama-cpp"):
            raise PplError(f"sampling documents needs a convention that scores each document on its own, not {self.convention}")
        self.check_lengths()
        self.check_words()
        self.check_engine()
        self.check_bos_token()

    def check_lengths(self) -> None:
        if not self.lengths:
            if self.min_tokens is not None:
                raise PplError("--min-tokens sets which documents --lengths scores: it needs --lengths")
            return
        if self.lengths[0] < 2:
            raise PplError(f"--lengths must be at least 2 tokens (one of context, one scored), not {self.lengths[0]}")
        given = next((f"--{name.replace('_', '-')}" for name in ("window", "context_field", "context_template", "messages_field") if getattr(self, name)), None)
        given = given or ("--chat-wrap" if self.chat_wrap else "--detokenize" if self.detokenize != "none" else None)
        if self.convention != "sliding":
            given = f"--convention {self.convention}"
        if given:
            why = "the lengths are the windows" if given == "--window" else "no length curve is defined for it"
            raise PplError(f"--lengths and {given} cannot be combined: {why}")
        if self.min_tokens is not None and not 2 <= self.min_tokens <= self.lengths[-1]:
            raise PplError(f"--min-tokens lowers the bar of the largest length ({self.lengths[-1]}): give 2 to {self.lengths[-1]}, not {self.min_tokens}")

    def check_words(self) -> None:
        if not self.save_words:
            given = "--words-field" if self.words_field else "--bow-correction/--no-bow-correction" if self.bow_correction is not None else None
            if given:
                raise PplError(f"{given} applies to --save-words")
            return
        other = next((f"--{name.replace('_', '-')}" for name in ("context_field", "context_template", "messages_field", "chat_wrap") if getattr(self, name)), None)
        other = other or ("--lengths" if self.lengths else "--detokenize" if self.detokenize != "none" else None)
        if self.convention != "sliding":
            other = f"--convention {self.convention}"
        if other:
            raise PplError(f"--save-words scores plain documents under the default convention, one pass each: not with {other}")

    def check_engine(self) -> None:
        """The engines' own options, and the options only the transformers engine has (the values
        that need each position's whole distribution, which vLLM and servers do not return, among them)."""
        url = is_url(self.model)
        if self.engine is None:
            object.__setattr__(self, "engine", "served" if url else "transformers")
        if self.engine not in ENGINES:
            raise PplError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if url != (self.engine == "served"):
            raise PplError("an http(s) --model is a served model (the served engine)" if url else "--engine served scores a model behind a server: give its URL as --model (http://host:8000/v1)")
        given = [f"--{name.replace('_', '-')}" for name in ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization") if getattr(self, name) is not None]
        given += ["--vllm-arg"] if self.vllm_args else []
        if given and self.engine != "vllm":
            raise PplError(f"{given[0]} applies to --engine vllm")
        served = [f"--{name.replace('_', '-')}" for name in ("served_model", "tokenizer", "api_key_env", "concurrency") if getattr(self, name) is not None]
        served += [f"--{name.replace('_', '-')}" for name, default in (("max_retries", 8), ("request_timeout", 600.0), ("insecure", False)) if getattr(self, name) != default]
        if served and self.engine != "served":
            raise PplError(f"{served[0]} applies to a served model (--model http(s)://host/v1)")
        if self.engine == "transformers":
            return
        for name, low in (("tensor_parallel_size", 1), ("pipeline_parallel_size", 1), ("concurrency", 1), ("max_retries", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise PplError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
        if self.request_timeout <= 0:
            raise PplError(f"--request-timeout must be more than 0 seconds, got {self.request_timeout}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise PplError(f"--gpu-memory-utilization is a share of the memory in (0, 1], not {self.gpu_memory_utilization}")
        parse_engine_args(self.vllm_args)
        engine = "--engine vllm" if self.engine == "vllm" else "a served model"
        instead = {
            "device_map": f"--device-map places layers for the transformers engine; {'vLLM spreads a model with --tensor-parallel-size and --pipeline-parallel-size' if self.engine == 'vllm' else 'a server places its own'}",
            "quantize": f"--quantize is the transformers engine's; {'vLLM quantizes with --vllm-arg quantization=NAME (fp8, ...) or loads a quantized checkpoint' if self.engine == 'vllm' else 'a server runs the model as it is served'}",
            "attn_implementation": f"--attn-implementation is the transformers engine's; {engine} chooses its own attention kernels",
            "threads": f"--threads sets torch's threads for the transformers engine; {'vLLM CPU build takes VLLM_CPU_OMP_THREADS_BIND' if self.engine == 'vllm' else 'a server has its own'}",
            "reference_model": f"--reference-model needs each position's whole distribution (for KL), which {engine} does not return; use --engine transformers",
            "revisions": f"--revisions are hub revisions loaded by the transformers engine or vLLM, not {engine}" if self.engine == "served" else None,
        }
        for name, why in instead.items():
            if getattr(self, name) and why:
                raise PplError(why)
        if self.device != "auto":
            where = "vLLM runs where its build does (CUDA_VISIBLE_DEVICES picks the GPUs)" if self.engine == "vllm" else "a served model runs on its server"
            raise PplError(f"--device: {where}; leave --device out")
        if self.save_words and self.bow_correction is not False:
            raise PplError(
                f"--save-words' beginning-of-word correction needs each position's whole distribution, which {engine} does not return;"
                " add --no-bow-correction for uncorrected word surprisals, or use --engine transformers"
            )
        if self.engine == "served" and (self.revision or self.dtype != "auto" or self.allow_pickle):
            given = "--revision" if self.revision else "--dtype" if self.dtype != "auto" else "--allow-pickle"
            raise PplError(f"{given}: a served model is the one its server loaded, as it loaded it")

    def check_bos_token(self) -> None:
        if self.bos_token is None:
            return
        if not self.bos_token:
            raise PplError("--bos-token needs a token (its text as the tokenizer writes it, e.g. '<|endoftext|>')")
        if self.add_bos is False:
            raise PplError("--bos-token and --no-add-bos: choose one (a start token, or none)")
        if self.convention in ("hf-recipe", "lm-eval"):
            rule = "adds no special token" if self.convention == "hf-recipe" else "always prefixes its prefix token (the tokenizer's BOS, else EOS)"
            raise PplError(f"--bos-token does not apply to --convention {self.convention}: it {rule}")
        if self.conditional in ("conversations", "chat-wrap"):
            raise PplError("--bos-token: the chat template decides the special tokens of a conversation")

    @property
    def sampled(self) -> bool:
        return self.sample is not None or self.sample_per_group is not None

    def check_model_options(self) -> None:
        if self.attn_implementation is not None and self.attn_implementation not in ATTENTIONS:
            raise PplError(f"attn-implementation must be one of {', '.join(ATTENTIONS)}, not {self.attn_implementation!r}")
        object.__setattr__(self, "quantize", QUANTIZE_ALIASES.get(self.quantize, self.quantize))
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise PplError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, not {self.quantize!r}")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS and not self.device_map.lstrip().startswith("{"):
            if not self.device_map.endswith(".json"):
                raise PplError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, a JSON map or a .json file, not {self.device_map!r}")
        if self.series and self.revisions:
            raise PplError("--revisions are revisions of one --model; give --model once")
        if self.is_series and not self.output:
            raise PplError("a series of models needs an output directory (-o/--output): each model is scored into OUTPUT/<name>/")
        if self.revisions and self.revision:
            raise PplError("--revision and --revisions: give one")

    @property
    def is_series(self) -> bool:
        """Several models: --model given several times, a glob of checkpoint folders, or --revisions."""
        return bool(self.series or self.revisions or (GLOB.search(self.model) and not is_url(self.model)))

    @property
    def conditional(self) -> str | None:
        """How documents are scored given something: "pairs", "conversations", "chat-wrap", or None (plain)."""
        if self.messages_field:
            return "conversations"
        if self.chat_wrap:
            return "chat-wrap"
        if self.context_field or self.context_template:
            return "pairs"
        return None

    def check_conditional(self) -> None:
        given = [f"--{name.replace('_', '-')}" for name in ("context_field", "context_template", "messages_field", "chat_wrap") if getattr(self, name)]
        if len(given) > 1:
            raise PplError(f"{given[0]} and {given[1]} are two ways to give a document's context; choose one")
        mode = self.conditional
        if mode and self.convention in ("hf-recipe", "llama-cpp"):
            raise PplError(f"{given[0]} needs a convention that scores each document on its own (sliding or lm-eval), not {self.convention}")
        if self.ifd and not mode:
            raise PplError("--ifd scores each continuation with and without its context: it needs --context-field, --context-template, --messages-field or --chat-wrap")
        if self.chat_template and mode not in ("conversations", "chat-wrap"):
            raise PplError("--chat-template applies to --messages-field and --chat-wrap")
        if self.score_roles != DEFAULT_SCORE_ROLES and mode != "conversations":
            raise PplError("--score-roles applies to --messages-field")
        if not self.score_roles:
            raise PplError("--score-roles must name at least one role")
        if self.chat_prompt != DEFAULT_CHAT_PROMPT and mode != "chat-wrap":
            raise PplError("--chat-prompt applies to --chat-wrap")
        if mode in ("conversations", "chat-wrap") and self.add_bos is not None:
            raise PplError(f"{given[0]}: the chat template decides the special tokens; --add-bos/--no-add-bos do not apply")
        if mode in ("conversations", "pairs") and self.detokenize != "none":
            raise PplError(f"--detokenize applies to plain documents (and --chat-wrap), not to {given[0]}")

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as JSON holds them (tuples as lists; a served model's URL without credentials or query)."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        out["model"] = public_url(self.model)
        return out


def field_names(cls=Config) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def check_types(config) -> None:
    """Reject a value of the wrong type, as a YAML file can give (`window: "big"`), in any command's config."""
    hints = typing.get_type_hints(type(config))
    for name in field_names(type(config)):
        value, hint = getattr(config, name), hints[name]
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        ok = any(value is None and kind is type(None) or is_instance(value, kind) for kind in allowed)
        if not ok:
            expected = " or ".join("null" if k is type(None) else type_name(k) for k in allowed)
            raise PplError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def is_instance(value, kind) -> bool:
    if typing.get_origin(kind) is tuple:  # tuple[str, ...], tuple[float, ...]
        return isinstance(value, tuple) and all(is_instance(v, typing.get_args(kind)[0]) for v in value)
    if isinstance(value, bool):  # bool is an int in Python; a YAML `window: true` must still fail.
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(kind, type) and isinstance(value, kind)


def type_name(kind) -> str:
    if typing.get_origin(kind) is tuple:
        return f"a list of {typing.get_args(kind)[0].__name__}"
    return kind.__name__


def load_yaml(path: str | Path, cls=Config) -> dict:
    """Read a config file into a dict of known keys; unknown keys are an error, not ignored."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PplError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise PplError(f"cannot read config file {path}: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PplError(f"config file {path} must be a mapping of option: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(field_names(cls)))
    if unknown:
        raise PplError(f"config file {path}: unknown key {unknown[0]!r} (known: {', '.join(field_names(cls))})")
    return data


def build_config(config_file: str | None = None, cls=Config, **overrides):
    """Defaults, then the YAML file, then explicit overrides (the CLI's options that were given)."""
    values = load_yaml(config_file, cls) if config_file else {}
    values.update(overrides)
    return cls(**values)


def parse_lengths(text: str) -> tuple[int, ...]:
    """--lengths: "2048,4096,8192" or "start:stop:step" (stop included) -> the lengths, ascending;
    a count may end in k (x 1024): "2k,4k,8k", "1k:8k:1k"."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (token_count(part) for part in text.split(":"))
            if step < 1 or stop < start:
                raise ValueError
            lengths = range(start, stop + 1, step)
        else:
            lengths = [token_count(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PplError(f"--lengths must be a list of token counts (2048,4096 or 2k,4k) or start:stop:step (1024:8192:1024), not {text!r}") from None
    if not lengths:
        raise PplError("--lengths needs at least one length")
    return tuple(sorted(set(lengths)))


ENGINE_OWN_ARGS = {  # vLLM arguments ppl-eval sets, -> the option that sets them
    "model": "--model",
    "tokenizer": "--model (ppl-eval tokenizes)",
    "skip_tokenizer_init": "nothing (ppl-eval tokenizes)",
    "revision": "--revision",
    "dtype": "--dtype",
    "trust_remote_code": "--trust-remote-code",
    "tensor_parallel_size": "--tensor-parallel-size",
    "pipeline_parallel_size": "--pipeline-parallel-size",
    "gpu_memory_utilization": "--gpu-memory-utilization",
}
ENGINE_PERFORMANCE_ARGS = {  # vLLM arguments that decide how fast, not what: a run may resume with others
    "max_num_seqs", "max_num_batched_tokens", "enforce_eager", "distributed_executor_backend", "swap_space", "cpu_offload_gb",
    "block_size", "compilation_config", "disable_custom_all_reduce", "enable_chunked_prefill", "scheduling_policy", "max_model_len",
    "data_parallel_size", "kv_cache_memory_bytes", "num_gpu_blocks_override", "seed",
}  # fmt: skip
ENGINE_FIXED_ARGS = {  # vLLM arguments whose value the log-probabilities depend on -> (the value, why)
    "enable_prefix_caching": (False, "with prefix caching, prompt log-probabilities change with the order of requests (vLLM #42019)"),
    "logprobs_mode": ("raw_logprobs", "ppl-eval scores the model's own log-softmax, before any logits processing"),
}


def parse_engine_args(pairs: tuple[str, ...]) -> dict:
    """--vllm-arg KEY=VALUE, each value read as JSON where it parses (true, 0.5, {"a": 1}), else as text."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise PplError(f"--vllm-arg takes KEY=VALUE (quantization=fp8, kv_cache_dtype=fp8), not {pair!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if key in ENGINE_OWN_ARGS:
            raise PplError(f"--vllm-arg {key}: ppl-eval sets it from {ENGINE_OWN_ARGS[key]}")
        if key in ENGINE_FIXED_ARGS and value != ENGINE_FIXED_ARGS[key][0]:
            fixed, why = ENGINE_FIXED_ARGS[key]
            raise PplError(f"--vllm-arg {key} must stay {json.dumps(fixed)}: {why}")
        out[key] = value
    return out


def is_url(model: str) -> bool:
    """An http(s) --model: a served model."""
    return model.startswith(("http://", "https://"))


def public_url(text: str) -> str:
    """A URL as ppl-eval writes and prints it: without credentials, query string or fragment."""
    from urllib.parse import urlsplit, urlunsplit

    if not is_url(text):
        return text
    parts = urlsplit(text)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))


def token_count(text: str) -> int:
    """A count of tokens: 4096, or 4k (k = 1024, as context lengths are quoted)."""
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise PplError(f"--shard must look like I/N (for example 0/8), not {text!r}")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise PplError(f"--shard {text}: need 0 <= I < N")
    return index, count
