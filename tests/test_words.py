"""--save-words: word surprisals with the beginning-of-word correction, against naive loops, minicons and properness."""

import itertools
import json
import math
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import PROSE, lines, run_until, save_tiny_gpt2
from hypothesis import given, settings
from hypothesis import strategies as st

from ppl_cli import Config, evaluate
from ppl_cli.cli import cli
from ppl_cli.errors import PplError
from ppl_cli.output.words import Words, assign, listed_spans, surprisals, word_spans

GOLDEN = Path(__file__).parent / "golden" / "minicons-words.json"


@given(st.text(alphabet=st.sampled_from(["a", "b", "é", " ", "\n", "\t", "\u00a0", "\u2003", "\x1c", "🙂"]), max_size=40))
@settings(max_examples=300, deadline=None)
def test_words_are_those_of_str_split(text):
    assert [text[a:b] for a, b in word_spans(text)] == text.split()


def test_listed_words_are_joined_by_single_spaces():
    assert listed_spans(("New York", "is", "big.")) == [(0, 8), (9, 11), (12, 16)]


def test_each_token_goes_to_one_word_by_the_written_rule():
    text = "  ab cd\n\nef  "
    spans = word_spans(text)  # ab (2, 4), cd (5, 7), ef (9, 11)
    offsets = np.array([[0, 2], [2, 3], [3, 4], [4, 7], [7, 9], [9, 11], [11, 13]])  # "  ", "a", "b", " cd", "\n\n", "ef", "  "
    words = assign(text, spans, offsets)
    assert words.first.tolist() == [0, 3, 4] and words.end.tolist() == [3, 4, 7]  # leading space to ab, \n\n to ef, trailing to ef
    assert not words.shared.any()


def test_a_token_across_a_space_stays_with_its_first_word_and_both_are_flagged():
    text = "of the sea"
    words = assign(text, word_spans(text), np.array([[0, 6], [6, 10]]))  # "of the" is one token
    assert words.first.tolist() == [0, 1, 1] and words.end.tolist() == [1, 1, 2]
    assert words.shared.tolist() == [True, True, False]


def test_surprisals_hand_checked_and_the_corrections_telescope():
    # BOS, then tokens "a" (not a word start), "Ġb", "c", "Ġd": words a | bc | d
    ids = np.array([9, 0, 1, 2, 1])
    starts = np.array([False, True, False, False, False, False, False, False, False, False])
    nll = np.array([1.0, 2.0, 3.0, 4.0])  # positions 1..4
    bow = np.log([0.5, 0.4, 0.3, 0.2])  # ln P_j(W), positions 1..4
    not_bow = np.log([0.4, 0.5, 0.6, 0.7])
    words = Words([(0, 1), (2, 4), (5, 6)], np.array([0, 1, 3]), np.array([1, 3, 4]), np.zeros(3, bool))
    s = surprisals(words, 1, nll, {"bow": bow, "not_bow": not_bow, "end": math.log(0.9)}, ids, starts)
    # a: 1 + ln P_1(N) - ln P_2(W); bc: 2 + 3 + ln P_2(W) - ln P_4(W); d: 4 + ln P_4(W) - ln P_end(W or EOS)
    expected = [1 + math.log(0.4) - math.log(0.4), 5 + math.log(0.4) - math.log(0.2), 4 + math.log(0.2) - math.log(0.9)]
    assert s.corrected.tolist() == pytest.approx(expected) and s.uncorrected.tolist() == [1.0, 5.0, 4.0] and s.tokens.tolist() == [1, 2, 1]
    assert s.corrected.sum() == pytest.approx(nll.sum() + math.log(0.4) - math.log(0.9))
    plain = surprisals(words, 1, nll, None, ids, starts)
    assert plain.corrected.tolist() == plain.uncorrected.tolist()
    no_bos = surprisals(Words(words.spans, words.first, words.end, words.shared), 0, nll[1:], None, ids[1:], starts)
    assert math.isnan(no_bos.corrected[0]) and no_bos.uncorrected.tolist() == [0.0, 5.0, 4.0]  # its only token is not scored


def naive_words(model_path, text, window, stride):
    """Word surprisals by hand: the HF recipe's windows, each window's full logits, numpy log-softmax
    in float64, every token given to a word by its first visible character, the paper's formula with
    the word-start tokens those that begin with Ġ and the written rules for the first and last word."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [tokenizer.bos_token_id, *encoded.input_ids]
    vocab = model.config.vocab_size
    strings = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    w = np.array([t.startswith("Ġ") and i not in tokenizer.all_special_ids for i, t in enumerate(strings)])  # minicons' word starts
    eos = np.zeros(vocab, bool)
    eos[tokenizer.eos_token_id] = True
    n = len(ids)
    logp = {}  # position j -> log P_j over the vocabulary (j = n: after the last token)
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:end]])).logits[0].double().numpy()
        rows = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
        for j in range(max(prev_end, begin + 1), end + (end == n)):
            logp[j] = rows[j - begin - 1]
        prev_end = end
        if end == n:
            break

    def log_mass(j, mask):
        return np.log(np.exp(logp[j])[mask].sum())

    words = text.split()
    spans, start = [], 0
    for word in words:
        a = text.index(word, start)
        spans.append((a, a + len(word)))
        start = a + len(word)
    owner = []
    for s, e in encoded.offset_mapping:
        visible = [p for p in range(s, e) if not text[p].isspace()]
        if visible:
            owner.append(max(k for k, (a, _) in enumerate(spans) if a <= visible[0]))
        else:
            owner.append(min([k for k, (a, _) in enumerate(spans) if a >= e] or [len(spans) - 1]))
    out = []
    for k in range(len(spans)):
        positions = [t + 1 for t, o in enumerate(owner) if o == k]
        a, b = positions[0], positions[-1] + 1
        value = sum(-logp[j][ids[j]] for j in positions)
        value += log_mass(a, w if w[ids[a]] else ~(w | eos))
        value -= log_mass(b, w | eos) if b == n else log_mass(b, w if w[ids[b]] else ~(w | eos))
        out.append(value)
    boundaries = log_mass(1, w if w[ids[1]] else ~(w | eos)) - log_mass(n, w | eos)  # what the corrections add up to
    return words, out, boundaries


def test_every_word_of_texts_longer_than_a_window_equals_the_naive_computation(tiny_gpt2, tmp_path):
    texts = [" ".join(PROSE[(i + k) % len(PROSE)] for k in range(n)) + ("\n\nThe end." if i else "") for i, n in enumerate([3, 9, 14])]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    result = evaluate(Config(model=tiny_gpt2, data=str(data), window=48, stride=20, save_words=True, output=str(out)))
    frame = pd.read_parquet(out / "words")
    for row in result.documents:
        words, expected, boundaries = naive_words(tiny_gpt2, texts[row["index"]], 48, 20)
        mine = frame[frame["index"] == row["index"]].sort_values("word_index")
        assert mine["word"].tolist() == words
        assert mine["surprisal"].tolist() == pytest.approx(expected, rel=1e-5)
        assert mine["uncorrected_surprisal"].sum() == pytest.approx(row["nll_sum"], rel=1e-12)  # every token in one word
        assert row["word_surprisal_sum"] == pytest.approx(sum(expected), rel=1e-5) and row["scored_words"] == len(words)
        assert row["word_surprisal_sum"] == pytest.approx(row["nll_sum"] + boundaries, rel=1e-5)  # the corrections telescope
    assert result.summary["bow_correction"]["on"] and result.summary["bow_correction"]["marker"] == "Ġ"


def small_vocabulary_model():
    """A bigram model over 12 tokens, 4 of which begin a word (Ġ, Ġa, Ġb, Ġc) and 5 of which do not
    (a b c x y): a one-layer Llama whose attention and MLP add nothing, its embeddings one-hot, so
    the next token's logits are a row of B chosen by the current token. After `b`, a word start is
    likely; after a word start, a token that continues the word; then more of those."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "<unk>", "Ġ", "Ġa", "Ġb", "Ġc", "a", "b", "c", "x", "y"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-12)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    starts, inner = [3, 4, 5, 6], [7, 8, 9, 10, 11]
    bigram = torch.zeros(12, 12)  # [current, next] logits
    for t in starts:
        bigram[t, inner] = 3.0
    for t in inner:
        bigram[t, inner], bigram[t, starts], bigram[t, 1] = 2.0, 1.5, 1.0
    bigram[8] = 0.0
    bigram[8, starts] = 4.0  # `b`, the context's last token
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :12] = torch.eye(12)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :12] = bigram.T / 4.0  # the norm scales a one-hot vector of 16 to length 4
    return model, tokenizer


def test_corrected_word_probabilities_are_proper_and_plain_sums_are_not():
    """For one context, the next word is one of: a word-start token, then any number of tokens that are
    neither word starts nor EOS. Over every such word of up to 4 tokens the corrected probabilities
    (the scorer's class sums, words.surprisals) add up to at most 1; the plain products to more."""
    from ppl_cli.engine.base import Job
    from ppl_cli.engine.transformers_engine import TransformersEngine
    from ppl_cli.engine.word_starts import find_word_starts

    model, tokenizer = small_vocabulary_model()
    found = find_word_starts(tokenizer, 12)
    assert found.starts.nonzero()[0].tolist() == [3, 4, 5, 6]
    scorer = TransformersEngine(model, torch.device("cpu"), 4096, keep=("nll", "bow", "bow_eos", "not_bow"), word_classes=torch.from_numpy(found.classes()))
    context = [0, 4, 8]  # <s> Ġa b
    inner = [7, 8, 9, 10, 11]
    candidates = [[first, *rest] for first in (3, 4, 5, 6) for k in range(4) for rest in itertools.product(inner, repeat=k)]
    jobs = [Job(torch.tensor(context + word), len(context), len(context) + len(word), tail=True) for word in candidates]
    corrected, plain = 0.0, 0.0
    for word, scored in zip(candidates, scorer.score(jobs)):
        ids = np.array(context + word)
        words = Words([(0, 1)], np.array([len(context) - 1]), np.array([len(ids) - 1]), np.zeros(1, bool))
        # sequence positions of the word's tokens: [len(context), len(ids)); the classes' arrays cover positions 1..n-1
        nll = np.concatenate([np.zeros(len(context) - 1), scored.tokens["nll"]])
        classes = {name: np.concatenate([np.zeros(len(context) - 1), scored.tokens[name]]) for name in ("bow", "not_bow")}
        s = surprisals(words, 1, nll, {**classes, "end": scored.tail["bow"]}, ids, found.starts)
        corrected += math.exp(-s.corrected[0])
        plain += math.exp(-s.uncorrected[0])
    assert corrected <= 1.0 and corrected > 0.5
    assert plain > 1.0


def test_words_field_keeps_the_corpus_segmentation(tiny_gpt2, tmp_path):
    data = tmp_path / "w.jsonl"
    data.write_text(json.dumps({"words": ["New York", "is", "big,", "isn't", "it?"]}) + "\n")
    out = tmp_path / "out"
    result = evaluate(Config(model=tiny_gpt2, data=str(data), words_field="words", save_words=True, output=str(out)))
    frame = pd.read_parquet(out / "words")
    assert frame["word"].tolist() == ["New York", "is", "big,", "isn't", "it?"] and frame["start"].tolist() == [0, 9, 12, 17, 23]
    assert result.documents[0]["words"] == 5 and frame["uncorrected_surprisal"].sum() == pytest.approx(result.documents[0]["nll_sum"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"words": ["a", " "]}) + "\n")
    with pytest.raises(PplError, match="word 1 of 'words' is whitespace only"):
        evaluate(Config(model=tiny_gpt2, data=str(bad), words_field="words", save_words=True, output=str(tmp_path / "o2")))


def test_a_tokenizer_without_a_word_start_marker_gets_the_plain_sums_and_says_so(tmp_path, recwarn):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["the", "cat", "sat", "on", "mat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<s>", "</s>", "<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "wordlevel"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(folder)  # fmt: skip
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    result = evaluate(Config(model=str(folder), data=str(data), save_words=True, output=str(tmp_path / "out")))
    assert any("without the beginning-of-word correction" in str(w.message) for w in recwarn)
    frame = pd.read_parquet(tmp_path / "out" / "words")
    assert frame["surprisal"].tolist() == frame["uncorrected_surprisal"].tolist() and not result.summary["bow_correction"]["on"]
    with pytest.raises(PplError, match="bow_correction=True is not defined"):
        evaluate(Config(model=str(folder), data=str(data), save_words=True, bow_correction=True, output=str(tmp_path / "o2")))


def test_a_shared_token_is_flagged_in_a_run(tmp_path):
    model = save_tiny_gpt2(tmp_path / "g")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens(["of the"])  # matched before splitting on spaces: one token across two words
    tokenizer.save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model)
    lm.resize_token_embeddings(len(tokenizer))
    lm.save_pretrained(model)
    assert config["vocab_size"] < len(tokenizer)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "the end of the sea"}) + "\n")
    evaluate(Config(model=str(model), data=str(data), save_words=True, output=str(tmp_path / "out")))
    frame = pd.read_parquet(tmp_path / "out" / "words")
    assert frame["shared_token"].tolist() == [False, False, True, True, False]
    assert frame["tokens"].tolist()[3] == 0 and math.isnan(frame["surprisal"].tolist()[3])  # "the": no token of its own


def test_words_survive_a_kill_and_merge_like_the_rows(tiny_llama, tmp_path):
    texts = [" ".join(PROSE[(i + k) % len(PROSE)] for k in range(1 + i % 5)) for i in range(40)]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    common = ["--model", tiny_llama, "--data", str(data), "--window", "16", "--max-batch-tokens", "16", "--save-words", "--quiet"]
    assert CliRunner().invoke(cli, ["run", *common, "-o", str(tmp_path / "one")]).exit_code == 0
    one = pd.read_parquet(tmp_path / "one" / "words").sort_values(["index", "word_index"]).reset_index(drop=True)
    out = tmp_path / "killed"
    run_until([sys.executable, "-m", "ppl_cli", "run", *common, "-o", str(out)], out, 15, signal.SIGKILL)
    assert CliRunner().invoke(cli, ["run", *common, "-o", str(out)]).exit_code == 0
    resumed = pd.read_parquet(out / "words").sort_values(["index", "word_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(one, resumed)
    for i in range(2):
        assert CliRunner().invoke(cli, ["run", *common, "--shard", f"{i}/2", "-o", str(tmp_path / f"s{i}")]).exit_code == 0
    merged = CliRunner().invoke(cli, ["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(tmp_path / "m")])
    assert merged.exit_code == 0, merged.output
    pd.testing.assert_frame_equal(one, pd.read_parquet(tmp_path / "m" / "words").sort_values(["index", "word_index"]).reset_index(drop=True))
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    rows = [json.loads(line) for line in lines(tmp_path / "m" / "documents.jsonl")]
    total, count = sum(r["word_surprisal_sum"] for r in rows), sum(r["scored_words"] for r in rows)
    assert summary["word_perplexity_corrected"] == pytest.approx(math.exp(total / count)) and summary["bow_correction"]["on"]
    report = CliRunner().invoke(cli, ["report", str(tmp_path / "m"), "-o", str(tmp_path / "r.html"), "--documents", "2"])
    assert "with their words coloured" in report.output and "class=\"word s" in (tmp_path / "r.html").read_text()


@pytest.mark.parametrize("option", [["--lengths", "64"], ["--convention", "lm-eval"], ["--context-field", "c"], ["--detokenize", "wikitext"]])
def test_words_with_other_protocols_are_refused(option):
    result = CliRunner().invoke(cli, ["run", "--save-words", "-o", "out", *option, "--data", "-"], input="x")
    assert result.exit_code == 2 and "--save-words" in result.stderr


def assert_like_minicons(model, tokenizer, texts, expected_words, frame):
    """Every word within 1e-4 nats of minicons' corrected surprisal but the first and the last, which
    differ by the terms the two written rules put differently, computed here from the model: the
    first word's division by P(its first token's class | BOS), which minicons leaves out; the last
    word's boundary, W or EOS here, a token that begins with the marker there."""
    from ppl_cli.engine.word_starts import find_word_starts

    vocab = model.get_output_embeddings().weight.shape[0]
    found = find_word_starts(tokenizer, vocab)
    w = torch.from_numpy(found.starts)
    eos = torch.arange(vocab) == tokenizer.eos_token_id
    marker = torch.tensor([t is not None and t.startswith(found.marker) for t in tokenizer.convert_ids_to_tokens(list(range(vocab)))])
    for index, (text, expected) in enumerate(zip(texts, expected_words)):
        mine = frame[frame["index"] == index].sort_values("word_index")["surprisal"].tolist()
        assert len(mine) == len(expected)
        assert mine[1:-1] == pytest.approx(expected[1:-1], abs=1e-4)
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)  # [n, V]
        first_class = w if w[ids[1]] else ~(w | eos)
        assert mine[0] - expected[0] == pytest.approx(torch.logsumexp(logp[0][first_class], 0).item(), abs=1e-4)
        end_mine, end_minicons = torch.logsumexp(logp[-1][w | eos], 0).item(), torch.logsumexp(logp[-1][marker], 0).item()
        assert mine[-1] - expected[-1] == pytest.approx(end_minicons - end_mine, abs=1e-4)


def test_tiny_gpt2_words_match_minicons_but_where_the_written_rules_differ(tmp_path):
    """The tests' tiny GPT-2 (1,024 positions) against minicons 0.3.39 (scripts/golden_words.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    golden = json.loads(GOLDEN.read_text())["tiny-gpt2"]
    model_path = save_tiny_gpt2(tmp_path / "g", n_positions=1024)
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in golden["texts"]))
    evaluate(Config(model=str(model_path), data=str(data), save_words=True, output=str(tmp_path / "out"), bootstrap_samples=0))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    assert_like_minicons(model, AutoTokenizer.from_pretrained(model_path), golden["texts"], golden["corrected"], pd.read_parquet(tmp_path / "out" / "words"))


@pytest.mark.slow
def test_smollm2_words_match_minicons_but_where_the_written_rules_differ(smollm2, tmp_path, monkeypatch):
    """SmolLM2-135M on WikiText-2 validation sentences against minicons 0.3.39 (scripts/golden_words.py)."""
    import ppl_cli.engine.loading

    golden = json.loads(GOLDEN.read_text())["smollm2"]
    monkeypatch.setattr(ppl_cli.engine.loading, "load_model", lambda config, local_rank=0, tokenizer=None: smollm2)
    data = tmp_path / "s.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in golden["texts"]))
    evaluate(Config(data=str(data), save_words=True, output=str(tmp_path / "out"), bootstrap_samples=0))
    assert_like_minicons(smollm2.model, smollm2.tokenizer, golden["texts"], golden["corrected"], pd.read_parquet(tmp_path / "out" / "words"))


def test_compare_pairs_and_select_takes_the_corrected_word_perplexity(tiny_gpt2, tiny_llama, tmp_path):
    from test_metrics import poisson_draw

    texts = [" ".join(PROSE[(i + k) % len(PROSE)] for k in range(1 + i % 4)) for i in range(12)]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    runs = []
    for name, model in (("a", tiny_gpt2), ("b", tiny_llama)):
        done = CliRunner().invoke(cli, ["run", "-q", "--model", model, "--data", str(data), "--window", "16", "--save-words", "-o", str(tmp_path / name)])
        assert done.exit_code == 0, done.output
        corrected = json.loads((tmp_path / name / "summary.json").read_text())["word_perplexity_corrected"]
        [shown] = [line for line in done.stdout.splitlines() if line.endswith("from the saved words (corrected at word starts)")]
        assert float(shown.split()[2].replace(",", "")) == pytest.approx(corrected, rel=1e-4)
        runs.append(tmp_path / name)
    samples = 200
    got = json.loads(CliRunner().invoke(cli, ["compare", *map(str, runs), "--json", "--bootstrap-samples", str(samples), "--seed", "5"]).stdout)
    # The paired bootstrap written out: each document's Poisson(1) weight, the same in both runs.
    rows = [[json.loads(line) for line in lines(run / "documents.jsonl")] for run in runs]
    surprisal = np.array([[r["word_surprisal_sum"] for r in run_rows] for run_rows in rows])  # [2, documents]
    scored = np.array([[r["scored_words"] for r in run_rows] for run_rows in rows])
    u = np.random.default_rng(5).integers(0, 2**32, size=(samples, len(texts)), dtype=np.uint32)
    deltas = []
    for s in range(samples):
        w = np.array([poisson_draw(int(x)) for x in u[s]])
        a, b = (math.exp((w * surprisal[k]).sum() / (w * scored[k]).sum()) for k in (0, 1))
        deltas.append(b - a)
    m = got["word_perplexity_corrected"]
    assert m["a"] == pytest.approx(math.exp(surprisal[0].sum() / scored[0].sum()), rel=1e-12)
    assert m["b"] == pytest.approx(math.exp(surprisal[1].sum() / scored[1].sum()), rel=1e-12)
    assert m["ci"] == pytest.approx([np.percentile(deltas, 2.5), np.percentile(deltas, 97.5)], rel=1e-9)
    human = CliRunner().invoke(cli, ["compare", *map(str, runs)]).stdout
    assert "word perplexity corrected" in human
    report = CliRunner().invoke(cli, ["report", *map(str, runs), "-o", str(tmp_path / "r.html")])
    assert report.exit_code == 0 and "word perplexity, saved words" in (tmp_path / "r.html").read_text()
    # A run without words: the metric is not compared, and select says where it comes from.
    plain = tmp_path / "plain"
    assert CliRunner().invoke(cli, ["run", "-q", "--model", tiny_gpt2, "--data", str(data), "--window", "16", "-o", str(plain)]).exit_code == 0
    assert "word_perplexity_corrected" not in json.loads(CliRunner().invoke(cli, ["compare", str(runs[0]), str(plain), "--json"]).stdout)
    refused = CliRunner().invoke(cli, ["select", str(plain), "--metric", "word_perplexity_corrected", "--max", "100", "-o", str(tmp_path / "x.jsonl")])
    assert refused.exit_code == 3 and "a run with --save-words has it" in refused.stderr
    cut = float(np.median([r["word_perplexity_corrected"] for r in rows[0]]))
    kept = CliRunner().invoke(cli, ["select", str(runs[0]), "--metric", "word_perplexity_corrected", "--max", str(cut), "-o", str(tmp_path / "low.jsonl")])
    assert kept.exit_code == 0, kept.output
    selected = [json.loads(line)["ppl_eval"] for line in lines(tmp_path / "low.jsonl")]
    assert [s["index"] for s in selected] == [r["index"] for r in rows[0] if r["word_perplexity_corrected"] <= cut]
    assert all("word_perplexity_corrected" in s for s in selected)


@pytest.mark.slow
def test_smollm2_corrected_interior_words_equal_a_float64_computation_from_the_same_logits(smollm2, tmp_path, monkeypatch):
    """The word-start classes' mass is a sum over 31,985 of SmolLM2's 49,152 tokens: summed in float32
    it drifts by up to 1.4e-4 nats. Every interior word's corrected surprisal must be within 1e-5 nats
    of naive_words' (float64 log-softmax of the same float32 logits: the engine takes the model's
    full forward of one window a batch, as naive_words does, not its LM head on the scored rows alone
    or a padded batch of several, which round differently), on WikiText-2 test paragraphs drawn with a
    seed (the other word tests use the validation text)."""
    import random

    import ppl_cli.engine.transformers_engine

    monkeypatch.setattr(ppl_cli.engine.transformers_engine, "head_reproduces_logits", lambda model, device: False)

    from conftest import SHARED

    test = SHARED / "data" / "wikitext-2-v1" / "wiki.test.tokens"
    if not test.is_file():
        pytest.skip(f"WikiText-2 is not available: {test} is absent (../shared beside the checkout)")
    paragraphs = [p.strip() for p in test.read_text(encoding="utf-8").splitlines() if 300 < len(p.strip()) < 900 and not p.strip().startswith("=")]
    texts = random.Random(7).sample(paragraphs, 5)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    config = Config(data=str(data), window=1024, max_batch_tokens=1, save_words=True, output=str(out), bootstrap_samples=0)
    evaluate(config, model=smollm2.model, tokenizer=smollm2.tokenizer)
    frame = pd.read_parquet(out / "words")
    worst = 0.0
    for index, text in enumerate(texts):
        words, expected, _ = naive_words(smollm2.info["dequantized_copy"], text, 1024, 512)
        mine = frame[frame["index"] == index].sort_values("word_index")["surprisal"].to_numpy()
        assert len(mine) == len(words) > 40
        worst = max(worst, float(np.abs(mine[1:-1] - np.array(expected[1:-1])).max()))
    assert worst < 1e-5, worst
