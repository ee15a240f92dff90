"""SIGTERM / SIGINT handling: the first signal asks the training loop to stop after the current
step and save `last.pt`; a second one exits at once."""

from __future__ import annotations

import os
import signal
import sys
import time

# Under a parent that passes signals on (torchrun's agent; the study runner, which sets
# FORWARDED_ENV) one stop often arrives twice: Ctrl-C or a scheduler's SIGTERM reaches the whole
# process group, parent included, and the parent sends its own. A second signal this soon after
# the first is taken as the same request; torchrun's SIGKILL after its grace period (30 s)
# still ends a worker that cannot stop.
SAME_SIGNAL_S = 5.0
FORWARDED_ENV = "ENGINE_SIGNALS_FORWARDED"


class StopRequest:
    """A flag the training loop polls (a host-side bool: no device work, no sync). A second
    signal within `same_within_s` of the first counts as the same request (default: 5 s under
    a parent that forwards signals, 0 otherwise)."""

    def __init__(self, same_within_s: float | None = None) -> None:
        self.signal: int | None = None
        self.at = 0.0
        if same_within_s is None:
            forwarded = "TORCHELASTIC_RUN_ID" in os.environ or FORWARDED_ENV in os.environ
            same_within_s = SAME_SIGNAL_S if forwarded else 0.0
        self.same_within_s = same_within_s

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None:
            if time.monotonic() - self.at < self.same_within_s:
                return
            print(f"\nsecond {signal.Signals(signum).name}: exiting now", file=sys.stderr)
            os._exit(128 + signum)
        self.signal, self.at = signum, time.monotonic()
        print(
            f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt "
            "(send again to exit at once)",
            file=sys.stderr,
        )

    @property
    def requested(self) -> bool:
        return self.signal is not None


def leave_stops_to_the_main_process(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: loader workers ignore SIGTERM and SIGINT. A stop sent to the
    whole process group (torchrun, `timeout`, Slurm, Ctrl-C) would otherwise kill each worker
    (torch's handler), failing the next batch before last.pt is saved, or print the stop
    message once per worker. Workers still end with the main process (torch's watchdog)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class Interrupted(Exception):
    """Raised by the training loop once last.pt is saved after a stop request or after
    `run.stop_after_epochs`; `exit_code` is 0 for a planned stop, 128+signal otherwise."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
