"""The README's set-up commands are the ones CI runs; every command the docs show parses; every option is documented."""

import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from ppl_cli.cli import cli
from ppl_cli.output.metrics import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {path.relative_to(ROOT).as_posix(): path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
EVERYTHING = "\n".join(DOCS.values())


def setup_commands():
    first_block = re.search(r"```\n(.*?)```", README, re.S).group(1)
    return [line for line in first_block.splitlines() if line.strip()]


def test_first_screen_has_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2
    assert commands[0].endswith("ppl-eval run") and commands[1].endswith("pytest")
    assert README.index(commands[1]) < 1500  # on the first screen


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == setup_commands()[1]


def test_every_metric_is_defined_in_the_readme():
    for key in (*METRIC_KEYS, "macro_token_perplexity", "bootstrap", "skipped_documents", "tokens_per_second"):
        assert f"`{key}`" in README, key


def shown_commands():
    """Every ppl-eval invocation in a code block of the README and docs: (file, argv)."""
    for name, text in DOCS.items():
        for block in re.findall(r"```\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if "ppl-eval" not in line and "ppl_cli" not in line:
                    continue
                for part in line.split(" | "):
                    words = shlex.split(part, comments=True)
                    if "ppl-eval" in words[:1]:
                        yield name, words[1:]
                    elif "-m" in words and "ppl_cli" in words:  # torchrun ... -m ppl_cli [--] run ...
                        after = words[words.index("ppl_cli") + 1 :]
                        yield name, after[1:] if after[:1] == ["--"] else after


COMMANDS = list(shown_commands())


def test_the_docs_show_every_command():
    assert {argv[0] for _, argv in COMMANDS} >= {"run", "merge", "compare", "report", "select"}


@pytest.mark.parametrize("name,argv", COMMANDS, ids=[f"{n}:{' '.join(a)[:60]}" for n, a in COMMANDS])
def test_every_command_shown_parses(name, argv):
    """Each parses as click would run it (options, choices, types), stopping short of running it."""
    if not argv:
        return  # `ppl-eval run` alone, the demo
    command = cli.get_command(None, argv[0])
    assert command is not None, f"{name}: unknown command {argv[0]}"
    with command.make_context(argv[0], argv[1:], resilient_parsing=False) as ctx:
        assert ctx.params is not None


def test_every_option_is_documented():
    for command in ("run", "merge", "compare", "report", "select"):
        help_text = CliRunner().invoke(cli, [command, "--help"]).output
        for option in re.findall(r"--[a-z][a-z-]+", help_text):
            if option not in ("--help", "--debug", "--quiet", "--json", "--output"):
                assert option in EVERYTHING or option.replace("--no-", "--") in EVERYTHING, f"{command} {option}"
