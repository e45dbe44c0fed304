"""One exception type for every failure a user can fix; the CLI prints its message as one line.

Messages name the CLI's options (--save-words, -o/--output). Raised or warned through the Python
API, they name Config's keywords instead (save_words=True, output): str() of the error or warning
says them so, except while the CLI runs (`speaking_cli`).
"""

import re
from contextlib import contextmanager

# Exit codes, documented in the README.
EXIT_USAGE = 2  # bad option, config file or combination of options
EXIT_DATA = 3  # data source missing, unreadable or empty
EXIT_MODEL = 4  # model missing, not a causal LM, cannot load
EXIT_OUTPUT = 5  # output directory not writable or holding another run
EXIT_NUMERIC = 6  # a non-finite log-probability
EXIT_SERVER = 7  # a served model's server stopped answering, refused the key, or answered wrongly
EXIT_BROKEN_PIPE = 141  # stdout's reader went away (128 + SIGPIPE, what a process killed by it returns)


AUDIENCE = {"cli": False}  # whose names messages use: the CLI's options while the CLI runs, else Config's keywords


class SpokenToTheUser:
    """A message in the names of whoever reads it: the CLI's options or Config's keywords."""

    def __str__(self) -> str:
        text = super().__str__()
        return text if AUDIENCE["cli"] else python_names(text)


class PplError(SpokenToTheUser, Exception):
    """An error with a one-line message meant for the user, and the exit code to use."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def speaking_cli():
    """While the CLI runs, messages name its options."""
    before = AUDIENCE["cli"]
    AUDIENCE["cli"] = True
    try:
        yield
    finally:
        AUDIENCE["cli"] = before


def python_names(text: str) -> str:
    """A message as the Python API says it: each ppl-eval option as its Config keyword (--signals ->
    signals=True, --no-bow-correction -> bow_correction=False, --window -> window, -o/--output -> output=DIR).
    Other tools' options (vllm serve --max-model-len) stay as they are."""
    from .config import Config, field_names

    fields = set(field_names(Config))
    flags = {name for name in fields if isinstance(getattr(Config, name, None), bool)} | {"bow_correction", "add_bos"}
    renamed = {"vllm_arg": "vllm_args"}

    def keyword(match: re.Match) -> str:
        name = renamed.get(match.group(2).replace("-", "_"), match.group(2).replace("-", "_"))
        if match.group(3):  # --x/--no-x
            return name if name in fields else match.group(0)
        if match.group(1) and name in flags:  # --no-x
            return f"{name}=False"
        if name not in fields:
            return match.group(0)
        return f"{name}=True" if name in flags else name

    text = text.replace("-o/--output", "output=DIR")
    return re.sub(r"(?<![\w-])--(no-)?([a-z][a-z0-9-]*)(/--no-[a-z0-9-]+)?", keyword, text)


class Stopped(PplError):
    """A stop the user asked for (SIGINT, SIGTERM): said in one line, not as an error."""


class PplWarning(SpokenToTheUser, UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as one line."""


def first_line(error: BaseException) -> str:
    """An exception's message as one line: its first, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
