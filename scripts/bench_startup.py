"""Start-up: `ppl-eval --help` and `ppl-eval run --help`, and the default model's first and later starts.

    python scripts/bench_startup.py
    python scripts/bench_startup.py --repeat 5

Each command runs in a fresh process, timed by its wall clock from start to exit; the best of
--repeat. The default model (SmolLM2-135M's .gguf) is started with an empty HF_HOME (it is
de-quantized and its copy written), then again (read from that copy): `ppl-eval run` on a one-line
document, so that the time is almost all start-up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str], env: dict | None = None, stdin: str | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, input=stdin, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "ppl_cli"]
    rows = []
    for label, extra in (("ppl-eval --help", ["--help"]), ("ppl-eval run --help", ["run", "--help"])):
        rows.append((label, min(timed([*cli, *extra]) for _ in range(args.repeat))))
    run = [*cli, "run", "--data", "-", "-q"]
    with tempfile.TemporaryDirectory() as hf_home:
        env = {"HF_HOME": hf_home}
        rows.append(("ppl-eval run, the default model, first start (de-quantized, copy written)", timed(run, env, "One line to score.")))
        rows.append(("ppl-eval run, the default model, later starts (from the copy)", min(timed(run, env, "One line to score.") for _ in range(args.repeat))))
    print(f"best of {args.repeat} (the first start: once), wall clock of a fresh process\n")
    print("| command | seconds |")
    print("|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
