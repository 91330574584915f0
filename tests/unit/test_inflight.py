"""SingleFlight: concurrent callers of one key share one fetch, its result or its error."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tvixmount.inflight import SingleFlight


def test_concurrent_callers_share_one_fetch():
    flight = SingleFlight()
    calls = []
    release = threading.Event()

    def fetch():
        calls.append(1)
        release.wait(5)
        return b"answer"

    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(flight.run, "k", fetch) for _ in range(20)]
        time.sleep(0.1)
        release.set()
        assert [f.result(5) for f in futures] == [b"answer"] * 20
    assert len(calls) == 1


def test_an_error_reaches_every_waiter_and_the_next_call_runs_again():
    flight = SingleFlight()
    release = threading.Event()
    runs = []

    def broken():
        runs.append(1)
        release.wait(5)
        raise OSError("store down")

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(flight.run, "k", broken) for _ in range(5)]
        time.sleep(0.1)
        release.set()
        for f in futures:
            with pytest.raises(OSError, match="store down"):
                f.result(5)
    assert flight.run("k", lambda: 7) == 7  # nothing of the failed flight is left behind
    assert len(runs) == 1


def test_different_keys_do_not_wait_for_each_other():
    flight = SingleFlight()
    slow_started, release = threading.Event(), threading.Event()

    def slow():
        slow_started.set()
        release.wait(5)
        return "slow"

    with ThreadPoolExecutor(2) as pool:
        slow_future = pool.submit(flight.run, "a", slow)
        assert slow_started.wait(5)
        assert flight.run("b", lambda: "fast") == "fast"
        release.set()
        assert slow_future.result(5) == "slow"


def test_an_unshared_run_gives_the_result_to_its_leader_only_and_an_error_to_all():
    flight = SingleFlight()
    release = threading.Event()
    results = [b"first", OSError("store down")]

    def fetch():
        release.wait(5)
        outcome = results.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    for expected in (b"first", None):
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(flight.run, "k", fetch, share=False)]
            time.sleep(0.1)  # the first leads
            futures += [pool.submit(flight.run, "k", fetch, share=False) for _ in range(3)]
            time.sleep(0.1)
            release.set()
            if expected is None:
                for f in futures:
                    with pytest.raises(OSError, match="store down"):
                        f.result(5)
            else:
                assert [f.result(5) for f in futures] == [expected, None, None, None]
        release.clear()
    assert results == []  # one fetch per flight
