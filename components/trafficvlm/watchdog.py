"""Stall watchdog: a rank stuck in one training step says so, with its samples and stacks, then exits.

A collective that one rank never joins (a crashed data worker, a rank on another code path, a dead NIC)
blocks every other rank silently until the process-group timeout (`parallel.init_distributed`: 1800 s),
and with NCCL the error that follows names an op sequence number, not the step or the data. Each rank
runs one daemon thread; the training loop tells it when a step starts (with the step's sample ids) and
ends. A step that runs longer than `train.stall_timeout_s` gets ONE message on stderr,

    watchdog: rank 0/2 stalled 912 s in step 37, phase forward/backward (samples ['q12', 'q40']); stacks follow

then every Python thread's stack (faulthandler), then `os._exit(STALL_EXIT_CODE)`, so torchrun / the
PyTorchJob restarts the pod (and the run resumes from its last checkpoint) instead of idling 8 GPUs.
The rank that reports is the one *waiting*: compare its step and samples with the ranks that did not report.

    with StallWatchdog(cfg.train.stall_timeout_s, rank=info.rank, world_size=info.world_size) as dog:
        for step in ...:
            dog.step_started(step + 1, sample_ids)
            ...                                    # forward/backward: collectives inside
            dog.phase("optimizer")
            ...
            dog.step_done()

Only the step is watched, not data loading before it (local work, no collective) and not checkpoint
saves (minutes for a 7B model with optimizer state on slow storage; the process-group timeout covers them).
The timeout must cover the slowest honest step, including the first (FSDP lazy init, torch.compile).

NCCL errors are surfaced by the launcher and `parallel.init_distributed`, not here: the PyTorchJob's pods get
`launcher.NCCL_ENV` (TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a failed or timed-out collective tears the process
down with an error instead of hanging; NCCL_DEBUG=WARN: NCCL's own reason is printed, without INFO noise),
and the process group has an explicit 1800 s timeout, so a stall the watchdog does not see (a checkpoint
save) still ends in an error message.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Callable, Sequence, TextIO

STALL_EXIT_CODE = 124  # as timeout(1): "ran out of time", distinct from a Python error's 1


class StallWatchdog:
    """Per-rank stall detector (see the module docstring). `timeout_s = 0` disables it (no thread).

    `abort=False` only reports (tests, or a debugging session that wants to attach py-spy); `clock` and
    `poll_s` exist for tests."""

    def __init__(self, timeout_s: float, *, rank: int, world_size: int, abort: bool = True,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 poll_s: float | None = None):
        if timeout_s < 0:
            raise ValueError(f"train.stall_timeout_s must be >= 0 (0 disables the watchdog), got {timeout_s}")
        self.timeout_s, self.rank, self.world_size, self.abort = timeout_s, rank, world_size, abort
        self.stream, self.clock = stream, clock
        # Checking a few times per timeout keeps the report within ~25% of the deadline at no real cost.
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(0.05, timeout_s / 4))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._step: int | None = None
        self._ids: list[str] = []
        self._phase: str | None = None
        self._since = 0.0
        self._reported = False
        self.reports: list[str] = []  # messages printed, for callers that do not abort
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> "StallWatchdog":
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name=f"stall-watchdog-rank{self.rank}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "StallWatchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def step_started(self, step: int, sample_ids: Sequence[str], phase: str | None = "forward/backward") -> None:
        with self._lock:
            self._step, self._ids, self._phase = step, list(sample_ids), phase
            self._since, self._reported = self.clock(), False

    def phase(self, name: str) -> None:
        """Name the part of the step now running (it shows in the report); the step's clock keeps going."""
        with self._lock:
            self._phase = name

    def step_done(self) -> None:
        with self._lock:
            self._step = None

    def check(self) -> str | None:
        """Report (and abort, if so configured) when the current step is over time; the thread calls this
        every `poll_s`. Returns the message when it reported now."""
        with self._lock:
            if self._step is None or self._reported:
                return None
            waited = self.clock() - self._since
            if waited <= self.timeout_s:
                return None
            self._reported = True  # one report per stalled step, however long it stays stalled
            message = self._message(waited)
        self._report(message)
        return message

    def _message(self, waited: float) -> str:
        phase = f", phase {self._phase}" if self._phase else ""
        return (f"watchdog: rank {self.rank}/{self.world_size} stalled {waited:.0f} s in step {self._step}{phase} "
                f"(samples {self._ids}); stacks follow")

    def _report(self, message: str) -> None:
        stream = self.stream or sys.stderr
        self.reports.append(message)
        stream.write(message + "\n")
        stream.flush()
        try:
            faulthandler.dump_traceback(file=stream, all_threads=True)
        except (AttributeError, ValueError, OSError):  # a stream without a file descriptor (captured stderr)
            stream.write("watchdog: (no stacks: the stream has no file descriptor)\n")
        stream.flush()
        if self.abort:
            stream.write(f"watchdog: rank {self.rank} exits with code {STALL_EXIT_CODE} so the job restarts\n")
            stream.flush()
            os._exit(STALL_EXIT_CODE)  # a clean exit would wait for the stuck collective forever

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()
