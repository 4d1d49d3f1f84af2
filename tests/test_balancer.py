"""Unit tests of forklb.upstream.balancer: nginx's smooth weighted round robin.

Time is passed explicitly; nothing sleeps.
"""

from __future__ import annotations

from collections import Counter

import pytest

from forklb.upstream.balancer import Peer, SmoothWeightedRoundRobin, swrr_schedule

A, B, C = 0, 1, 2


def picks(rr: SmoothWeightedRoundRobin, n: int, now: float = 1000.0, tried: int = 0) -> list:
    return [rr.pick(now, tried) for _ in range(n)]


# -- the schedule ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ([5, 1, 1], (A, A, B, A, C, A, A)),
        ([3, 2], (A, B, A, B, A)),
        ([1, 1], (A, B)),
        ([1, 1, 1], (A, B, C)),
        ([2, 2, 2], (A, B, C, A, B, C)),
        ([1, 2], (B, A, B)),
        ([1], (A,)),
        ([4], (A, A, A, A)),
    ],
)
def test_schedule(weights: list[int], expected: tuple[int, ...]) -> None:
    assert swrr_schedule(weights) == expected


@pytest.mark.parametrize("weights", [[5, 1, 1], [3, 2], [7, 3, 1, 4], [1, 1, 1, 1, 10], [2]])
def test_schedule_length_and_counts_follow_weights(weights: list[int]) -> None:
    schedule = swrr_schedule(weights)
    assert len(schedule) == sum(weights)
    assert Counter(schedule) == {i: w for i, w in enumerate(weights)}


@pytest.mark.parametrize("weights", [[5, 1, 1], [3, 2], [1, 1], [7, 3, 1, 4], [1]])
def test_schedule_equals_the_sequence_of_picks(weights: list[int]) -> None:
    rr = SmoothWeightedRoundRobin(weights)
    assert tuple(picks(rr, sum(weights))) == swrr_schedule(weights)


@pytest.mark.parametrize("weights", [[5, 1, 1], [3, 2], [2, 3, 4]])
def test_picks_repeat_with_the_period(weights: list[int]) -> None:
    rr = SmoothWeightedRoundRobin(weights)
    assert tuple(picks(rr, 3 * sum(weights))) == swrr_schedule(weights) * 3


def test_smooth_interleaves_light_peers() -> None:
    # Plain weighted round robin would give a a a a a b c.
    schedule = "".join("abc"[i] for i in swrr_schedule([5, 1, 1]))
    assert "aaa" not in schedule


def test_ties_go_to_the_first_listed_peer() -> None:
    rr = SmoothWeightedRoundRobin([1, 1, 1])
    assert rr.pick(0.0) == A


def test_schedule_does_not_depend_on_time() -> None:
    rr = SmoothWeightedRoundRobin([5, 1, 1])
    assert tuple(rr.pick(float(t)) for t in range(0, 700, 100)) == swrr_schedule([5, 1, 1])


def test_schedule_state_returns_to_zero_after_a_period() -> None:
    rr = SmoothWeightedRoundRobin([5, 1, 1])
    picks(rr, 7)
    assert [p.current for p in rr.peers] == [0, 0, 0]


def test_empty_upstream_is_rejected() -> None:
    with pytest.raises(ValueError):
        SmoothWeightedRoundRobin([])


def test_peer_effective_weight_starts_at_weight() -> None:
    assert Peer(7).effective == 7


# -- tried bitmask ----------------------------------------------------------------


def test_tried_peer_is_skipped() -> None:
    rr = SmoothWeightedRoundRobin([1, 1, 1])
    assert set(picks(rr, 6, tried=1 << A)) == {B, C}


@pytest.mark.parametrize(("tried", "only"), [(0b110, A), (0b101, B), (0b011, C)])
def test_only_untried_peer_is_picked(tried: int, only: int) -> None:
    rr = SmoothWeightedRoundRobin([5, 1, 1])
    assert picks(rr, 5, tried=tried) == [only] * 5


def test_all_tried_gives_none() -> None:
    rr = SmoothWeightedRoundRobin([1, 2, 3])
    assert rr.pick(0.0, 0b111) is None


def test_tried_bits_beyond_the_peers_are_ignored() -> None:
    rr = SmoothWeightedRoundRobin([1, 1])
    assert rr.pick(0.0, 0b1100) == A


def test_tried_peer_gains_no_current_weight() -> None:
    rr = SmoothWeightedRoundRobin([1, 1])
    picks(rr, 3, tried=1 << A)
    assert rr.peers[A].current == 0


def test_retry_after_first_choice_takes_the_next_best() -> None:
    rr = SmoothWeightedRoundRobin([5, 1, 1])
    first = rr.pick(0.0)
    second = rr.pick(0.0, 1 << first)
    assert (first, second) == (A, B)


# -- single peer --------------------------------------------------------------------


def test_single_peer_is_always_picked() -> None:
    rr = SmoothWeightedRoundRobin([3])
    assert picks(rr, 4) == [A] * 4


def test_single_peer_tried_gives_none() -> None:
    assert SmoothWeightedRoundRobin([1]).pick(0.0, 1) is None


def test_single_peer_is_never_marked_failed() -> None:
    rr = SmoothWeightedRoundRobin([1], max_fails=1, fail_timeout=10)
    for t in range(5):
        rr.failed(A, 100.0 + t)
    assert rr.pick(101.0) == A
    assert rr.peers[A].fails == 0
    assert rr.peers[A].effective == 1
    assert not rr.degraded(101.0)


# -- failures: max_fails / fail_timeout ----------------------------------------------


def test_failed_peer_is_skipped_for_fail_timeout() -> None:
    rr = SmoothWeightedRoundRobin([1, 1], max_fails=1, fail_timeout=10)
    rr.failed(A, 100.0)
    assert [rr.pick(100.0 + t) for t in range(11)] == [B] * 11  # up to and including 110


def test_failed_peer_gets_exactly_one_probe_after_fail_timeout() -> None:
    rr = SmoothWeightedRoundRobin([1, 1], max_fails=1, fail_timeout=10)
    rr.failed(A, 100.0)
    after = [rr.pick(111.0) for _ in range(6)]
    assert after.count(A) == 1
    assert after[after.index(A) + 1:] == [B] * (5 - after.index(A))


def test_successful_probe_brings_the_peer_back() -> None:
    rr = SmoothWeightedRoundRobin([1, 1], max_fails=1, fail_timeout=10)
    rr.failed(A, 100.0)
    while rr.pick(111.0) != A:
        pass
    rr.succeeded(A, 111.5)
    assert rr.peers[A].fails == 0
    assert A in picks(rr, 4, now=112.0)


def test_failed_probe_disables_the_peer_again() -> None:
    rr = SmoothWeightedRoundRobin([1, 1], max_fails=1, fail_timeout=10)
    rr.failed(A, 100.0)
    while rr.pick(111.0) != A:
        pass
    rr.failed(A, 112.0)
    assert rr.peers[A].fails == 2
    assert [rr.pick(t) for t in (113.0, 120.0, 122.0)] == [B, B, B]
    assert A in [rr.pick(122.5) for _ in range(3)]


def test_success_without_a_probe_does_not_clear_failures() -> None:
    rr = SmoothWeightedRoundRobin([1, 1], max_fails=3, fail_timeout=10)
    rr.failed(A, 100.0)
    rr.succeeded(A, 101.0)  # checked == accessed: no probe since the failure
    assert rr.peers[A].fails == 1


def test_success_after_fail_timeout_pick_clears_failures() -> None:
    rr = SmoothWeightedRoundRobin([1, 1], max_fails=3, fail_timeout=10)
    rr.failed(A, 100.0)
    assert A in [rr.pick(111.0) for _ in range(2)]  # this pick refreshes "checked"
    rr.succeeded(A, 111.0)
    assert rr.peers[A].fails == 0


def test_peer_stays_eligible_below_max_fails() -> None:
    rr = SmoothWeightedRoundRobin([1, 1], max_fails=2, fail_timeout=10)
    rr.failed(A, 100.0)
    assert A in picks(rr, 4, now=101.0)


def test_peer_is_excluded_at_max_fails() -> None:
    rr = SmoothWeightedRoundRobin([1, 1], max_fails=2, fail_timeout=10)
    rr.failed(A, 100.0)
    rr.failed(A, 101.0)
    assert picks(rr, 4, now=102.0) == [B] * 4


def test_max_fails_zero_never_excludes() -> None:
    rr = SmoothWeightedRoundRobin([1, 1], max_fails=0, fail_timeout=10)
    for _ in range(5):
        rr.failed(A, 100.0)
    assert rr.peers[A].effective == 1
    assert A in picks(rr, 2, now=100.0)


def test_all_peers_failed_gives_none() -> None:
    rr = SmoothWeightedRoundRobin([1, 1], max_fails=1, fail_timeout=10)
    rr.failed(A, 100.0)
    rr.failed(B, 100.0)
    assert rr.pick(105.0) is None


def test_failed_and_tried_peers_together_give_none() -> None:
    rr = SmoothWeightedRoundRobin([1, 1, 1], max_fails=1, fail_timeout=10)
    rr.failed(A, 100.0)
    assert rr.pick(101.0, tried=(1 << B) | (1 << C)) is None


def test_failure_records_accessed_and_checked() -> None:
    rr = SmoothWeightedRoundRobin([1, 1], max_fails=1, fail_timeout=10)
    rr.failed(B, 42.0)
    peer = rr.peers[B]
    assert (peer.fails, peer.accessed, peer.checked) == (1, 42.0, 42.0)


# -- effective weight -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "max_fails", "failures", "effective"),
    [
        (4, 2, 1, 2),  # drops by weight // max_fails
        (5, 2, 1, 3),
        (5, 2, 3, 0),  # never below zero (5 - 2 - 2 - 2)
        (3, 1, 1, 0),
        (1, 2, 1, 1),  # 1 // 2 == 0: no drop
        (10, 3, 2, 4),
    ],
)
def test_failure_lowers_effective_weight(
    weight: int, max_fails: int, failures: int, effective: int
) -> None:
    rr = SmoothWeightedRoundRobin([weight, 1], max_fails=max_fails, fail_timeout=10)
    for _ in range(failures):
        rr.failed(A, 100.0)
    assert rr.peers[A].effective == effective
    assert rr.peers[A].weight == weight


def test_effective_weight_recovers_by_one_per_pass() -> None:
    rr = SmoothWeightedRoundRobin([4, 1], max_fails=2, fail_timeout=10)
    rr.failed(A, 100.0)
    seen = []
    for _ in range(4):
        rr.pick(101.0)
        seen.append(rr.peers[A].effective)
    assert seen == [3, 4, 4, 4]


def test_excluded_peer_does_not_recover_weight() -> None:
    rr = SmoothWeightedRoundRobin([2, 2], max_fails=1, fail_timeout=10)
    rr.failed(A, 100.0)
    picks(rr, 5, now=105.0)
    assert rr.peers[A].effective == 0
    assert rr.pick(111.0) == B  # A takes part again, from effective weight 0
    assert rr.peers[A].effective == 1


def test_lowered_weight_shifts_traffic_until_recovered() -> None:
    rr = SmoothWeightedRoundRobin([5, 5], max_fails=5, fail_timeout=10)
    for _ in range(4):
        rr.failed(A, 100.0)  # 5 - 4*1 = 1, still below max_fails
    first = picks(rr, 4, now=101.0)
    assert first.count(B) > first.count(A)
    picks(rr, 10, now=101.0)
    assert rr.peers[A].effective == 5


# -- degraded -------------------------------------------------------------------------


def test_not_degraded_without_failures() -> None:
    rr = SmoothWeightedRoundRobin([1, 1])
    assert not rr.degraded(1.0)


@pytest.mark.parametrize("now", [0.0, -1.0])
def test_not_degraded_before_any_failure_even_at_time_zero(now: float) -> None:
    assert not SmoothWeightedRoundRobin([1, 1]).degraded(now)


def test_degraded_until_fail_timeout_passes() -> None:
    rr = SmoothWeightedRoundRobin([1, 1], max_fails=1, fail_timeout=10)
    rr.failed(A, 100.0)
    assert [rr.degraded(t) for t in (100.0, 105.0, 110.0, 110.5)] == [True, True, True, False]


def test_degraded_window_extends_with_later_failures() -> None:
    rr = SmoothWeightedRoundRobin([1, 1], max_fails=1, fail_timeout=10)
    rr.failed(A, 100.0)
    rr.failed(B, 105.0)
    rr.failed(A, 90.0)  # an older report does not shorten the window
    assert rr.degraded(114.0) and not rr.degraded(115.5)
