"""Peak memory of scoring does not grow with document length or vocabulary size."""

import json
import subprocess
import sys
import textwrap

from ppl_cli.engine.transformers_engine import HEAD_CHUNK_ELEMENTS

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from ppl_cli.engine.conventions import Windowing
    from ppl_cli.output.rows import score_documents
    from ppl_cli.engine.transformers_engine import TransformersEngine

    vocab, n = int(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    scorer = TransformersEngine(model, torch.device("cpu"), max_batch_tokens=1024)
    windowing = Windowing("sliding", window=512, stride=256, add_bos=False, bos_id=None)
    ids = torch.randint(0, vocab, (n,))
    score_documents(scorer, [ids[:2048]], windowing, None)  # warm up: every buffer size once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nll = sum(s.sums["nll_sum"] for _, s in score_documents(scorer, [ids], windowing, None)[0])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mb": (after - before) / 1024, "nll_per_token": nll / (n - 1)}))
    """
)


def peak_growth(vocab: int, n_tokens: int) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(vocab), str(n_tokens)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_long_document_with_a_large_vocabulary_stays_under_the_bound():
    # Full float32 logits for this document would be 20,000 x 150,000 x 4 bytes = 12 GB.
    result = peak_growth(vocab=150_000, n_tokens=20_000)
    head_bound_mb = 3 * HEAD_CHUNK_ELEMENTS * 4 / 2**20  # logits, float32 copy, log-probabilities: 192 MiB
    assert result["growth_mb"] < head_bound_mb + 64, result
    assert 11.0 < result["nll_per_token"] < 13.0  # about ln(150,000) = 11.9 for a random tiny model
