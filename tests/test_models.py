"""Models as users have them: spread by a device map, quantized, in memory in a training loop, a series of checkpoints."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PROSE, save_tiny_llama

from ppl_cli import Config, evaluate, evaluate_series
from ppl_cli.cli import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(PROSE[(i + k) % 8] for k in range(1 + i % 4))}) + "\n" for i in range(12)))
    return str(path)


def rows(result):
    return list(result.iter_documents())


def run_json(*args):
    done = CliRunner().invoke(cli, ["run", "-q", "--json", *args])
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


# --- loading ---------------------------------------------------------------------------------------


def test_a_device_map_that_offloads_layers_to_disk_gives_the_plain_numbers(tiny_llama, corpus):
    plain = rows(evaluate(Config(model=tiny_llama, data=corpus, window=32)))
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    spread = evaluate(Config(model=tiny_llama, data=corpus, window=32, device_map=json.dumps(device_map)))
    assert [r["nll_sum"] for r in rows(spread)] == pytest.approx([r["nll_sum"] for r in plain], rel=1e-6)
    assert spread.summary["model"]["device_map"] == {"cpu": 4, "disk": 2}


def test_a_device_map_that_does_not_fit_is_one_line(tiny_llama, corpus, tmp_path):
    bad = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", corpus, "--device-map", '{"": "cuda:7"}'])
    assert bad.exit_code in (2, 4) and len(bad.stderr.splitlines()) == 1 and "device" in bad.stderr
    broken = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", corpus, "--device-map", "{not json"])
    assert broken.exit_code == 2 and "not a JSON map" in broken.stderr
    wrong = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", corpus, "--device-map", "everywhere"])
    assert wrong.exit_code == 2 and "--device-map must be one of auto" in wrong.stderr


def test_attention_implementations(tiny_llama, corpus):
    sdpa = rows(evaluate(Config(model=tiny_llama, data=corpus, window=32)))
    eager = rows(evaluate(Config(model=tiny_llama, data=corpus, window=32, attn_implementation="eager")))
    assert [r["nll_sum"] for r in eager] == pytest.approx([r["nll_sum"] for r in sdpa], rel=1e-5)
    missing = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", corpus, "--attn-implementation", "flash_attention_2"])
    assert missing.exit_code == 4 and "--attn-implementation flash_attention_2 cannot be used here" in missing.stderr
    assert len(missing.stderr.splitlines()) == 1


def test_loading_holds_about_one_copy_of_the_weights_in_host_memory(tmp_path):
    """Peak resident memory while a float32 safetensors model loads, over its weights (scripts/bench_loading.py measures a bigger one)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_loading import make_model

    weights = make_model(tmp_path, layers=2)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_loading.py"), "--child", str(tmp_path), "float32", "-"], capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert (measured["peak"] - measured["before"]) / weights < 2.5  # measured 1.28 (docs/models.md); two copies would be over 2


# --- quantized models ------------------------------------------------------------------------------

CPU_SCHEMES = ("torchao-int8", "quanto-int8", "bnb-8bit", "bnb-4bit", "quanto-int4")


@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_each_cpu_quantization_loads_scores_and_is_compared_with_float32(tiny_llama_64, corpus, scheme):
    from ppl_cli.engine.loading import QUANTIZERS, installed

    if not installed(QUANTIZERS[scheme][0]):
        pytest.skip(f"{QUANTIZERS[scheme][0]} is not installed")
    base = run_json("--model", tiny_llama_64, "--data", corpus, "--window", "32")
    quantized = run_json("--model", tiny_llama_64, "--data", corpus, "--window", "32", "--quantize", scheme,
                         "--reference-model", tiny_llama_64, "--reference-dtype", "float32")  # fmt: skip
    assert quantized["model"]["quantization"]["bits"] in (4, 8, "int4", "int8")
    bits = 4 if "4" in scheme else 8
    assert abs(math.log(quantized["token_perplexity"] / base["token_perplexity"])) < (0.05 if bits == 8 else 0.25)
    kld = quantized["reference"]["kld_mean"]["value"]
    assert 0 < kld < (0.05 if bits == 8 else 0.5)  # KL(float32 || quantized), nats a token
    assert quantized["reference"]["perplexity"] == pytest.approx(base["token_perplexity"], rel=1e-5)  # the reference is float32


def test_a_quantized_checkpoint_loads_as_transformers_loads_it(tiny_llama_64, corpus, tmp_path):
    import torch
    import transformers

    from ppl_cli.engine.loading import installed

    if not installed("torchao"):
        pytest.skip("torchao is not installed")
    from torchao.quantization import Int8WeightOnlyConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_64, dtype=torch.float32, quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig()))
    checkpoint = tmp_path / "int8"
    model.save_pretrained(checkpoint)
    transformers.AutoTokenizer.from_pretrained(tiny_llama_64).save_pretrained(checkpoint)
    saved = run_json("--model", str(checkpoint), "--data", corpus, "--window", "32")
    on_load = run_json("--model", tiny_llama_64, "--data", corpus, "--window", "32", "--quantize", "torchao-int8")
    assert saved["model"]["quantization"] == {"method": "torchao", "scheme": "Int8WeightOnlyConfig", "bits": 8, "group_size": None}
    assert saved["token_perplexity"] == pytest.approx(on_load["token_perplexity"], rel=1e-6)


def test_a_missing_or_misplaced_quantizer_is_one_line(tiny_llama_64, corpus, monkeypatch):
    import ppl_cli.engine.loading as loading

    monkeypatch.setattr(loading, "installed", lambda package: False)
    missing = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama_64, "--data", corpus, "--quantize", "bnb-4bit"])
    assert missing.exit_code == 4 and "--quantize bnb-4bit needs the bitsandbytes package: pip install bitsandbytes" in missing.stderr
    monkeypatch.setattr(loading, "installed", lambda package: True)
    device = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama_64, "--data", corpus, "--quantize", "torchao-int4", "--device", "cpu"])
    assert device.exit_code == 4 and "runs on CUDA" in device.stderr


# --- a model in memory -----------------------------------------------------------------------------


def test_a_model_in_memory_gives_the_numbers_of_its_path_and_is_left_as_it_was(tiny_llama, corpus):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    loss = model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    attention = model.config._attn_implementation

    in_memory = evaluate(Config(data=corpus, window=32), model=model, tokenizer=tokenizer)
    by_path = evaluate(Config(model=tiny_llama, data=corpus, window=32))
    assert [r["nll_sum"] for r in rows(in_memory)] == pytest.approx([r["nll_sum"] for r in rows(by_path)], rel=1e-6)
    assert model.training and model.config._attn_implementation == attention
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(torch.equal(p.grad, grads[name]) for name, p in model.named_parameters() if p.grad is not None)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    bf16 = model.to(torch.bfloat16)  # the CPU bfloat16 kernel is switched on while scoring, then off again
    evaluate(Config(data=corpus, window=32), model=bf16, tokenizer=tokenizer)
    assert bf16.config._attn_implementation == attention and bf16.training


def test_a_model_in_memory_without_its_tokenizer_is_an_error(tiny_llama, corpus):
    import transformers

    from ppl_cli.errors import PplError

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(PplError, match="needs its tokenizer"):
        evaluate(Config(data=corpus), model=model)


def test_the_trainer_callback_logs_what_a_run_of_the_checkpoint_gives(tiny_llama, corpus, tmp_path):
    import torch
    import transformers
    from datasets import Dataset

    from ppl_cli.integrations import PerplexityCallback

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = tokenizer.eos_token  # the Trainer's collator asks for one
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    texts = [json.loads(line)["text"] for line in Path(corpus).read_text().splitlines()]
    encoded = [tokenizer(t, add_special_tokens=False).input_ids[:24] for t in texts]
    train = Dataset.from_dict({"input_ids": encoded, "labels": encoded})
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "train"), per_device_train_batch_size=1, max_steps=6, logging_steps=3,
                                          report_to=[], save_strategy="no", learning_rate=1e-3, use_cpu=True, disable_tqdm=True)  # fmt: skip
    callback = PerplexityCallback(corpus, every=3, window=32)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "heldout_perplexity" in entry]
    assert [entry["step"] for entry in logged] == [3, 6]
    assert model.training  # left in training mode
    final = tmp_path / "final"
    trainer.save_model(final)
    separate = evaluate(Config(model=str(final), data=corpus, window=32)).summary
    assert logged[-1]["heldout_perplexity"] == pytest.approx(separate["token_perplexity"], rel=1e-5)
    assert logged[-1]["heldout_loss"] == pytest.approx(separate["nll_sum"] / separate["tokens"], rel=1e-5)


def train_with(model, callback, tmp_path, processing_class=None, steps=4):
    """A real Trainer over a few tokenized documents, with `callback`; returns it once trained."""
    import transformers
    from datasets import Dataset

    encoded = [list(range(5 + k, 20 + k)) for k in range(4)]
    train = Dataset.from_dict({"input_ids": encoded, "labels": encoded})
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "train"), per_device_train_batch_size=1, max_steps=steps, logging_steps=2,
                                          report_to=[], save_strategy="no", learning_rate=1e-3, use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, processing_class=processing_class, callbacks=[callback],
                                   data_collator=transformers.default_data_collator)  # fmt: skip
    trainer.train()
    return trainer


def logged(trainer) -> list[int]:
    return [entry["step"] for entry in trainer.state.log_history if "heldout_perplexity" in entry]


def test_the_callback_finds_a_tokenizer_or_says_so_and_never_ends_the_training(tiny_llama, corpus, tmp_path, caplog):
    import torch
    import transformers

    from ppl_cli.integrations import PerplexityCallback

    # no processing_class: the tokenizer saved with the model (its name_or_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert logged(train_with(model, PerplexityCallback(corpus, every=2, window=32), tmp_path)) == [2, 4]
    def nameless():
        """A model built from its configuration: no name_or_path to find a tokenizer by."""
        built = transformers.AutoModelForCausalLM.from_config(model.config)
        built.config._name_or_path = ""
        return built

    # tokenizer= given
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    assert logged(train_with(nameless(), PerplexityCallback(corpus, every=2, window=32, tokenizer=tokenizer), tmp_path)) == [2, 4]
    # none anywhere: said once, before step one; training ends as planned
    caplog.clear()
    trainer = train_with(nameless(), PerplexityCallback(corpus, every=2, window=32), tmp_path)
    assert trainer.state.global_step == 4 and logged(trainer) == []
    warnings = [r.getMessage() for r in caplog.records if r.name == "ppl_cli.integrations"]
    assert len(warnings) == 1 and "no tokenizer for this model" in warnings[0] and "tokenizer=tokenizer" in warnings[0]
    # an evaluation that fails (the held-out file went away): a warning a time, and training goes on
    gone = tmp_path / "gone.jsonl"
    gone.write_text(Path(corpus).read_text())
    callback = PerplexityCallback(str(gone), every=2, window=32, tokenizer=tokenizer)
    gone.unlink()
    caplog.clear()
    trainer = train_with(nameless(), callback, tmp_path)
    assert trainer.state.global_step == 4 and logged(trainer) == []
    failures = [r.getMessage() for r in caplog.records if r.name == "ppl_cli.integrations"]
    assert len(failures) == 2 and all("evaluation at step" in f and "training goes on" in f and "data not found" in f for f in failures)


# --- a series of checkpoints -----------------------------------------------------------------------


@pytest.fixture
def checkpoints(tmp_path):
    """Three checkpoints of one 'training run' (the same tokenizer, different weights), named by step."""
    folder = tmp_path / "run"
    for step, scale in ((500, 8.0), (2000, 4.0), (1000, 6.0)):
        save_tiny_llama(folder / f"checkpoint-{step}", scale=scale)
    return folder


def test_a_series_scores_each_checkpoint_as_a_separate_run_would(checkpoints, corpus, tmp_path):
    out = tmp_path / "series"
    done = CliRunner().invoke(cli, ["run", "-q", "--model", str(checkpoints / "checkpoint-*"), "--data", corpus, "--window", "32", "-o", str(out)])
    assert done.exit_code == 0, done.output
    series = json.loads((out / "series.json").read_text())
    assert [c["step"] for c in series["series"]] == [500, 1000, 2000]  # in step order, not name order
    for c in series["series"]:
        separate = evaluate(Config(model=str(checkpoints / c["name"]), data=corpus, window=32)).summary
        assert c["token_perplexity"] == pytest.approx(separate["token_perplexity"], rel=1e-9)
        assert (out / c["name"] / "summary.json").is_file()
    again = evaluate_series(Config(model=str(checkpoints / "checkpoint-*"), data=corpus, window=32, output=str(out)))
    assert all(c["already_finished"] for c in again.series["series"])  # resumed: nothing scored again
    compared = json.loads(CliRunner().invoke(cli, ["compare", str(out), "--json"]).stdout)
    assert [c["step"] for c in compared["checkpoints"]] == [500, 1000, 2000] and "against_previous" in compared["checkpoints"][1]
    delta = compared["checkpoints"][1]["against_previous"]["token_perplexity"]["delta"]
    assert delta == pytest.approx(series["series"][1]["token_perplexity"] - series["series"][0]["token_perplexity"], rel=1e-9)
    page = tmp_path / "curve.html"
    assert CliRunner().invoke(cli, ["report", str(out), "-o", str(page)]).exit_code == 0
    assert "<figure class='plot' id='series_curve'><svg" in page.read_text()


def test_models_given_several_times_are_a_series_in_that_order(checkpoints, corpus, tmp_path):
    out = tmp_path / "given"
    args = ["run", "-q", "--data", corpus, "--window", "32", "-o", str(out)]
    for step in (2000, 500):
        args += ["--model", str(checkpoints / f"checkpoint-{step}")]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert [c["step"] for c in json.loads((out / "series.json").read_text())["series"]] == [2000, 500]


def test_bad_series_are_one_line(checkpoints, corpus, tmp_path, tiny_gpt2):
    nothing = CliRunner().invoke(cli, ["run", "-q", "--model", str(tmp_path / "none-*"), "--data", corpus, "-o", str(tmp_path / "s")])
    assert nothing.exit_code == 4 and "no checkpoint folders match" in nothing.stderr
    mixed = CliRunner().invoke(cli, ["run", "-q", "--model", str(checkpoints / "checkpoint-500"), "--model", tiny_gpt2, "--data", corpus, "-o", str(tmp_path / "m")])
    assert mixed.exit_code == 4 and "have different tokenizers" in mixed.stderr
    no_output = CliRunner().invoke(cli, ["run", "-q", "--model", str(checkpoints / "checkpoint-*"), "--data", corpus])
    assert no_output.exit_code == 2 and "a series of models needs an output directory" in no_output.stderr


@pytest.mark.slow
def test_smollm2_quantized_on_cpu_stays_near_float32(smollm2, tmp_path):
    """The worked table of docs/models.md, in small: SmolLM2 int8 and 4-bit against float32 on the
    first ~2,000 characters (about 500 tokens) of two WikiText articles."""
    from conftest import wikitext_valid_or_skip

    from ppl_cli.data.documents import load_documents
    from ppl_cli.engine.loading import QUANTIZERS, installed

    articles = load_documents(Config(data=(str(wikitext_valid_or_skip()),), limit=2))
    data = tmp_path / "articles.jsonl"
    data.write_text("".join(json.dumps({"text": a.text[: a.text.rfind(" ", 0, 2000)]}) + "\n" for a in articles))
    saved = "smollm2-135m"  # the GGUF's float32 weights, quantized again (docs/models.md)
    for scheme, within in (("torchao-int8", 0.01), ("bnb-4bit", 0.5)):  # NF4 costs a 135M model about a quarter of its perplexity (docs/models.md)
        if not installed(QUANTIZERS[scheme][0]):
            continue
        summary = evaluate(Config(model=saved, data=str(data), limit=1, window=512, quantize=scheme, reference_model=saved, reference_dtype="float32")).summary
        base = summary["reference"]["perplexity"]
        assert abs(summary["token_perplexity"] / base - 1) < within, scheme
        assert 0 < summary["reference"]["kld_mean"]["value"] < within
    if installed("bitsandbytes"):  # LLM.int8's outlier columns span a batch: scored one window a batch, the batch size changes nothing
        runs = [evaluate(Config(model=saved, data=str(data), limit=2, window=256, quantize="bnb-8bit", max_batch_tokens=tokens)) for tokens in (256, 4096)]
        assert runs[0].summary["model"]["batch"].startswith("one window a batch")
        assert [r["nll_sum"] for r in runs[0].documents] == [r["nll_sum"] for r in runs[1].documents]


def test_int8_and_int4_are_short_for_a_scheme_that_runs_on_cpu_and_cuda():
    assert (Config(quantize="int8").quantize, Config(quantize="int4").quantize) == ("torchao-int8", "bnb-4bit")
    assert Config(quantize="int8").to_dict()["quantize"] == "torchao-int8"  # what summary.json records
