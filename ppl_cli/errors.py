"""One exception type for every failure a user can fix; the CLI prints its message as one line."""

# Exit codes, documented in the README.
EXIT_USAGE = 2  # bad option, config file or combination of options
EXIT_DATA = 3  # data source missing, unreadable or empty
EXIT_MODEL = 4  # model missing, not a causal LM, cannot load
EXIT_OUTPUT = 5  # output directory not writable or holding another run
EXIT_NUMERIC = 6  # a non-finite log-probability
EXIT_SERVER = 7  # a served model's server stopped answering, refused the key, or answered wrongly
EXIT_BROKEN_PIPE = 141  # stdout's reader went away (128 + SIGPIPE, what a process killed by it returns)


class PplError(Exception):
    """An error with a one-line message meant for the user, and the exit code to use."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


class Stopped(PplError):
    """A stop the user asked for (SIGINT, SIGTERM): said in one line, not as an error."""


class PplWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as one line."""


def first_line(error: BaseException) -> str:
    """An exception's message as one line: its first, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
