"""The one base of every error slmify raises on purpose, with the exit code the CLI gives it.

Each stage keeps its own error class (StoreError, RecipeError, ...) and also subclasses
`SlmifyError`, so the CLI catches one type and prints one line, `error: <message>`, with
no traceback. Reads and writes nothing; imports nothing from slmify, so any module can
import it.

Exit codes (also documented in `slmify --help`):
  1  a stage or its input failed (no calls to cluster, an unreachable store, ...);
  2  bad config: a recipe or run config with an unknown key, a bad value, an unknown name.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2


class SlmifyError(Exception):
    """An error with a message meant for the user; `exit_code` is the CLI's exit status."""

    exit_code: int = EXIT_FAILED
