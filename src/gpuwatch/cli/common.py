"""What every command shares: exit codes and the command-line error."""

from __future__ import annotations

from ..config import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class UsageError(ConfigError):
    """A command-line mistake (not the config file's); exit 2 like a config error."""
