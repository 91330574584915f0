"""The patience scope a worker sets around every request (tvixmount/store/grpc/deadline.py)."""

from __future__ import annotations

import time

import pytest

from tvixmount.store.grpc.deadline import PATIENCE_SHARE, call_within, patience_until, request_deadline


def test_call_within_sets_the_scope_for_the_call_only() -> None:
    outside = patience_until(1000.0)
    deadline = time.monotonic() + 10.0
    seen = call_within(deadline, patience_until, 1000.0)
    assert seen == pytest.approx(time.monotonic() + 10.0 * PATIENCE_SHARE, abs=0.5)
    assert patience_until(1000.0) == pytest.approx(outside, abs=0.5)  # no scope again: the default wait


def test_call_within_is_request_deadline_in_one_call() -> None:
    deadline = time.monotonic() + 4.0
    with request_deadline(deadline):
        by_class = patience_until(0.0)
    assert call_within(deadline, patience_until, 0.0) == pytest.approx(by_class, abs=0.05)


def test_call_within_restores_the_outer_scope_also_when_the_call_raises() -> None:
    def fails() -> None:
        raise ValueError("boom")

    with request_deadline(time.monotonic() + 100.0):
        outer = patience_until(0.0)
        with pytest.raises(ValueError, match="boom"):
            call_within(time.monotonic() + 1.0, fails)
        assert patience_until(0.0) == outer
        inner = call_within(time.monotonic() + 1.0, patience_until, 0.0)
        assert inner < outer  # the inner scope counted inside, the outer one again after


def test_a_passed_deadline_gives_no_patience() -> None:
    assert call_within(time.monotonic() - 5.0, patience_until, 1000.0) <= time.monotonic()
