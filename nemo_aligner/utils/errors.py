"""Failures caused by a job's inputs, and how an entry script reports them: one line, exit code 1.

A bad config value, a bad data line, a missing file, an unreachable or rejecting reward server or
a NaN loss is the user's to fix, and a traceback (one per rank under torchrun) only buries the
message. Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class InputError(Exception):
    """Mixed into errors that a job's inputs cause but that are not ValueError/OSError (e.g. a reward server's)."""


# ValueError: config and data validation (ConfigError, DataFormatError); OSError: missing or
# unreadable files; FloatingPointError: a NaN or inf loss or gradient.
USER_ERRORS = (ValueError, OSError, FloatingPointError, InputError)
TRACEBACK_ENV = "NEMO_ALIGNER_TRACEBACK"


def report_input_errors(main: F) -> F:
    """Wrap an entry script's main: an input error ends the process with `error: <message>` on
    stderr and exit code 1 (set NEMO_ALIGNER_TRACEBACK=1 to get the traceback instead).

    Under torchrun every rank usually hits the same error: rank 0 prints at once; the others wait
    a moment first, so the launcher, stopping the job when rank 0 exits, leaves one copy of the
    line, while an error only one rank saw is still printed by that rank.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as err:
            if os.environ.get(TRACEBACK_ENV):
                raise
            rank = int(os.environ.get("RANK", "0"))
            if rank:
                time.sleep(2.0)
            print(f"error{f' (rank {rank})' if rank else ''}: {err}", file=sys.stderr, flush=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]
