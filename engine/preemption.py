"""SIGTERM / SIGINT handling: the first signal asks the training loop to stop after the current
step and save `last.pt`; a second one exits at once."""

from __future__ import annotations

import os
import signal
import sys


class StopRequest:
    """A flag the training loop polls (a host-side bool: no device work, no sync)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None:
            print(f"\nsecond {signal.Signals(signum).name}: exiting now", file=sys.stderr)
            os._exit(128 + signum)
        self.signal = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt "
            "(send again to exit at once)",
            file=sys.stderr,
        )

    @property
    def requested(self) -> bool:
        return self.signal is not None


class Interrupted(Exception):
    """Raised by the training loop once last.pt is saved after a stop request or after
    `run.stop_after_epochs`; `exit_code` is 0 for a planned stop, 128+signal otherwise."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
