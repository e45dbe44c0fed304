"""Regenerate tests/golden/smollm2-lengths.json: the separate-pass reference for `--lengths`.

    python scripts/golden_lengths.py

YaRN's eval/perplexity.py (--truncate) as plain transformers: for each length L in turn and each
WikiText-2 test article (the first LIMIT, as `ppl-eval run --data wiki.test.tokens --limit LIMIT`
reads them) that has at least the largest length in tokens, BOS then its first L - 1 tokens in one
forward pass of SmolLM2-135M (the GGUF, de-quantized, float32), every token after BOS scored; the
NLL per article and length is stored. tests/test_lengths.py compares ppl-eval's one-pass curve
with it (within 1e-5). Not run in CI: its output, numbers only, is committed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppl_cli import Config  # noqa: E402
from ppl_cli.data.documents import load_documents  # noqa: E402
from ppl_cli.engine.loading import resolve_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2-v1" / "wiki.test.tokens"
OUT = ROOT / "tests" / "golden" / "smollm2-lengths.json"
LENGTHS = (512, 1024, 2048, 4096)
LIMIT = 4  # articles read: two of them reach 4,096 tokens


def main() -> None:
    import transformers

    source = resolve_model("smollm2-135m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype=torch.float32).eval()
    documents = load_documents(Config(data=str(DATA), limit=LIMIT))
    sequences = {i: [tokenizer.bos_token_id, *tokenizer(d.text, add_special_tokens=False).input_ids] for i, d in enumerate(documents)}
    long = {i: ids for i, ids in sequences.items() if len(ids) >= LENGTHS[-1]}
    nll = {i: [] for i in long}
    for length in LENGTHS:  # length by length, as YaRN's script loops
        for i, ids in long.items():
            x = torch.tensor([ids[:length]])
            with torch.no_grad():
                logits = model(x).logits[0, :-1].float()  # [L - 1, V]
            per_token = F.cross_entropy(logits, x[0, 1:], reduction="none")  # float32, as the tools compute it
            nll[i].append(per_token.double().sum().item())
        print(f"length {length}: done", file=sys.stderr)
    golden = {
        "what": "NLL of each article's first L tokens (BOS first), one forward pass per length, plain transformers, float32",
        "data": DATA.name,
        "data_sha256": hashlib.sha256(DATA.read_bytes()).hexdigest(),
        "limit": LIMIT,
        "lengths": list(LENGTHS),
        "documents": [{"index": i, "id": documents[i].id, "tokens": len(long[i]), "nll": nll[i]} for i in long],
        "too_short": [i for i in sequences if i not in long],
        "versions": {name: metadata.version(name) for name in ("torch", "transformers", "gguf")},
    }
    OUT.write_text(json.dumps(golden, indent=2) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
