"""--convention: each peer tool's windows and counts, against naive ports (tiny models) and
against golden values produced by the real tools (scripts/golden.py) on SmolLM2-135M."""

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import wikitext_valid_or_skip
from reference import hf_guide_published, hf_recipe, llama_cpp_chunks, lm_eval_rolling, requantized
from transformers import AutoModelForCausalLM, AutoTokenizer

import ppl_cli.engine.loading
from ppl_cli import Config, evaluate
from ppl_cli.cli import cli
from ppl_cli.engine.conventions import JOIN, wikitext_detokenize
from ppl_cli.engine.windows import Window, llama_cpp_windows, lm_eval_windows, recipe_windows

GOLDEN = json.loads((Path(__file__).parent / "golden" / "smollm2-wikitext-valid.json").read_text())


# --- windows, hand-checked --------------------------------------------------------------------


def test_lm_eval_windows_hand_checked():
    # prefix + 10 tokens, max_length 4: 4 + 4 predictions with one token of context, then the
    # last 2 predictions read the 4 tokens before them.
    assert lm_eval_windows(11, 4) == [Window(0, 5, 1), Window(4, 9, 5), Window(6, 11, 9)]
    assert lm_eval_windows(3, 4) == [Window(0, 3, 1)]
    assert lm_eval_windows(1, 4) == []


def test_recipe_windows_reproduce_the_guide_even_when_it_skips_tokens():
    assert recipe_windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    # Stride 5 > window 4: the guide masks nothing, so tokens 4, 5 and 9 are never scored.
    assert recipe_windows(10, 4, 5) == [Window(0, 4, 1), Window(5, 9, 6)]


def test_llama_cpp_chunks_hand_checked():
    # floor(2500 / 1024) = 2 chunks; each scores its tokens after position 512: 511 tokens.
    assert llama_cpp_windows(2500, 1024) == [Window(0, 1024, 513), Window(1024, 2048, 1537)]


def test_wikitext_detokenizer_examples():
    text = " = Title = \n The 2 @,@ 000 @-@ year old cat 's toy ( red ) cost 3 @.@ 5 . \n"
    assert wikitext_detokenize(text) == " = Title =\nThe 2,000-year old cat's toy (red) cost 3.5.\n"


# --- tiny models against naive ports ---------------------------------------------------------


def load(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def test_lm_eval_convention_equals_the_harness_loop(tiny_llama, corpus_jsonl, corpus_texts):
    model, tokenizer = load(tiny_llama)
    result = evaluate(Config(model=tiny_llama, data=corpus_jsonl, convention="lm-eval", window=24))
    assert result.summary["windowing"]["prefix_token_id"] == tokenizer.bos_token_id
    for doc, text in zip(result.documents, corpus_texts):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert doc["tokens"] == len(ids)  # every token, the first one too (after the prefix)
        assert -doc["nll_sum"] == pytest.approx(lm_eval_rolling(model, ids, tokenizer.bos_token_id, 24), rel=1e-5)
        assert doc["words"] == len(re.split(r"\s+", text))


def test_hf_recipe_convention_equals_the_guide_both_normalisations(tiny_gpt2, corpus_jsonl, corpus_texts):
    model, tokenizer = load(tiny_gpt2)
    result = evaluate(Config(model=tiny_gpt2, data=corpus_jsonl, convention="hf-recipe", window=64, stride=16))
    ids = tokenizer(JOIN.join(corpus_texts), add_special_tokens=False).input_ids
    nll, count = hf_recipe(model, ids, 64, 16)
    assert result.summary["documents"] == 1 and result.summary["tokens"] == count
    assert result.summary["nll_sum"] == pytest.approx(nll, rel=1e-5)
    published_nll, published_tokens = hf_guide_published(model, ids, 64, 16)
    published = result.summary["hf_recipe_published"]
    assert published["tokens"] == published_tokens < count  # the guide drops a token per window
    assert published["nll_sum"] == pytest.approx(published_nll, rel=1e-5)


@pytest.mark.parametrize("add_bos", [False, True])
def test_llama_cpp_convention_equals_its_chunk_loop(tiny_llama, corpus_jsonl, corpus_texts, add_bos):
    model, tokenizer = load(tiny_llama)
    flag = "--add-bos" if add_bos else "--no-add-bos"
    out = CliRunner().invoke(cli, ["run", "--quiet", "--json", "--model", tiny_llama, "--data", corpus_jsonl,
                                   "--convention", "llama-cpp", "--window", "64", flag])  # fmt: skip
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    ids = tokenizer(JOIN.join(corpus_texts), add_special_tokens=False).input_ids
    nll, nll2, count = llama_cpp_chunks(model, ids, 64, tokenizer.bos_token_id if add_bos else None)
    assert summary["tokens"] == count and summary["nll_sum"] == pytest.approx(nll, rel=1e-5)
    mean = nll / count
    uncertainty = math.exp(mean) * math.sqrt((nll2 / count - mean * mean) / (count - 1))
    assert summary["llama_cpp_uncertainty"] == pytest.approx(uncertainty, rel=1e-4)


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--convention", "hf-recipe", "--add-bos"], 2, "do not apply to --convention hf-recipe"),
        (["--convention", "lm-eval", "--no-add-bos"], 2, "do not apply to --convention lm-eval"),
        (["--convention", "llama-cpp", "--window", "128"], 3, "needs at least 2 x window = 256 tokens"),
        (["--convention", "kenlm"], 2, "Invalid value for '--convention'"),
    ],
)
def test_convention_errors(tiny_gpt2, args, code, message):
    out = CliRunner().invoke(cli, ["run", "--quiet", "--model", tiny_gpt2, "--data", "-", *args], input="short text")
    assert out.exit_code == code, out.output
    assert message in out.stderr


def test_the_convention_is_recorded_and_guards_resume(tiny_gpt2, corpus_jsonl, tmp_path):
    out = tmp_path / "out"
    base = ["run", "--quiet", "--model", tiny_gpt2, "--data", corpus_jsonl, "-o", str(out)]
    assert CliRunner().invoke(cli, [*base, "--convention", "lm-eval"]).exit_code == 0
    assert json.loads((out / "summary.json").read_text())["windowing"]["convention"] == "lm-eval"
    again = CliRunner().invoke(cli, base)
    assert again.exit_code == 5 and "different convention ('lm-eval', now 'sliding')" in again.stderr


# --- the real model against the real tools' golden values --------------------------------------


@pytest.fixture
def real_run(smollm2, monkeypatch):
    monkeypatch.setattr(ppl_cli.engine.loading, "load_model", lambda config, local_rank=0, tokenizer=None: smollm2)
    path = wikitext_valid_or_skip()

    def run(**options):
        config = Config(data=str(path), limit=3, window=GOLDEN["window"], bootstrap_samples=0, **options)
        return evaluate(config)

    return run


@pytest.mark.slow
@pytest.mark.parametrize("detokenize,key", [("none", "lm-eval"), ("wikitext", "lm-eval-detokenized")])
def test_lm_eval_matches_lm_evaluation_harness(real_run, detokenize, key):
    golden = GOLDEN[key]
    result = real_run(convention="lm-eval", detokenize=detokenize)
    for doc, loglikelihood in zip(result.documents, golden["loglikelihoods"], strict=True):
        assert -doc["nll_sum"] == pytest.approx(loglikelihood, rel=1e-4)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert result.summary[metric] == pytest.approx(golden[metric], rel=1e-4), metric


@pytest.mark.slow
def test_hf_recipe_matches_the_guide_run_verbatim(real_run):
    golden = GOLDEN["hf-recipe"]
    summary = real_run(convention="hf-recipe", stride=GOLDEN["stride"]).summary
    assert summary["tokens"] == golden["exact_tokens"]
    assert summary["token_perplexity"] == pytest.approx(golden["exact_perplexity"], rel=1e-5)
    published = summary["hf_recipe_published"]
    assert published["tokens"] == golden["published_tokens"]
    assert published["token_perplexity"] == pytest.approx(golden["published_perplexity"], rel=1e-5)


@pytest.mark.slow
def test_llama_cpp_within_one_percent_of_llama_perplexity(real_run):
    golden = GOLDEN["llama-cpp"]
    summary = real_run(convention="llama-cpp").summary
    assert summary["windowing"]["add_bos"] == golden["add_bos"]
    assert summary["tokens"] == golden["chunks"] * (GOLDEN["window"] - GOLDEN["window"] // 2 - 1)
    assert summary["token_perplexity"] == pytest.approx(golden["perplexity"], rel=0.01)
    assert summary["llama_cpp_uncertainty"] == pytest.approx(golden["uncertainty"], rel=0.05)


@pytest.mark.slow
def test_reference_model_statistics_within_what_was_measured_against_llama_perplexity(smollm2, monkeypatch):
    """SmolLM2 Q4_1 as the reference P, its Q4_0 requantization as Q, the llama-cpp convention.

    llama-perplexity runs both models in quantized arithmetic and stores P's log-probabilities in
    16 bits, floored at max - 16 (it drops p < e^-16 from the KL sum); ppl-eval de-quantizes both
    to float32 and sums every term. Measured (ppl-eval vs llama.cpp): mean KLD -0.81%, same top p
    -0.03 points (one token of 3,066), PPL ratio -0.18%, median KLD -0.02%, RMS delta p +0.16%,
    NLL correlation +0.05 points; the bounds below add a margin to those.
    """
    golden = GOLDEN["llama-cpp-kl"]
    quantized = dataclasses.replace(smollm2, model=requantized(smollm2.model, "Q4_0"), info={**smollm2.info, "id": "q4_0"})
    monkeypatch.setattr(ppl_cli.engine.loading, "load_model", lambda config, local_rank=0, tokenizer=None: quantized if config.model == "q4_0" else smollm2)
    path = wikitext_valid_or_skip()
    config = Config(model="q4_0", reference_model="smollm2-135m", data=str(path), limit=3, window=GOLDEN["window"],
                    convention="llama-cpp", bootstrap_samples=0)  # fmt: skip
    ref = evaluate(config).summary["reference"]
    assert ref["tokens"] == GOLDEN["llama-cpp"]["chunks"] * (GOLDEN["window"] - GOLDEN["window"] // 2 - 1)
    assert ref["kld_mean"]["value"] == pytest.approx(golden["kld_mean"]["value"], rel=0.015)
    assert ref["kld_percentiles"]["median"] == pytest.approx(golden["kld_percentiles"]["median"], rel=0.01)
    assert ref["same_top_p"]["value"] == pytest.approx(golden["same_top_p"]["value"], abs=0.003)
    assert ref["ppl_ratio"]["value"] == pytest.approx(golden["ppl_ratio"]["value"], rel=0.005)
    assert ref["delta_p_rms"]["value"] == pytest.approx(golden["delta_p_rms"]["value"], rel=0.01)
    assert ref["nll_correlation"] == pytest.approx(golden["nll_correlation"], abs=0.003)
    for key in ("kld_mean", "same_top_p", "ppl_ratio"):  # llama.cpp's standard errors, from the same sums
        assert ref[key]["uncertainty"] == pytest.approx(golden[key]["uncertainty"], rel=0.05), key
