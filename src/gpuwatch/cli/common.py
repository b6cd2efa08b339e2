"""What every command shares: exit codes, the command-line error, JSON output."""

from __future__ import annotations

import json
from typing import Any, TextIO

from ..config import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class UsageError(ConfigError):
    """A command-line mistake (not the config file's); exit 2 like a config error."""


def write_json(document: Any, out: TextIO, *, one_line: bool = False) -> None:
    """One JSON document for programs: UTF-8 as is, no NaN or infinity (not JSON), then a newline.
    ``one_line``: compact, one document per line (a stream of them, as ``status --watch --json``)."""
    if one_line:
        out.write(json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n")
    else:
        json.dump(document, out, indent=2, ensure_ascii=False, allow_nan=False)
        out.write("\n")
    out.flush()
