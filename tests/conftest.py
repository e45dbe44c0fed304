"""Shared fixtures: seeded tiny models saved to disk, user paths isolated, the network off."""

import hashlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytest_plugins = ["engine_fixtures"]  # the engines' shared fixtures

# Set before transformers/datasets are imported anywhere: they read these at import time.
_HF_HOME = tempfile.mkdtemp(prefix="ppl-eval-test-hf-")
os.environ.update(
    HF_HOME=_HF_HOME,
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WIKITEXT_VALID = SHARED / "data" / "wikitext-2-v1" / "wiki.valid.tokens"

# A few hundred words of varied English for training the tiny tokenizers and for test documents.
PROSE = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the hill.",
    "Perplexity is the exponential of the average negative log-likelihood of a sequence.",
    "In 1912 the ship left Southampton for New York, carrying more than two thousand people.",
    "Rivers carve valleys slowly; glaciers carve them faster and leave lakes behind.",
    "She said: \"Numbers are only trusted when they are exactly defined and reproducible.\"",
    "A sliding window scores every token once, with as much context as the window allows.",
    "Ünïcödé text, em-dashes — and emoji 🙂 all count as bytes in UTF-8.",
    "The committee met on Tuesday, discussed the budget, and adjourned at noon.",
]


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


def run_until(cmd, out, finished_docs, sig):
    """Start the run, send `sig` once documents.jsonl has `finished_docs` lines, return the process."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if len(lines(out / "documents.jsonl")) >= finished_docs:
            proc.send_signal(sig)
            break
        time.sleep(0.002)
    proc.wait(timeout=120)
    return proc


@pytest.fixture(autouse=True)
def isolated_paths(tmp_path, monkeypatch):
    """Each test runs in its own working directory, so relative outputs never land in the repo."""
    monkeypatch.chdir(tmp_path)


def train_tokenizer(special_tokens, vocab_size=400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(PROSE * 10, trainer)
    return tok


def save_tiny_gpt2(path: Path, n_positions=128) -> Path:
    """A 2-layer GPT-2 with random weights; its tokenizer's BOS is <|endoftext|>, as GPT-2's is."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(["<|endoftext|>"]), bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_llama(path: Path, hidden: int = 32, scale: float = 8.0) -> Path:
    """A 2-layer Llama (RoPE, GQA, RMSNorm, untied head) with random weights and BOS <s>; `hidden` 64
    or more for quantizers that work in blocks of 64, `scale` the weights' (random init is near-uniform)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(["<s>", "</s>"]), bos_token="<s>", eos_token="</s>")
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random init is near-uniform; larger weights make real differences between tokens
        for p in model.parameters():
            p.mul_(scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CHATML = (  # ChatML as SmolLM2 and Qwen write it, without a default system prompt, and no {% generation %} markers
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def save_tiny_chat_llama(path: Path) -> Path:
    """The tiny Llama with ChatML's special tokens and chat template: a chat model to test conversations on."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(["<s>", "</s>", "<|im_start|>", "<|im_end|>"]), bos_token="<s>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=3, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_gguf(path: Path) -> Path:
    """A 2-layer Llama written as a .gguf file (float32 tensors, the tiny BPE tokenizer, written with
    gguf-py's writer as llama.cpp's converter lays one out): a GGUF model that loads in seconds."""
    import gguf
    import numpy as np

    tok = train_tokenizer(["<s>", "</s>"])
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    size, ffn, heads, kv_heads, layers = 32, 64, 4, 2, 2
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(size)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(size // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in ("<s>", "</s>") else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_add_bos_token(False)
    kv = kv_heads * size // heads
    shapes = {"token_embd.weight": (len(tokens), size), "output_norm.weight": (size,), "output.weight": (len(tokens), size)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (size,), f"blk.{i}.attn_q.weight": (size, size), f"blk.{i}.attn_k.weight": (kv, size),
                       f"blk.{i}.attn_v.weight": (kv, size), f"blk.{i}.attn_output.weight": (size, size), f"blk.{i}.ffn_norm.weight": (size,),
                       f"blk.{i}.ffn_gate.weight": (ffn, size), f"blk.{i}.ffn_up.weight": (ffn, size), f"blk.{i}.ffn_down.weight": (size, ffn)})  # fmt: skip
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.5).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> str:
    return str(save_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"))


@pytest.fixture(scope="session")
def tiny_llama_64(tmp_path_factory) -> str:
    """A tiny Llama 64 wide, its weights at twice the init's scale: quantizers' blocks fit it."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), hidden=64, scale=2.0))


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> str:
    return str(save_tiny_chat_llama(tmp_path_factory.mktemp("tiny-chat")))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    return str(save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    """Documents of mixed lengths: a few tokens up to several windows of the tiny models."""
    texts = []
    for i in range(9):
        n = [1, 2, 5, 13, 30][i % 5]
        texts.append(" ".join(PROSE[(i + k) % len(PROSE)] for k in range(n)))
    return texts


@pytest.fixture
def corpus_jsonl(tmp_path, corpus_texts) -> str:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n" for i, t in enumerate(corpus_texts)))
    return str(path)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (GGUF, de-quantized to float32), loaded once per test run."""
    from ppl_cli import Config
    from ppl_cli.engine.loading import load_model
    from ppl_cli.errors import PplError

    try:
        return load_model(Config(model="smollm2-135m", device="cpu", dtype="float32"))
    except PplError as e:
        pytest.skip(f"SmolLM2-135M is not installed ({e})")


def wikitext_valid_or_skip() -> Path:
    if not WIKITEXT_VALID.is_file():
        pytest.skip(f"WikiText-2 is not available: {WIKITEXT_VALID} is absent (../shared beside the checkout)")
    return WIKITEXT_VALID


def vllm_python_or_skip() -> str:
    """The Python of the vLLM environment: $PPL_EVAL_VLLM_PYTHON, else where scripts/vllm_venv.sh
    builds it (a folder named by the hash of the script and pyproject.toml)."""
    given = os.environ.get("PPL_EVAL_VLLM_PYTHON")
    if given:
        python = Path(given)
    else:
        key = hashlib.sha256((ROOT / "scripts" / "vllm_venv.sh").read_bytes() + (ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        python = cache / "ppl-eval" / f"vllm-venv-{key}" / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"no vLLM environment at {python}: build it with scripts/vllm_venv.sh (or set PPL_EVAL_VLLM_PYTHON)")
    return str(python)
