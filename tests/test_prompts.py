"""Documents scored given a context: pairs, conversations through a chat template, --chat-wrap, IFD.

Every number is checked against a naive loop written here (render, tokenize, mask, one forward
pass per record), and the pairs against lm-evaluation-harness's own `loglikelihood`.
"""

import json
import math
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PROSE, run_until
from reference import chunked_nll, masked_nll

from ppl_cli import Config, evaluate
from ppl_cli.cli import cli

GOLDEN = Path(__file__).parent / "golden" / "smollm2-pairs.json"


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


def rows_of(result):
    return list(result.iter_documents())


PAIRS = [
    {"q": "What is perplexity?", "a": " The exponential of the mean negative log-likelihood."},
    {"q": "Name the ship. ", "a": "It left Southampton in 1912."},  # the context's trailing space moves to the continuation
    {"q": "Rivers carve valleys\n", "a": "slowly; glaciers carve them faster."},
    {"q": "", "a": "No question, only an answer about the committee and its budget."},
    {"q": "Ünïcödé — and emoji 🙂?", "a": " Bytes in UTF-8."},
]


def naive_pair(model, tokenizer, context, continuation, bos):
    """lm-eval's rule, written out: move the context's trailing whitespace, encode the pair whole
    and split it at the context's own token count, read the context's own tokens then the
    continuation's; BOS first; one forward pass; sum the continuation's NLL."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = encode(tokenizer, context)
    ids = [bos] + context_ids + encode(tokenizer, context + continuation)[len(context_ids) :]
    first = 1 + len(context_ids)
    return masked_nll(model, ids, list(range(first, len(ids)))), len(ids) - first


def test_pairs_score_the_continuation_given_the_context_as_a_naive_loop_does(tiny_llama, tmp_path):
    model, tokenizer = load(tiny_llama)
    data = write_jsonl(tmp_path / "qa.jsonl", PAIRS)
    result = evaluate(Config(model=tiny_llama, data=data, context_field="q", text_field="a", window=256, bootstrap_samples=0))
    rows = rows_of(result)
    assert len(rows) == len(PAIRS)
    for row, pair in zip(rows, PAIRS):
        nll, tokens = naive_pair(model, tokenizer, pair["q"], pair["a"], tokenizer.bos_token_id)
        assert row["nll_sum"] == pytest.approx(nll, rel=1e-5) and row["tokens"] == tokens
        assert row["bytes"] == len(pair["a"].encode()) and row["words"] == len(pair["a"].split())  # the continuation only
        assert row["context_tokens"] == 1 + len(encode(tokenizer, pair["q"].rstrip())) and row["context_cut"] is False
    assert result.summary["conditional"] == {"mode": "pairs", "context_tokens": sum(r["context_tokens"] for r in rows), "context_cut_documents": 0}


def test_a_context_template_fills_dotted_fields(tiny_llama, tmp_path):
    records = [{"task": {"instruction": "Summarise", "input": "the text"}, "output": " A summary."},
               {"task": {"instruction": "Translate", "input": None}, "output": " Done."}]  # fmt: skip
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    template = "### {task.instruction}\\n{task.input}\\n### Response:"  # \n as a shell passes it
    done = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data, "--context-template", template, "--text-field", "output", "--jsonl"])
    assert done.exit_code == 0, done.output
    model, tokenizer = load(tiny_llama)
    for line, context in zip(done.stdout.splitlines(), ["### Summarise\nthe text\n### Response:", "### Translate\n\n### Response:"]):
        row = json.loads(line)
        nll, _ = naive_pair(model, tokenizer, context, records[0 if "Summ" in context else 1]["output"], tokenizer.bos_token_id)
        assert row["nll_sum"] == pytest.approx(nll, rel=1e-5)


def test_long_continuations_slide_and_long_contexts_are_cut_from_the_left(tiny_llama, tmp_path):
    model, tokenizer = load(tiny_llama)
    long_text = " ".join(PROSE * 2)  # about 200 tokens
    records = [{"q": long_text, "a": " " + PROSE[0]}, {"q": "Why?", "a": " " + long_text}, {"q": "Short.", "a": " Short too."}]
    data = write_jsonl(tmp_path / "long.jsonl", records)
    window, stride = 32, 16
    result = evaluate(Config(model=tiny_llama, data=data, context_field="q", text_field="a", window=window, stride=stride, bootstrap_samples=0))
    rows = rows_of(result)
    for row, record in zip(rows, records):
        context, continuation = record["q"], record["a"]
        ids = [tokenizer.bos_token_id] + encode(tokenizer, context + continuation)
        first = 1 + len(encode(tokenizer, context))
        assert row["nll_sum"] == pytest.approx(chunked_nll(model, ids, [(first, len(ids))], window, stride), rel=1e-5)
        assert row["tokens"] == len(ids) - first
    assert [r["context_cut"] for r in rows] == [True, False, False]
    assert result.summary["conditional"]["context_cut_documents"] == 1
    lm_eval = evaluate(Config(model=tiny_llama, data=data, context_field="q", text_field="a", window=window, convention="lm-eval", bootstrap_samples=0))
    for row, record in zip(rows_of(lm_eval), records):  # lm-eval: chunks of a whole window, each read after window + 1 tokens
        ids = encode(tokenizer, record["q"] + record["a"])
        first = len(encode(tokenizer, record["q"]))
        assert row["nll_sum"] == pytest.approx(lm_eval_chunked(model, ids, first, window), rel=1e-5)


def lm_eval_chunked(model, ids, first, window):
    from reference import token_logprobs

    total = 0.0
    for start in range(first, len(ids), window):
        end = min(start + window, len(ids))
        begin = max(0, end - window - 1)
        logprobs = token_logprobs(model, ids[begin:end])
        total -= sum(logprobs[j - begin - 1].item() for j in range(start, end))
    return total


CHATS = [
    {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is perplexity?"},
                  {"role": "assistant", "content": "A measure of surprise."}, {"role": "user", "content": "And entropy?"},
                  {"role": "assistant", "content": "Expected surprise."}]},  # fmt: skip
    {"messages": [{"role": "user", "content": "Only a question"}]},  # nothing to score: skipped
    {"messages": [{"role": "user", "content": PROSE[2]}, {"role": "assistant", "content": " ".join(PROSE[3:8])}]},
]


def naive_conversation(tokenizer, messages, roles=("assistant",)):
    """Each scored turn found the way a trainer masks labels without {% generation %} markers:
    render the conversation up to the turn with the generation prompt (its start) and through it
    (its end), and count the tokens of each rendering."""
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = encode(tokenizer, whole)
    scored, contents = [], []
    for i, message in enumerate(messages):
        if message["role"] not in roles:
            continue
        start_text = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        if message["role"] != "assistant":  # ChatML writes "<|im_start|>role\n" before a message's content
            start_text = (tokenizer.apply_chat_template(messages[:i], tokenize=False) if i else "") + f"<|im_start|>{message['role']}\n"
        end_text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        scored += range(len(encode(tokenizer, start_text)), len(encode(tokenizer, end_text)))
        contents.append(message["content"])
    return ids, scored, contents


@pytest.mark.parametrize("roles", [("assistant",), ("assistant", "user")])
def test_conversations_score_the_chosen_turns_as_a_naive_loop_does(tiny_chat, tmp_path, roles):
    model, tokenizer = load(tiny_chat)
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    config = Config(model=tiny_chat, data=data, messages_field="messages", score_roles=roles, window=512, bootstrap_samples=0)
    result = evaluate(config)
    rows = rows_of(result)
    scored = [i for i, chat in enumerate(CHATS) if any(m["role"] in roles for m in chat["messages"])]  # the others are skipped
    assert [r["index"] for r in rows] == scored and result.summary["skipped_documents"] == len(CHATS) - len(scored)
    for row, chat in zip(rows, (CHATS[i] for i in scored)):
        ids, scored, contents = naive_conversation(tokenizer, chat["messages"], roles)
        assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # the template's first token: no BOS added
        assert row["nll_sum"] == pytest.approx(masked_nll(model, ids, scored), rel=1e-5)
        assert row["tokens"] == len(scored) and row["context_tokens"] == len(ids) - len(scored)
        assert row["turns"] == len(contents) and row["bytes"] == sum(len(c.encode()) for c in contents)
    assert result.summary["conditional"]["turns"] == sum(r["turns"] for r in rows)


def test_a_continuation_longer_than_the_window_in_a_conversation(tiny_chat, tmp_path):
    model, tokenizer = load(tiny_chat)
    chat = {"messages": [{"role": "user", "content": PROSE[0]}, {"role": "assistant", "content": " ".join(PROSE * 2)}]}
    data = write_jsonl(tmp_path / "long.jsonl", [chat])
    [row] = rows_of(evaluate(Config(model=tiny_chat, data=data, messages_field="messages", window=48, stride=24, bootstrap_samples=0)))
    ids, scored, _ = naive_conversation(tokenizer, chat["messages"])
    assert row["nll_sum"] == pytest.approx(chunked_nll(model, ids, [(scored[0], scored[-1] + 1)], 48, 24), rel=1e-5)


def test_chat_wrap_scores_only_the_documents_own_tokens(tiny_chat, tmp_path):
    model, tokenizer = load(tiny_chat)
    texts = [PROSE[0], " ".join(PROSE[1:4])]
    data = write_jsonl(tmp_path / "plain.jsonl", [{"text": t} for t in texts])
    prompt = "Write a sentence."
    result = evaluate(Config(model=tiny_chat, data=data, chat_wrap=True, chat_prompt=prompt, window=512, bootstrap_samples=0))
    for row, text in zip(rows_of(result), texts):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        ids = encode(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
        before = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        start, end = len(encode(tokenizer, before)), len(encode(tokenizer, before + text))
        assert row["nll_sum"] == pytest.approx(masked_nll(model, ids, list(range(start, end))), rel=1e-5)
        assert row["tokens"] == end - start and row["bytes"] == len(text.encode()) and row["turns"] == 1


def test_ifd_is_the_ratio_of_the_mean_losses_with_and_without_the_context(tiny_llama, tiny_chat, tmp_path):
    model, tokenizer = load(tiny_llama)
    data = write_jsonl(tmp_path / "qa.jsonl", PAIRS)
    result = evaluate(Config(model=tiny_llama, data=data, context_field="q", text_field="a", ifd=True, window=256, bootstrap_samples=0))
    bos = tokenizer.bos_token_id
    ifds = []
    for row, pair in zip(rows_of(result), PAIRS):
        conditional, tokens = naive_pair(model, tokenizer, pair["q"], pair["a"], bos)
        spaces = len(pair["q"]) - len(pair["q"].rstrip())
        context = pair["q"][: len(pair["q"]) - spaces]
        whole = encode(tokenizer, context + pair["q"][len(context) :] + pair["a"])
        alone = [bos] + whole[len(encode(tokenizer, context)) :]  # the same tokens, after BOS only
        unconditional = masked_nll(model, alone, list(range(1, len(alone))))
        assert row["unconditional_nll_sum"] == pytest.approx(unconditional, rel=1e-5)
        assert row["ifd"] == pytest.approx((conditional / tokens) / (unconditional / tokens), rel=1e-5)
        ifds.append(row["ifd"])
    ifd = result.summary["conditional"]["ifd"]
    assert ifd["mean_ifd"] == pytest.approx(np.mean(ifds)) and ifd["corpus_ifd"] == pytest.approx(result.summary["nll_sum"] / ifd["unconditional_nll_sum"])

    chat_model, chat_tokenizer = load(tiny_chat)  # a conversation: every scored turn alone
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS[1:2])
    [row] = rows_of(evaluate(Config(model=tiny_chat, data=chats, messages_field="messages", ifd=True, window=512, bootstrap_samples=0)))
    ids, scored, _ = naive_conversation(chat_tokenizer, CHATS[1]["messages"])
    turns = np.split(np.array(scored), np.flatnonzero(np.diff(scored) > 1) + 1)
    expected = sum(masked_nll(chat_model, [chat_tokenizer.bos_token_id] + [ids[j] for j in t], list(range(1, len(t) + 1))) for t in turns)
    assert row["unconditional_nll_sum"] == pytest.approx(expected, rel=1e-5)


def test_select_by_ifd_keeps_cherry_llms_share(tiny_llama, tmp_path):
    records = [{"q": PROSE[i % 8], "a": " " + PROSE[(i * 3 + 1) % 8]} for i in range(40)]
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    out = tmp_path / "ifd"
    run = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data, "--context-field", "q", "--text-field", "a", "--ifd", "-o", str(out)])
    assert run.exit_code == 0, run.output
    recipe = Path(__file__).parents[1] / "configs" / "select" / "cherry-ifd.yaml"
    done = CliRunner().invoke(cli, ["select", str(out), "--config", str(recipe), "-o", str(tmp_path / "cherry.jsonl"), "--json"])
    assert done.exit_code == 0, done.output
    rows = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    passing = sorted((r for r in rows if r["ifd"] <= 1), key=lambda r: (r["ifd"], r["index"]))
    k = math.floor(0.1 * len(passing) + 0.5)
    expected = sorted(r["index"] for r in passing[len(passing) - k :])
    kept = [json.loads(line) for line in (tmp_path / "cherry.jsonl").read_text().splitlines()]
    assert [r["ppl_eval"]["index"] for r in kept] == expected and all("ifd" in r["ppl_eval"] for r in kept)
    assert json.loads(done.stdout)["cut_points"]["of"] == len(passing)
    plain = tmp_path / "plain"
    assert CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data, "--text-field", "a", "-o", str(plain)]).exit_code == 0
    refused = CliRunner().invoke(cli, ["select", str(plain), "--metric", "ifd", "--max", "1"])
    assert refused.exit_code == 3 and "a run with --ifd has it" in refused.stderr


def chat_corpus(tmp_path, n=24):
    records = []
    for i in range(n):
        turns = [{"role": "user", "content": PROSE[i % 8]}, {"role": "assistant", "content": " ".join(PROSE[(i + k) % 8] for k in range(1 + i % 3))}]
        if i % 4 == 0:
            turns += [{"role": "user", "content": "More?"}, {"role": "assistant", "content": PROSE[(i + 5) % 8]}]
        records.append({"messages": turns if i % 7 else turns[:1]})  # every 7th has nothing to score
    return write_jsonl(tmp_path / "chats.jsonl", records)


def chat_args(model, data, out, *extra):
    return ["run", "-q", "--model", model, "--data", data, "--messages-field", "messages", "--window", "48", "--ifd", "-o", str(out), *extra]


def comparable(summary):
    drop = {"wall_time_s", "scoring_time_s", "tokens_per_second", "ranks"}
    out = {k: v for k, v in summary.items() if k not in drop}
    out["config"] = {k: v for k, v in out["config"].items() if k not in ("output", "overwrite", "shard")}
    out["data"] = {k: v for k, v in out["data"].items() if k not in ("shards", "shard")}
    return out


def close(a, b):
    """Equal, floats to 1e-6 relative (torchrun ranks batch their windows differently, so rounding differs)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6)
    return a == b


def test_a_chat_corpus_sharded_merged_resumed_and_under_torchrun_equals_one_run(tiny_chat, tmp_path):
    data = chat_corpus(tmp_path)
    whole = tmp_path / "whole"
    assert CliRunner().invoke(cli, chat_args(tiny_chat, data, whole, "--save-tokens")).exit_code == 0
    reference = (whole / "documents.jsonl").read_text()
    summary = json.loads((whole / "summary.json").read_text())

    for i in range(3):
        assert CliRunner().invoke(cli, chat_args(tiny_chat, data, tmp_path / f"s{i}", "--shard", f"{i}/3", "--save-tokens")).exit_code == 0
    merged = CliRunner().invoke(cli, ["merge", *(str(tmp_path / f"s{i}") for i in range(3)), "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "merged" / "documents.jsonl").read_text() == reference
    assert close(comparable(json.loads((tmp_path / "merged" / "summary.json").read_text())), comparable(summary))

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ppl_cli", *chat_args(tiny_chat, data, killed, "--max-batch-tokens", "48", "--save-tokens")]
    run_until(cmd, killed, 5, signal.SIGKILL)
    assert CliRunner().invoke(cli, chat_args(tiny_chat, data, killed, "--max-batch-tokens", "48", "--save-tokens")).exit_code == 0
    assert (killed / "documents.jsonl").read_text() == reference

    import pyarrow.parquet as pq

    for folder in (whole, tmp_path / "merged", killed):  # the scored tokens' log p add up to each row's NLL; context tokens carry none
        tokens = pq.read_table(folder / "tokens").to_pydict()
        by_index = {}
        for index, scored, logprob in zip(tokens["index"], tokens["scored"], tokens["logprob"]):
            assert (logprob is not None) == scored
            by_index[index] = by_index.get(index, 0.0) + (logprob or 0.0)
        for row in map(json.loads, (folder / "documents.jsonl").read_text().splitlines()):
            assert -by_index[row["index"]] == pytest.approx(row["nll_sum"], rel=1e-4)

    ranks = tmp_path / "ranks"
    port = str(29500 + uuid.uuid4().int % 2000)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, "-m", "ppl_cli", *chat_args(tiny_chat, data, ranks)]
    done = subprocess.run(torchrun, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rank_rows = [json.loads(x) for x in (ranks / "documents.jsonl").read_text().splitlines()]
    assert close(rank_rows, [json.loads(x) for x in reference.splitlines()])


def test_the_reference_model_compares_the_scored_tokens_only(tiny_chat, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    result = evaluate(Config(model=tiny_chat, data=data, messages_field="messages", reference_model=tiny_chat, reference_dtype="float32", window=512))
    assert result.summary["reference"]["tokens"] == result.summary["tokens"]
    assert result.summary["reference"]["kld_mean"]["value"] == pytest.approx(0, abs=1e-6)


def test_the_report_greys_the_context(tiny_chat, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    out = tmp_path / "run"
    assert CliRunner().invoke(cli, ["run", "-q", "--model", tiny_chat, "--data", data, "--messages-field", "messages", "--save-tokens", "-o", str(out)]).exit_code == 0
    page = tmp_path / "page.html"
    made = CliRunner().invoke(cli, ["report", str(out), "-o", str(page)])
    assert made.exit_code == 0, made.output
    text = page.read_text()
    assert '<span class="ctx">' in text and '<span class="tok s' in text and "context, read but not scored" in text


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": "hello"}, "is str, not a list of messages"),
        ({"messages": [{"content": "no role"}]}, 'message 0 of \'messages\' is not an object with a "role" and a "content"'),
        ({"messages": [{"role": "user", "content": ["a", "b"]}]}, "has a list content; only text content can be scored"),
        ({"text": "no messages"}, "has no field 'messages'"),
    ],
)
def test_bad_conversations_are_one_line_naming_the_line_and_keep_what_was_finished(tiny_chat, tmp_path, record, message):
    good = CHATS[0]
    data = write_jsonl(tmp_path / "bad.jsonl", [good] * 300 + [record])
    out = tmp_path / "out"
    done = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_chat, "--data", data, "--messages-field", "messages", "-o", str(out)])
    assert done.exit_code == 3 and len(done.stderr.splitlines()) == 1
    assert "bad.jsonl line 301" in done.stderr and message in done.stderr
    assert len((out / "documents.jsonl").read_text().splitlines()) == 300  # everything before it is kept


def test_a_template_that_fails_or_is_missing_is_one_line(tiny_chat, tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", [CHATS[0], CHATS[1]])
    failing = tmp_path / "failing.jinja"
    failing.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}{{ m['content'] }}{% endfor %}")
    out = tmp_path / "out"
    done = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_chat, "--data", data, "--messages-field", "messages", "--chat-template", str(failing), "-o", str(out)])
    assert done.exit_code == 3 and "chats.jsonl line 2: the chat template fails to render" in done.stderr and "no system messages" in done.stderr
    assert len((out / "documents.jsonl").read_text().splitlines()) == 1
    reordering = tmp_path / "reordering.jinja"  # the last message first: a prefix's rendering is not a prefix of the whole
    reordering.write_text("{{ messages[-1]['content'] }}{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    done = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_chat, "--data", data, "--messages-field", "messages", "--chat-template", str(reordering)])
    assert done.exit_code == 3 and "is not a prefix of the whole conversation" in done.stderr
    done = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data, "--messages-field", "messages"])
    assert done.exit_code == 4 and "has no chat template; give one with --chat-template FILE" in done.stderr
    done = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data, "--messages-field", "messages", "--chat-template", str(tmp_path / "nope.jinja")])
    assert done.exit_code == 2 and "cannot read --chat-template" in done.stderr


@pytest.mark.parametrize(
    "options, message",
    [
        (["--context-field", "q", "--messages-field", "m"], "two ways to give a document's context"),
        (["--ifd"], "--ifd scores each continuation with and without its context"),
        (["--context-field", "q", "--convention", "hf-recipe"], "needs a convention that scores each document on its own"),
        (["--score-roles", "user"], "--score-roles applies to --messages-field"),
        (["--chat-prompt", "Hi"], "--chat-prompt applies to --chat-wrap"),
        (["--messages-field", "m", "--add-bos"], "the chat template decides the special tokens"),
    ],
)
def test_option_conflicts_are_usage_errors(tiny_llama, tmp_path, options, message):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "q": "y", "m": []}])
    done = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data, *options])
    assert done.exit_code == 2 and message in done.stderr


def test_a_missing_context_field_names_the_record(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"q": "a", "a": "b"}, {"a": "c"}])
    done = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data, "--context-field", "q", "--text-field", "a"])
    assert done.exit_code == 3 and "qa.jsonl line 2 has no field 'q'" in done.stderr and "--context-field" in done.stderr


@pytest.mark.slow
def test_pairs_match_lm_evaluation_harness_loglikelihood(smollm2, tmp_path, monkeypatch):
    import ppl_cli.engine.loading

    monkeypatch.setattr(ppl_cli.engine.loading, "load_model", lambda config, local_rank=0, tokenizer=None: smollm2)
    golden = json.loads(GOLDEN.read_text())
    for part in golden["sets"]:
        data = write_jsonl(tmp_path / f"pairs-{part['window']}.jsonl", [{"context": p["context"], "continuation": p["continuation"]} for p in part["pairs"]])
        config = Config(data=data, context_field="context", text_field="continuation", convention="lm-eval", window=part["window"], bootstrap_samples=0)
        rows = rows_of(evaluate(config))
        assert len(rows) == len(part["pairs"])
        for row, pair in zip(rows, part["pairs"]):
            # float32 kernels round differently by CPU kind: within 4.3e-7 on the machine that ran lm-eval, 1.4e-6 on an Intel Xeon
            assert -row["nll_sum"] == pytest.approx(pair["loglikelihood"], rel=5e-6), pair["shape"]
        if part["window"] == 64:
            assert sum(r["context_cut"] for r in rows) >= 10  # contexts longer than the window, cut as lm-eval cut them


@pytest.mark.slow
def test_smollm2s_own_template_multi_turn_equals_a_naive_loop(smollm2, tmp_path, monkeypatch):
    import ppl_cli.engine.loading

    monkeypatch.setattr(ppl_cli.engine.loading, "load_model", lambda config, local_rank=0, tokenizer=None: smollm2)
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    rows = rows_of(evaluate(Config(data=data, messages_field="messages", bootstrap_samples=0)))
    scored_chats = [CHATS[0], CHATS[1], CHATS[3]]
    for row, chat in zip(rows, scored_chats):
        ids, scored, _ = naive_conversation(smollm2.tokenizer, chat["messages"])
        assert row["nll_sum"] == pytest.approx(masked_nll(smollm2.model, ids, scored), rel=1e-5)


def test_compare_refuses_another_framing_unless_asked(tiny_chat, tmp_path):
    data = write_jsonl(tmp_path / "plain.jsonl", [{"text": " ".join(PROSE[i : i + 3])} for i in range(6)])
    for name, extra in (("plain", []), ("wrapped", ["--chat-wrap"])):
        assert CliRunner().invoke(cli, ["run", "-q", "--model", tiny_chat, "--data", data, "-o", str(tmp_path / name), *extra]).exit_code == 0
    runs = [str(tmp_path / "plain"), str(tmp_path / "wrapped")]
    refused = CliRunner().invoke(cli, ["compare", *runs])
    assert refused.exit_code == 3 and "scored the documents differently" in refused.stderr and "--allow-different-windowing" in refused.stderr
    done = CliRunner().invoke(cli, ["compare", *runs, "--allow-different-windowing", "--json"])
    assert done.exit_code == 0, done.output
    plain = [json.loads(x) for x in (tmp_path / "plain" / "documents.jsonl").read_text().splitlines()]
    wrapped = [json.loads(x) for x in (tmp_path / "wrapped" / "documents.jsonl").read_text().splitlines()]
    assert [r["bytes"] for r in plain] == [r["bytes"] for r in wrapped]  # the same text is counted, framed or not
    delta = json.loads(done.stdout)["bits_per_byte"]["delta"]
    expected = sum(r["nll_sum"] for r in wrapped) / sum(r["bytes"] for r in wrapped) / math.log(2) - sum(r["nll_sum"] for r in plain) / sum(r["bytes"] for r in plain) / math.log(2)
    assert delta == pytest.approx(expected)
