"""Do the --signals tell a model's training documents from others? Each signal's AUROC, on data made here.

    python scripts/signals_auroc.py                 # SmolLM2-135M fine-tuned on 100 WikiText-2 test paragraphs
    python scripts/signals_auroc.py --model PATH --data FILE --documents 40 --epochs 30 --lr 3e-3   # a tiny model

Members and non-members are paragraphs of one file (its lines of at least --words words, each cut
to its first --words words), shuffled with --seed and split in two halves of --documents each. A
copy of the model is fine-tuned on the members alone (AdamW, float32, --epochs passes in batches of
--batch), then `ppl-eval run --signals --reference-model MODEL` scores both halves with it, the
model as it was being the reference (reference_ratio). A signal's AUROC is the probability that a
member's score lies on the member side of a non-member's, ties counting half, each signal's side
fixed in advance (ppl_cli/output/signals.py's HIGHER_MEANS_SEEN; perplexity: lower means seen),
never chosen after looking at the data. 0.5 is chance. The interval is a bootstrap over documents.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppl_cli import Config, evaluate  # noqa: E402
from ppl_cli.engine.loading import load_model  # noqa: E402
from ppl_cli.output.signals import HIGHER_MEANS_SEEN, SIGNALS  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2-v1" / "wiki.test.tokens"
SCORES = ("token_perplexity", *SIGNALS)
HIGHER_MEANS_MEMBER = {"token_perplexity": False, **HIGHER_MEANS_SEEN}


def auroc(members: np.ndarray, others: np.ndarray) -> float:
    """P(member > other) + P(member == other) / 2, over every pair (the Mann-Whitney statistic)."""
    greater = (members[:, None] > others[None, :]).mean()
    ties = (members[:, None] == others[None, :]).mean()
    return float(greater + ties / 2)


def bootstrap_auroc(members: np.ndarray, others: np.ndarray, samples: int, seed: int) -> list[float]:
    """A 95% percentile interval of the AUROC, members and non-members resampled apart."""
    rng = np.random.default_rng(seed)
    values = [auroc(rng.choice(members, len(members)), rng.choice(others, len(others))) for _ in range(samples)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def paragraphs(path: Path, words: int, count: int, seed: int) -> list[str]:
    """2 x count distinct lines of at least `words` words, each cut to its first `words`, in a seeded order."""
    lines = [" ".join(line.split()[:words]) for line in path.read_text(encoding="utf-8").splitlines() if len(line.split()) >= words]
    lines = [line for line in dict.fromkeys(lines) if not line.startswith("=")]  # no headings, no repeats
    if len(lines) < 2 * count:
        sys.exit(f"signals_auroc: {path} has {len(lines)} lines of {words}+ words; --documents {count} needs {2 * count}")
    random.Random(seed).shuffle(lines)
    return lines[: 2 * count]


def fine_tune(model, tokenizer, texts: list[str], args) -> None:
    """Plain causal-LM training on `texts`: each batch padded on the right, padding not scored."""
    import torch

    torch.manual_seed(args.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = list(range(len(texts)))
    for epoch in range(args.epochs):
        random.Random(args.seed + epoch).shuffle(order)
        losses = []
        for start in range(0, len(order), args.batch):
            encoded = [tokenizer(texts[i], add_special_tokens=False).input_ids for i in order[start : start + args.batch]]
            width = max(map(len, encoded))
            ids = torch.full((len(encoded), width), pad)
            labels = torch.full((len(encoded), width), -100)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for b, e in enumerate(encoded):
                ids[b, : len(e)] = labels[b, : len(e)] = torch.tensor(e)
                mask[b, : len(e)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}: mean training loss {np.mean(losses):.4f}", file=sys.stderr)
    model.eval()


def save_plain(lm, folder: Path) -> None:
    """The model as a safetensors directory (a .gguf file's de-quantized weights: docs/models.md's recipe)."""
    if getattr(lm.model.config, "quantization_config", None) is not None:
        del lm.model.config.quantization_config
        lm.model.hf_quantizer = None
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)


def experiment(args) -> dict:
    texts = paragraphs(Path(args.data), args.words, args.documents, args.seed)
    members = texts[: args.documents]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lm = load_model(Config(model=args.model, device="cpu", dtype="float32"))
        save_plain(lm, tmp / "base")
        fine_tune(lm.model, lm.tokenizer, members, args)
        save_plain(lm, tmp / "tuned")
        data = tmp / "documents.jsonl"
        data.write_text("".join(json.dumps({"id": f"{'member' if i < args.documents else 'other'}-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
        config = Config(model=str(tmp / "tuned"), data=str(data), id_field="id", signals=True, min_k=args.min_k, reference_model=str(tmp / "base"),
                        reference_dtype="float32", window=args.window, bootstrap_samples=0)  # fmt: skip
        rows = evaluate(config).documents
    member = np.array([row["id"].startswith("member") for row in rows])
    results = {}
    for name in SCORES:
        values = np.array([row[name] for row in rows], dtype=np.float64)
        values = values if HIGHER_MEANS_MEMBER[name] else -values
        results[name] = {"auroc": auroc(values[member], values[~member]), "ci": bootstrap_auroc(values[member], values[~member], args.bootstrap, args.seed),
                         "higher_means_member": HIGHER_MEANS_MEMBER[name]}  # fmt: skip
    return {"args": vars(args), "members": int(member.sum()), "non_members": int((~member).sum()), "signals": results}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DATA), help="a text file: one candidate paragraph a line")
    parser.add_argument("--documents", type=int, default=100, help="members, and as many non-members")
    parser.add_argument("--words", type=int, default=64, help="each paragraph cut to this many words")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--min-k", type=float, default=0.2)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    report = experiment(args)
    print(f"{report['members']} members, {report['non_members']} non-members; {args.model} fine-tuned {args.epochs} epochs at lr {args.lr:g}")
    print("| score | member side | AUROC | 95% CI |")
    print("|---|---|---|---|")
    for name, r in report["signals"].items():
        side = "higher" if r["higher_means_member"] else "lower"
        print(f"| {name} | {side} | {r['auroc']:.3f} | [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
