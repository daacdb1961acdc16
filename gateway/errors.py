"""Errors a person reads: the CLI prints them as one line, never a traceback."""


class DeskgateError(Exception):
    """An expected failure with a readable message; exit_code is what the CLI returns."""

    exit_code = 1


class ConfigError(DeskgateError):
    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class StoreUnavailable(DeskgateError):
    """The database cannot take a write now; the sender must retry (4xx / EX_TEMPFAIL)."""

    exit_code = 75


class NotFound(DeskgateError):
    exit_code = 1
