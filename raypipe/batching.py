"""How long a batch waits for company: the wait only pays when company comes.

A batcher (Serve's ``@serve.batch`` for ``/predict``, :class:`raypipe.generation.GenerationEngine`
for the chat routes) holds the first request of a batch up to ``serve.batch_wait_timeout_s`` for
others to join it. Under load that buys bigger batches; for a lone client it is pure latency —
the whole timeout on every request, for company that never comes (BENCHMARKS.md section 4: 5 of
the 12.6 ms Serve added at one client).

:class:`BatchWait` decides per request, from how many requests overlap on this replica: it keeps
a moving average of the requests in flight at each arrival (the arrival included), and a request
waits for company only when that average says requests overlap (>= ``overlap``, 1.5 by default);
requests that come one at a time run at once. A burst after a quiet spell is batched from its
second or third request on, and a lone request after a busy spell waits at most a few times.

Single-threaded by design: every call happens on the replica's event loop.
"""

from __future__ import annotations


class BatchWait:
    """``arrive()`` when a request enters the batcher (returns the wait to use for it),
    ``leave()`` when it is answered; ``snapshot()`` for ``/stats``."""

    def __init__(self, wait_s: float, *, alpha: float = 0.25, overlap: float = 1.5):
        self.wait_s = float(wait_s)
        self.alpha = alpha
        self.overlap = overlap
        self.in_flight = 0
        self.load = 1.0  # moving average of requests in flight at arrival
        self.alone = 0  # arrivals that ran without waiting
        self.waited = 0  # arrivals that waited for company

    def arrive(self) -> float:
        self.in_flight += 1
        self.load += self.alpha * (self.in_flight - self.load)
        if self.wait_s > 0 and self.load >= self.overlap:
            self.waited += 1
            return self.wait_s
        self.alone += 1
        return 0.0

    def leave(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def snapshot(self) -> dict[str, float | int]:
        return {"batch_wait_s": self.wait_s, "arrivals_waited": self.waited, "arrivals_alone": self.alone,
                "load": round(self.load, 3)}
