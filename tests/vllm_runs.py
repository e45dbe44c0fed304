"""Runs of ppl-eval's vLLM engine in one process, sharing one engine (the vLLM tests' helper; vLLM's
start-up costs tens of seconds on a CPU, so it starts once for all of them).

    PYTHONPATH=. PYTHON_OF_THE_VLLM_VENV tests/vllm_runs.py SPEC.json

SPEC: {"model": a model folder, "max_model_len": n, "engine_args": {...}, "runs": [{"output": dir,
"config": {Config fields}}, ...]}. Each run is evaluate(Config(**config, output=dir), model=llm,
tokenizer=...), the engine started here being handed in as a model in memory; its rows land in its
output directory, where the test reads them. Prints {"start_s", "runs_s"} as JSON on stdout.
"""

import gc
import json
import sys
import time
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from transformers import AutoTokenizer
    from vllm import LLM

    from ppl_cli import Config, evaluate

    started = time.perf_counter()
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, enable_prefix_caching=False, max_model_len=spec["max_model_len"], **spec["engine_args"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    start_s = time.perf_counter() - started
    runs_s = []
    for run in spec["runs"]:
        started = time.perf_counter()
        evaluate(Config(**run["config"], output=run["output"]), model=llm, tokenizer=tokenizer)
        runs_s.append(time.perf_counter() - started)
    core = llm.llm_engine.engine_core
    core.shutdown()  # its worker processes exit before this one does, and its threads and objects go before the
    core.output_queue_thread.join(timeout=10)  # interpreter's teardown (which aborts on them otherwise), as
    del llm, core  # VllmEngine.close does for the engines ppl-eval starts
    gc.collect()
    print(json.dumps({"start_s": start_s, "runs_s": runs_s}))


if __name__ == "__main__":  # vLLM starts its worker processes by spawning this module again
    main()
