"""How long a batch waits for company (raypipe.batching.BatchWait): only while requests overlap."""

from __future__ import annotations

from raypipe.batching import BatchWait


def test_requests_one_at_a_time_never_wait_and_overlapping_ones_do():
    bw = BatchWait(0.005)
    for _ in range(20):  # a lone client: each request is answered before the next arrives
        assert bw.arrive() == 0.0
        bw.leave()
    waits = [bw.arrive() for _ in range(8)]  # 8 clients at once
    assert waits[:2] == [0.0, 0.0]  # a burst from quiet: its first requests run at once ...
    assert waits[-1] == 0.005 and waits.count(0.005) >= 5  # ... the rest wait for company
    for _ in range(8):
        bw.leave()
    assert bw.snapshot() == {"batch_wait_s": 0.005, "arrivals_waited": waits.count(0.005),
                             "arrivals_alone": 20 + waits.count(0.0), "load": bw.snapshot()["load"]}


def test_a_lone_client_after_a_busy_spell_stops_waiting_within_a_few_requests():
    bw = BatchWait(0.005)
    for _ in range(32):  # busy: 32 in flight
        bw.arrive()
    for _ in range(32):
        bw.leave()
    lone = []
    for _ in range(30):
        lone.append(bw.arrive())
        bw.leave()
    assert lone[0] == 0.005  # still counted as busy right after the spell
    first_alone = lone.index(0.0)
    assert first_alone <= 15 and set(lone[first_alone:]) == {0.0}


def test_a_zero_wait_is_never_raised():
    bw = BatchWait(0.0)
    assert {bw.arrive() for _ in range(10)} == {0.0}
