"""Errors the user can fix. The CLI prints their message on one line and exits 2 (DESIGN.md exit codes)."""


class UserError(Exception):
    """Bad usage, config or input data: no traceback, exit code 2."""


class ConfigError(UserError):
    """A config file or `key=value` override is wrong."""


class DataError(UserError):
    """An input data file is missing, unreadable or has bad rows."""


class RunFailure(Exception):
    """The run cannot go on (e.g. non-finite updates `run.max_bad_steps` times in a row): one line, exit 1. The last
    complete checkpoint stays, so `raylign run --resume` can continue once the cause is fixed."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the stage wrote a checkpoint if it had state to save."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signum}")
        self.exit_code = 128 + signum
