"""The command line: parse options, call ppl_cli.evaluate, print. Heavy imports happen inside commands."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings

import click
from click.core import ParameterSource
from click_option_group import optgroup

from .config import (
    ATTENTIONS,
    BANDS,
    CONVENTIONS,
    DEFAULT_CONCURRENCY,
    DETOKENIZERS,
    DOC_SPLITS,
    DTYPES,
    ENCODING_ERRORS,
    ENGINES,
    QUANTIZATIONS,
    QUANTIZE_ALIASES,
    SELECT_FORMATS,
    SELECT_METRICS,
    build_config,
)
from .errors import EXIT_BROKEN_PIPE, PplError, PplWarning, Stopped, first_line, speaking_cli

DOCS_POINTER = (
    "Every option and number is defined in ppl-eval's documentation: README.md and the docs/ folder of its"
    " source (what is measured, data, running, engines, prompts, comparing, the report, selection, the cluster, the Python API)."
)

# Loggers that speak when transformers imports them, whether or not a run uses them: torchao's
# "Failed to load" of its CUDA kernels on a CPU machine, torch's pytree deprecation notes.
LIBRARY_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


class OneLineErrors(click.Group):
    """click's command group, but a bad option, value or command is one `ppl-eval: error:` line and exit 2."""

    def main(self, *args, **kwargs):
        with speaking_cli():  # messages name the options, not Config's keywords
            return self.run_main(*args, **kwargs)

    def run_main(self, *args, **kwargs):
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        try:
            return super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.ClickException as e:  # a UsageError knows its command: its --help is named
            ctx = getattr(e, "ctx", None)
            where = f" (see {' '.join(['ppl-eval', *ctx.command_path.split()[1:]])} --help)" if ctx is not None else ""
            click.echo(f"ppl-eval: error: {' '.join(e.format_message().split())}{where}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("ppl-eval: interrupted", err=True)
            sys.exit(130)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]}, epilog=DOCS_POINTER)
@click.version_option(package_name="ppl-eval")
def cli():
    """Exact, resumable corpus perplexity for Hugging Face causal language models.

    Start with `ppl-eval run` (the offline demo), then `ppl-eval run --help`."""
    warnings.showwarning = show_warning
    warnings.filterwarnings("always", category=PplWarning)  # every run's, not once per process
    for noisy in LIBRARY_IMPORT_NOISE:
        logging.getLogger(noisy).setLevel(logging.ERROR)


@cli.command(short_help="Score documents with a causal LM and report perplexity.", epilog=DOCS_POINTER)
@optgroup.group("Model")
@optgroup.option("--model", multiple=True, help="Hub id, model directory, .gguf file or `smollm2-135m` (default); several, or a quoted glob of checkpoint folders, for a series.")
@optgroup.option("--revision", help="Hub revision (branch, tag or commit) of the model.")
@optgroup.option("--revisions", help="Several hub revisions of --model, comma-separated: a series, each scored into OUTPUT/<revision>/.")
@optgroup.option("--dtype", type=click.Choice(DTYPES), help="auto: bfloat16 on CUDA, float32 elsewhere.")
@optgroup.option("--device", help="auto, cpu, cuda, cuda:N or mps.")
@optgroup.option("--device-map", help="Spread the model over devices: auto, balanced, balanced_low_0, sequential, or a JSON map {module: device}.")
@optgroup.option("--attn-implementation", type=click.Choice(ATTENTIONS), help="The attention kernel (default: sdpa).")
@optgroup.option("--quantize", type=click.Choice([*QUANTIZATIONS, *QUANTIZE_ALIASES]), help="Quantize the model while it loads (bitsandbytes, torchao, quanto; int8, int4: torchao-int8, bnb-4bit).")
@optgroup.option("--trust-remote-code", is_flag=True, help="Run the model repository's own Python code.")
@optgroup.option("--allow-pickle", is_flag=True, help="Load pickled .bin/.pt weights (they can run code).")
@optgroup.group("Engine")
@optgroup.option("--engine", type=click.Choice(ENGINES), help="What computes the log-probabilities: transformers (default), vllm, or served (an http(s) --model) (docs/engines.md).")
@optgroup.option("--tensor-parallel-size", type=int, help="vllm: GPUs each layer is split over.")
@optgroup.option("--pipeline-parallel-size", type=int, help="vllm: stages of layers on successive GPUs or nodes (with --vllm-arg distributed_executor_backend=ray).")
@optgroup.option("--gpu-memory-utilization", type=float, help="vllm: the share of each GPU's memory it may use (its CPU build: of RAM).")
@optgroup.option("--vllm-arg", "vllm_args", multiple=True, metavar="KEY=VALUE", help="vllm: any engine argument, repeatable; the value read as JSON where it parses (quantization=fp8, kv_cache_dtype=fp8).")
@optgroup.option("--served-model", help="A served model (--model http(s)://host/v1): its name on the server (default: the one it lists).")
@optgroup.option("--tokenizer", help="A served model's tokenizer, loaded here: a hub id or folder (default: the served model's name).")
@optgroup.option("--api-key-env", metavar="NAME", help="The environment variable holding the server's key (default: OPENAI_API_KEY, when set).")
@optgroup.option("--concurrency", type=int, help=f"A served model's requests in flight (default: {DEFAULT_CONCURRENCY}).")
@optgroup.option("--max-retries", type=int, help="Retries of a request the server fails (timeouts, refused, 429, 5xx), with backoff (default: 8).")
@optgroup.option("--request-timeout", type=float, help="Seconds a request may take (default: 600).")
@optgroup.option("--insecure", is_flag=True, help="https without verifying the server's certificate.")
@optgroup.group("Data")
@optgroup.option("--data", multiple=True, help="A file (.jsonl/.json/.csv/.parquet/.txt/.md/.tokens, each also .gz/.bz2/.xz/.zst), a quoted glob, a directory, a URL, - for stdin, wikitext or a hub dataset id; repeat for several, read in order. Default: python-docstrings.")
@optgroup.option("--data-config", help="Hub dataset configuration name.")
@optgroup.option("--split", help="Hub dataset split (wikitext: test).")
@optgroup.option("--streaming", is_flag=True, help="Hub datasets: stream the rows instead of downloading the dataset whole.")
@optgroup.option("--text-field", help="Field holding the text in JSON/CSV/Parquet/hub records (default: text).")
@optgroup.option("--id-field", help="Field holding a document id (default: a field named id, where a record has one).")
@optgroup.option("--doc-split", type=click.Choice(DOC_SPLITS), help="Text files: one document per file, line or paragraph.")
@optgroup.option("--encoding-errors", type=click.Choice(ENCODING_ERRORS), help="On invalid UTF-8: fail (strict) or replace.")
@optgroup.option("--skip-bad-records", is_flag=True, help="Skip records that cannot be read (invalid JSON, no text field, ...), counted in summary.json, instead of stopping.")
@optgroup.option("--limit", type=int, help="Score only the first N documents.")
@optgroup.group("What is scored")
@optgroup.option("--context-field", help="A field read as the text's context and not scored: the text is scored given it (dotted paths allowed).")
@optgroup.option("--context-template", help="A context made from fields, e.g. '{instruction}\\n{input}\\n' (\\n, \\t are read as escapes).")
@optgroup.option("--messages-field", help="A field holding a conversation ([{role, content}, ...]), rendered with the chat template.")
@optgroup.option("--score-roles", help="The conversation turns scored, comma-separated (default: assistant).")
@optgroup.option("--chat-template", type=click.Path(dir_okay=False), help="A Jinja chat template file, instead of the tokenizer's.")
@optgroup.option("--chat-wrap", is_flag=True, help="Score each plain document as the assistant's reply to --chat-prompt.")
@optgroup.option("--chat-prompt", help="The user turn that --chat-wrap puts before each document.")
@optgroup.option("--group-by", help="Report metrics per group: a field (dotted path), file (the source file) or dir (its folder).")
@optgroup.option("--max-groups", type=int, help="More groups than this is an error (default: 10000).")
@optgroup.option("--sample", type=float, help="Estimate from a seeded sample of this share of the documents, in (0, 1].")
@optgroup.option("--sample-per-group", type=int, help="Estimate from a seeded sample of N documents a group (with --group-by).")
@optgroup.group("Windows and conventions")
@optgroup.option("--window", type=int, help="Tokens per window (default: model context, at most 2048).")
@optgroup.option("--stride", type=int, help="Tokens between window starts (default: window/2).")
@optgroup.option("--add-bos/--no-add-bos", default=None, help="Prefix each document with BOS (default: if the tokenizer has one).")
@optgroup.option("--bos-token", metavar="TOKEN", help="The start token before each document, as the tokenizer writes it (default: its BOS, e.g. <|endoftext|>).")
@optgroup.option("--convention", type=click.Choice(CONVENTIONS), help="Whose windows and counts: sliding (default), hf-recipe, lm-eval, llama-cpp.")
@optgroup.option("--detokenize", type=click.Choice(DETOKENIZERS), help="wikitext: lm-eval's WikiText detokenizer before scoring.")
@optgroup.option("--lengths", help="Perplexity at several context lengths from one pass: 2048,4096,8192 or start:stop:step; each document's first L tokens (with --stride: sliding windows of L).")
@optgroup.option("--min-tokens", type=int, help="--lengths: score documents with at least this many tokens (default: the largest length); each length then has those that reach it.")
@optgroup.option("--allow-beyond-context", is_flag=True, help="Allow a --window or --lengths longer than the model's configured context (extrapolation).")
@optgroup.group("Signals and extras")
@optgroup.option("--reference-model", help="A reference model P scored on the same windows: KL(P || Q), top-1 agreement, delta p.")
@optgroup.option("--reference-dtype", type=click.Choice(DTYPES), help="The reference model's dtype (auto as --dtype).")
@optgroup.option("--reference-device", help="The reference model's device (default: --device).")
@optgroup.option("--signals", is_flag=True, help="Add membership and uncertainty signals to each row: min_k, min_k_plus_plus, zlib_ratio, mean_entropy (reference_ratio with --reference-model).")
@optgroup.option("--min-k", type=float, help="k of Min-K% and Min-K%++: the share of a document's least likely tokens averaged (default: 0.2).")
@optgroup.option("--ifd", is_flag=True, help="Also score each continuation without its context: unconditional_nll_sum and ifd.")
@optgroup.option("--save-tokens", is_flag=True, help="Write every scored token (log p, entropy, rank) to --output/tokens/*.parquet.")
@optgroup.option("--save-words", is_flag=True, help="Write every word's surprisal (beginning-of-word corrected) to --output/words/*.parquet.")
@optgroup.option("--words-field", help="--save-words: a field holding each document as a list of words (the corpus's own segmentation), scored joined by spaces.")
@optgroup.option("--bow-correction/--no-bow-correction", default=None, help="--save-words: correct word surprisals for the word start marked on the next token (default: where the tokenizer defines it).")
@optgroup.group("Output")
@optgroup.option("-o", "--output", type=click.Path(file_okay=False), help="Directory for summary.json, documents.jsonl/.csv.")
@optgroup.option("--overwrite", is_flag=True, help="Replace the results already in --output instead of resuming.")
@optgroup.option("--json", "as_json", is_flag=True, help="Print summary.json to stdout and nothing else.")
@optgroup.option("--jsonl", "as_jsonl", is_flag=True, help="Print each document's row to stdout as it is final, in input order; the summary goes to stderr.")
@optgroup.option("--seed", type=int, help="Seed of the bootstrap interval (default: 0).")
@optgroup.option("--bootstrap-samples", type=int, help="Bootstrap resamples; 0 turns the interval off (default: 1000).")
@optgroup.option("-q", "--quiet", is_flag=True, help="No progress bar or loading messages on stderr (with --jsonl, no summary either).")
@optgroup.option("-v", "--verbose", is_flag=True, help="Other libraries' output too: their loading bars, vLLM's log.")
@optgroup.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of options; CLI options override it.")
@optgroup.option("--debug", is_flag=True, help="Show the traceback of an error.")
@optgroup.group("Performance and scale-out")
@optgroup.option("--max-batch-tokens", type=int, help="Padded tokens per forward pass (default: one window on CPU, 65536 on GPU).")
@optgroup.option("--threads", type=int, help="CPU threads for torch (default: all cores).")
@optgroup.option("--shard", help="Score only shard I of N (I/N: documents whose index is I mod N); combine with `ppl-eval merge`.")
@click.pass_context
def run(ctx, config_file, as_json, as_jsonl, quiet, verbose, debug, **options):
    """Score documents with a causal LM and report perplexity.

    \b
    Examples:
      ppl-eval run                                   # offline demo
      ppl-eval run --model gpt2 --data wikitext -o results/gpt2-wt2
      cat notes/*.txt | ppl-eval run --data - --json
      ppl-eval run --data corpus.jsonl --jsonl | jq -c 'select(.token_perplexity > 100)'
    """
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) is ParameterSource.COMMANDLINE}
    models = given.pop("model", ())
    if len(models) == 1:
        given["model"] = models[0]
    elif models:  # --model given several times: a series
        given.update(model=models[0], series=models)
    main_rank = os.environ.get("RANK", "0") == "0"

    def work():
        if as_json and as_jsonl:
            raise PplError("--json and --jsonl would both write to stdout; choose one")
        if quiet and verbose:
            raise PplError("--quiet and --verbose: choose one")
        config = build_config(config_file, **given)
        announce(not quiet and main_rank, verbose)
        if quiet:
            silence_libraries()
        if config.is_series:
            if as_jsonl:
                raise PplError("--jsonl prints one run's rows; a series writes each model's into OUTPUT/<name>/documents.jsonl")
            from .series import evaluate_series

            return evaluate_series(config, progress=not quiet)
        from .pipeline import evaluate

        return evaluate(config, progress=not quiet, on_rows=print_rows if as_jsonl and main_rank else None)

    result = guarded(work, debug)
    if hasattr(result, "checkpoints"):  # a series
        from .series import format_series

        click.echo(json.dumps(result.series, indent=2, ensure_ascii=False) if as_json else format_series(result.series))
        return
    if as_jsonl:
        if not quiet and main_rank:
            from .output.summary import format_summary

            click.echo(format_summary(result.summary), err=True)
        return
    print_summary(result, as_json, main_rank)


def print_rows(rows: list[dict]) -> None:
    """--jsonl: rows to stdout, one JSON object a line, flushed so that a pipe sees them at once."""
    out = sys.stdout
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    out.flush()


@cli.command(short_help="Join the shards of a run, or runs over different data, into one report.")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Directory for the merged report.")
@click.option("--allow-partial", is_flag=True, help="Merge even if shards are missing; the summary reports coverage.")
@click.option("--overwrite", is_flag=True, help="Replace results already in --output.")
@click.option("--json", "as_json", is_flag=True, help="Print the merged summary.json to stdout and nothing else.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
def merge(dirs, output, allow_partial, overwrite, as_json, debug):
    """Combine result directories into one report: the shards of one run (`run --shard I/N`), or
    whole runs over different data, one after the other.

    \b
    Examples:
      ppl-eval merge results/shard-* -o results/all
      ppl-eval merge results/paloma/c4 results/paloma/m2d2 -o results/paloma-all   # runs made with --group-by file
    """

    def work():
        from .commands.merge import merge_runs

        return merge_runs(list(dirs), output, allow_partial, overwrite)

    print_summary(guarded(work, debug), as_json)


@cli.command(short_help="Compare runs with a baseline: paired intervals and p-values.")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--allow-different-data", is_flag=True, help="Compare the documents every run scored (matched by index and id).")
@click.option("--allow-different-windowing", is_flag=True, help="Compare runs that scored the same documents with other windows, conventions or --chat-wrap.")
@click.option("--bootstrap-samples", type=int, default=1000, show_default=True, help="Paired bootstrap resamples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the resamples.")
@click.option("--top", type=int, default=5, show_default=True, help="Documents listed as most improved and most worsened.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as one JSON object.")
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
def compare(runs, as_json, markdown, debug, **options):
    """Compare result directories against the first (the baseline): paired bootstrap intervals and p-values.

    \b
    Examples:
      ppl-eval compare results/base results/finetuned
      ppl-eval compare results/base results/q4 results/q8 --json
    """

    def work():
        from .commands.compare import CompareConfig, compare_runs

        return compare_runs(CompareConfig(tuple(runs), **options))

    comparison = guarded(work, debug)
    from .commands.compare import format_comparison, format_markdown

    if as_json:
        click.echo(json.dumps(comparison, indent=2, ensure_ascii=False))
    else:
        click.echo(format_markdown(comparison) if markdown else format_comparison(comparison))


@cli.command(short_help="One self-contained HTML page about one run or several.")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The HTML file to write.")
@click.option("--png", type=click.Path(file_okay=False), help="Also write the plots as PNG files into this folder.")
@click.option("--documents", type=int, default=5, show_default=True, help="Most and least surprising documents shown.")
@click.option("--tokens", type=int, default=2000, show_default=True, help="Tokens shown of each such document (runs with --save-tokens).")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
def report(runs, output, png, documents, tokens, debug):
    """One self-contained HTML page about a run, or several runs side by side (the first is the baseline).

    \b
    Examples:
      ppl-eval report results/gpt2 -o report.html
      ppl-eval report results/base results/finetuned -o compare.html --png plots/
    """

    def work():
        from .commands.report import ReportConfig, build_report

        return build_report(ReportConfig(tuple(runs), output, png, documents, tokens))

    made = guarded(work, debug)
    click.echo(
        f"{made['output']}: {len(made['plots'])} plots, {made['documents_shown']} documents"
        + (f", {made['coloured']} with their tokens coloured" if made["coloured"] else "")
        + (f", {made['words_coloured']} with their words coloured" if made["words_coloured"] else "")
    )


@cli.command(short_help="Keep a corpus's records by perplexity: thresholds, bands, buckets.")
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False))
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of options (a recipe); CLI options override it.")
@click.option("-o", "--output", help="A .jsonl, .jsonl.gz, .jsonl.zst or .parquet file; a folder with --buckets; - for JSON Lines on stdout.")
@click.option("--metric", type=click.Choice(SELECT_METRICS), help="The per-document metric to select by (default: token_perplexity).")
@click.option("--min", "min_", type=float, help="Keep documents whose metric is at least this.")
@click.option("--max", "max_", type=float, help="Keep documents whose metric is at most this.")
@click.option("--min-perplexity", type=float, help="Keep documents whose token perplexity is at least this.")
@click.option("--max-perplexity", type=float, help="Keep documents whose token perplexity is at most this.")
@click.option("--keep", type=click.Choice(BANDS), help="Keep a band by rank: the lowest, middle or highest values.")
@click.option("--keep-fraction", type=float, help="The band's share of the documents, in (0, 1].")
@click.option("--buckets", help="Percentile cut points, e.g. 30,60: one output per bucket (head, middle, tail for two).")
@click.option("--format", "format_", type=click.Choice([f[1:] for f in SELECT_FORMATS]), help="The buckets' file format (default: jsonl).")
@click.option("--data", multiple=True, help="Read the records from here instead of the run's own source (its fingerprint must match).")
@click.option("--group-by", help="Cut points and bands within each group: a field, file or dir (as CCNet cuts each language).")
@click.option("--allow-partial", is_flag=True, help="Select from a partial run (a merge with missing shards, one shard, a run not finished).")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist.")
@click.option("--json", "as_json", is_flag=True, help="Print the selection (what selection.json holds) as JSON.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.pass_context
def select(ctx, run_dir, config_file, as_json, debug, **options):
    """Keep the records of a scored corpus by perplexity: thresholds, a band by rank, or percentile buckets.

    \b
    Examples:
      ppl-eval select scores/crawl --keep middle --keep-fraction 0.5 -o kept.jsonl.gz
      ppl-eval select scores/crawl --buckets 30,60 -o buckets/
      ppl-eval select scores/crawl --max-perplexity 1000 --metric bits_per_byte --max 1.2 -o clean.parquet
      ppl-eval select scores/crawl --keep high --keep-fraction 0.01 --json | jq .cut_points
    """
    renamed = {"min_": "min", "max_": "max", "format_": "format"}
    given = {renamed.get(k, k): v for k, v in options.items() if ctx.get_parameter_source(k) is ParameterSource.COMMANDLINE}

    def work():
        from .commands.select import SelectConfig, select_records
        from .config import build_config

        config = build_config(config_file, SelectConfig, run=run_dir, **given)
        if as_json and config.output == "-":
            raise PplError("--json and -o - would both write to stdout; write the records to a file")
        return select_records(config)

    selection = guarded(work, debug)
    from .commands.select import format_selection

    if as_json:
        click.echo(json.dumps(selection, indent=2, ensure_ascii=False))
    else:
        click.echo(format_selection(selection), err=selection["selected"][0]["file"] == "-")


def guarded(work, debug: bool):
    """Run `work`; any failure becomes one line on stderr and an exit code."""
    try:
        return work()
    except Stopped as e:  # the user's own stop: said, not an error
        click.echo(f"ppl-eval: {e}", err=True)
        sys.exit(e.exit_code)
    except PplError as e:
        fail(str(e), e.exit_code, debug)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): end quietly, as `yes | head` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more reaches the closed pipe at exit
        sys.exit(EXIT_BROKEN_PIPE)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside a run's scoring
        if debug:
            traceback.print_exc()
        click.echo("ppl-eval: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a bug or an unexpected library error: still one line, unless --debug
        fail(f"unexpected {type(e).__name__}: {first_line(e)} (rerun with --debug for the traceback)", 1, debug)


def print_summary(result, as_json: bool, main_rank: bool = True):
    """Print the summary once (rank 0 under torchrun): as JSON, or a few lines for a person."""
    if not main_rank:
        return
    if as_json:
        click.echo(json.dumps(result.summary, indent=2, ensure_ascii=False))
    else:
        from .output.summary import format_summary

        click.echo(format_summary(result.summary))


def fail(message: str, code: int, debug: bool):
    if debug:
        traceback.print_exc()
    click.echo(f"ppl-eval: error: {message}", err=True)
    sys.exit(code)


def show_warning(message, category, filename, lineno, file=None, line=None, _library=warnings.showwarning):
    """ppl-eval's own warnings as one line each; other libraries' as Python shows them."""
    if issubclass(category, PplWarning):
        click.echo(f"ppl-eval: warning: {message}", err=True)
    else:
        _library(message, category, filename, lineno, file, line)


class EchoHandler(logging.Handler):
    """Writes through click to whatever stderr is current (a StreamHandler keeps the first one)."""

    def emit(self, record):
        click.echo(self.format(record), err=True)


def announce(loud: bool, verbose: bool = False) -> None:
    """ppl-eval's own progress lines (loading a model, resuming a run) on stderr, one line each,
    unless --quiet (or on a torchrun rank but the first); with --verbose at DEBUG, which also lets
    other libraries' bars and vLLM's log through (runtime.progress.library_bars, engine.vllm_engine)."""
    logger = logging.getLogger("ppl_cli")
    if not logger.handlers:
        handler = EchoHandler()
        handler.setFormatter(logging.Formatter("ppl-eval: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose and loud else logging.INFO if loud else logging.WARNING)


def silence_libraries():
    """--quiet: no loading bars or warnings from transformers and datasets."""
    import os

    os.environ["TQDM_DISABLE"] = "1"  # bars that transformers' GGUF loader draws with plain tqdm
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass
