"""The README's set-up commands are the ones CI runs, and its option list matches the CLI."""

import re
from pathlib import Path

from click.testing import CliRunner

from ppl_cli.cli import cli
from ppl_cli.metrics import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


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


def test_every_run_option_is_documented_in_help_and_readme():
    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    for option in re.findall(r"--[a-z][a-z-]+", help_text):
        assert option in help_text
        if option not in ("--help", "--debug", "--quiet", "--json", "--output"):
            assert option in README or option.replace("--no-", "--") in README, option
