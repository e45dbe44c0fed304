"""Regenerate tests/golden/smollm2-pairs.json: lm-evaluation-harness's own `loglikelihood` on context/continuation pairs.

    python scripts/golden_pairs.py --lm-eval-python /path/to/venv/bin/python

Not run in CI (it needs lm-evaluation-harness): its output is committed, and tests/test_prompts.py
checks that `ppl-eval run --convention lm-eval --context-field context --text-field continuation`
gives the same log-likelihood for every pair. Install lm-eval with:
    python -m venv V && V/bin/pip install torch==2.13.0 'lm-eval[hf]==0.4.13' gguf accelerate

The pairs are cut from WikiText-2 validation paragraphs (../shared): a paragraph's first sentences
are the context and the rest the continuation, in the shapes that the tokenization rule has to get
right (a context ending in a space, in a newline, in nothing; an empty context; a continuation
starting with a space or not; Unicode). A second set runs with a 64-token window, where most
contexts are longer than the window and lm-eval cuts them from the left. lm-eval runs its `hf`
model on the SmolLM2 GGUF in float32 (the CLI, a custom task of output_type loglikelihood with
target_delimiter "", --log_samples for each pair's log-likelihood).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppl_cli import Config  # noqa: E402
from ppl_cli.data.documents import load_documents  # noqa: E402
from ppl_cli.engine.loading import SMOLLM2_FILE, resolve_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2-v1" / "wiki.valid.tokens"
OUT = ROOT / "tests" / "golden" / "smollm2-pairs.json"
WINDOWS = ((1024, None), (64, 12))  # (window, words of the continuation kept)

TASK = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def pairs_from(paragraphs: list[str], count: int, continuation_words: int | None = None) -> list[dict]:
    """Pairs of several shapes, cut at sentence ends (" . " in WikiText's tokenization); the
    continuation's first `continuation_words` words only, when given (lm-eval scores no
    continuation longer than its window)."""
    out = []
    shapes = ("space-in-context", "space-in-continuation", "newline", "no-space", "empty-context")
    for k, paragraph in enumerate(paragraphs):
        sentences = [s for s in re.split(r"(?<= \.) ", paragraph.strip()) if s]
        if len(sentences) < 2:
            continue
        cut = max(1, len(sentences) // 2)
        context, continuation = " ".join(sentences[:cut]), " ".join(sentences[cut:])
        if continuation_words:
            continuation = " ".join(continuation.split(" ")[:continuation_words])
        shape = shapes[len(out) % len(shapes)]
        if shape == "space-in-context":
            context += " "
        elif shape == "space-in-continuation":
            continuation = " " + continuation
        elif shape == "newline":
            context += "\n"
        elif shape == "empty-context":
            context = ""
        out.append({"shape": shape, "context": context, "continuation": continuation})
        if len(out) == count:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lm-eval-python", required=True, help="a Python with lm-eval[hf] 0.4.13 installed")
    parser.add_argument("--pairs", type=int, default=30, help="pairs per window")
    args = parser.parse_args()

    articles = load_documents(Config(data=str(DATA), limit=8))
    paragraphs = [p for a in articles for p in a.text.split("\n") if len(p) > 200 and not p.startswith(" =")]
    model_dir = resolve_model("smollm2-135m").location
    golden = {"model": "smollm2-135m", "tool": "lm-evaluation-harness 0.4.13, hf model, float32, batch size 1", "sets": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n, (window, words) in enumerate(WINDOWS):
            pairs = pairs_from(paragraphs[n * 60 :], args.pairs, words)
            results = run_lm_eval(args.lm_eval_python, pairs, model_dir, window, Path(tmp) / f"w{window}")
            for pair, (loglikelihood, greedy) in zip(pairs, results):
                pair.update(loglikelihood=loglikelihood, is_greedy=greedy)
            golden["sets"].append({"window": window, "pairs": pairs})
    OUT.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


def run_lm_eval(python: str, pairs: list[dict], model_dir: str, window: int, tmp: Path) -> list[tuple[float, bool]]:
    name = f"ppl_golden_pairs_{window}"
    tasks = tmp / "tasks"
    tasks.mkdir(parents=True)
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps({"context": p["context"], "continuation": p["continuation"]}) + "\n" for p in pairs))
    (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=data))
    out = tmp / "out"
    model_args = f"pretrained={model_dir},gguf_file={SMOLLM2_FILE},dtype=float32,max_length={window}"
    cmd = [python, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", name, "--include_path", str(tasks),
           "--batch_size", "1", "--device", "cpu", "--log_samples", "--output_path", str(out)]  # fmt: skip
    print(" ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    samples = [json.loads(line) for line in next(out.rglob(f"samples_{name}_*.jsonl")).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    for sample, pair in zip(samples, pairs):  # the task read the pair as written
        assert sample["arguments"]["gen_args_0"]["arg_0"] == pair["context"], sample["arguments"]
        assert sample["arguments"]["gen_args_0"]["arg_1"] == pair["continuation"], sample["arguments"]
    return [(float(s["resps"][0][0][0]), bool(s["resps"][0][0][1])) for s in samples]


if __name__ == "__main__":
    main()
