"""``python -m engine``: the command line of ``engine.cli``."""

import os
import signal
import sys


def _stop_at_start(signum: int, frame: object) -> None:
    """A signal before the command line has loaded: nothing has been done yet, so the process
    ends at once (an exception raised here would pass through whatever module is importing, and
    some turn it into something else)."""
    print(f"interrupted by {signal.Signals(signum).name}: nothing was written", file=sys.stderr, flush=True)
    os._exit(128 + signum)


for _signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signum, _stop_at_start)

from engine.cli import main  # noqa: E402 (after the handlers, so that a signal while it loads stops cleanly)

sys.exit(main())
