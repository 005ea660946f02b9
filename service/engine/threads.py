"""Torch thread counts on a few shared cores: what the engine thread uses, and one-off work kept off it."""

import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the calling thread's torch ops on one core, for one-off work outside the engine thread.

    Each thread that runs a multi-threaded torch op keeps its own OpenMP worker threads for life. Once the
    process holds more of them than there are cores, libgomp stops spin-waiting between parallel regions,
    and every small op of the decode pays for waking a sleeping worker. Measured on 2 cores after loading
    the model on 2 threads in another thread: bf16 decode-shaped matmuls 2x slower, a batch-1 decode step
    30 ms instead of 21. Loading and merging on one thread keep the engine thread's workers the only ones.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this thread's OpenMP/MKL setting; other running threads keep theirs
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ThreadTuner:
    """Picks the engine thread's torch thread count by timing decode steps with each choice.

    On the 2-core reference machine, 2 threads decode ~25 % faster than 1 while nothing else runs, and
    5-10x slower while another process keeps a core busy: OpenMP workers spin between ops, the scheduler
    hands their core to the other process, and every op then waits for them at a barrier. So now and
    then a few steps run with the other count, which is kept if it was faster. Trying 1 thread is cheap,
    so it happens often; trying more is rare, for its bad case is so bad.
    """

    TRIAL_STEPS = 3  # counted steps per trial, after one uncounted step that may build new kernels
    EVERY_S = (5.0, 30.0)  # between trials of 1 thread, and of more

    def __init__(self, threads: int) -> None:
        self.most = self.chosen = threads
        self.rows = 0  # batch size of the steps in `times`: only steps of one size are compared
        self.times: list[float] = []  # the latest steps with `chosen`
        self.trial: list[float] | None = None  # steps with the other count, while trying it
        self._use(threads)

    def _other(self) -> int:
        return 1 if self.chosen > 1 else self.most

    def _use(self, threads: int) -> None:
        torch.set_num_threads(threads)  # this thread's count only
        self.next_trial = time.monotonic() + self.EVERY_S[self._other() > 1]

    def observe(self, seconds: float, rows: int) -> None:
        """Account for one decode step over `rows` sequences; start, score or end a trial."""
        if self.most == 1:
            return
        if rows != self.rows:
            self.rows, self.times = rows, []
            if self.trial is not None:
                self.trial = None
                self._use(self.chosen)
        elif self.trial is None:
            self.times = [*self.times[-7:], seconds]
            if len(self.times) >= 4 and time.monotonic() >= self.next_trial:
                self.trial = []
                torch.set_num_threads(self._other())
        else:
            self.trial.append(seconds)
            if len(self.trial) > self.TRIAL_STEPS:
                if statistics.median(self.trial[1:]) < 0.9 * statistics.median(self.times):
                    self.chosen, self.times = self._other(), []
                    log.info("engine thread now uses %d torch thread(s)", self.chosen)
                self.trial = None
                self._use(self.chosen)
