"""The stats segment's pure parts: indices, name tables, slots, histograms."""

from __future__ import annotations

import os
from types import SimpleNamespace as NS

import pytest

from forklb.http import next_upstream as nu
from forklb.http.proxy import UpstreamError
from forklb.metrics import collector
from forklb.metrics import segment as seg
from forklb.metrics.recorder import Recorder, attach, failure_reason


def test_status_index_exact_codes_then_classes():
    assert seg.CODES[seg.status_index(200)] == "200"
    assert seg.CODES[seg.status_index(502)] == "502"
    assert seg.CODES[seg.status_index(418)] == "4xx"
    assert seg.CODES[seg.status_index(599)] == "5xx"
    assert seg.CODES[seg.status_index(0)] == "499"  # no response at all
    assert all(seg.STATUS_TABLE[s] == seg.status_index(s) for s in range(600))


@pytest.mark.parametrize(("seconds", "bound"), [(0.0005, 0.001), (0.001, 0.001),
                                                (0.0011, 0.0025), (29.0, 30.0)])
def test_bucket_is_the_first_bound_not_exceeded(seconds, bound):
    assert seg.BUCKETS[seg.bucket(seconds)] == bound


def test_bucket_past_the_last_bound_is_the_overflow():
    assert seg.bucket(31.0) == seg.NB - 1


def test_names_only_grow_and_share_the_last_index_when_full():
    names = seg.Names(4)
    assert [names.add((k,)) for k in "abc"] == [0, 1, 2]
    assert names.add(("b",)) == 1
    assert names.add(("d",)) == 3 and names.names[3] == ("other",)
    assert names.add(("e",)) == 3
    assert names.get(("a",)) == 0 and names.get(("zzz",)) == 3


def test_slots_are_reused_and_keep_their_counters():
    stats = seg.StatsSegment(2)
    a = stats.acquire("worker", 1)
    b = stats.acquire("sidecar", 1)
    assert (a, b) == (0, 1) and stats.acquire("worker", 1) == -1
    stats.started(a, 1234)
    stats.ready(a)
    base = stats.slot_base(a)
    stats.values[base + seg.CONN_ACCEPTED] = 7
    stats.values[base + seg.GAUGE_BASE + seg.G_ACTIVE] = 3
    assert stats.rows()[0] == (0, "worker", 1, 1234, True)
    stats.release(a)
    assert stats.values[base + seg.GAUGE_BASE + seg.G_ACTIVE] == 0  # gauges zeroed
    assert stats.acquire("worker", 2) == a
    assert stats.values[base + seg.CONN_ACCEPTED] == 7  # counters go on
    assert collector.SlotSums(stats).total(seg.CONN_ACCEPTED) == 7


def test_segment_is_shared_with_a_forked_child():
    stats = seg.StatsSegment(2)
    stats.servers.add(("www",))
    slot = stats.acquire("worker", 1)
    server = NS(names=("www",), listens=())
    pid = os.fork()
    if pid == 0:  # the child counts; the parent reads
        attach(stats, slot)
        rec = Recorder([server], {}, {})
        ex = NS(server=server, conn=NS(listener=None), method_b=b"POST", status=503,
                start_time=0.0, header_bytes=10, content_length=5, bytes_sent=100)
        for _ in range(3):
            rec.request(ex)
        os._exit(0)
    os.waitpid(pid, 0)
    sums = collector.SlotSums(stats)
    base = seg.SRV_BASE
    i = seg.status_index(503) * len(seg.METHODS) + seg.METHODS.index("POST")
    assert sums.total(base + i) == 3
    assert sums.total(base + seg.SRV_IN) == 45 and sums.total(base + seg.SRV_OUT) == 300


def test_histogram_is_cumulative_and_quantile_interpolates():
    values = [0] * seg.HIST
    values[seg.bucket(0.003)] = 50  # (0.0025, 0.005]
    values[seg.bucket(0.7)] = 50  # (0.5, 1]
    values[seg.NB] = int((50 * 0.003 + 50 * 0.7) * 1e6)
    buckets, total, count = collector.histogram(values)
    assert buckets[-1] == ("+Inf", 100) and count == 100
    assert dict(buckets)["0.005"] == 50 and dict(buckets)["1.0"] == 100
    assert total == pytest.approx(35.15)
    assert collector.quantile(values, 0.5) == pytest.approx(0.005)
    assert 0.5 < collector.quantile(values, 0.99) <= 1.0
    assert collector.quantile([0] * seg.HIST, 0.5) is None


@pytest.mark.parametrize(("message", "kind", "reason"), [
    ("connect() failed (111: Connection refused) while connecting to upstream", nu.ERROR,
     "refused"),
    ("upstream timed out (110: Connection timed out) while connecting to upstream", nu.TIMEOUT,
     "timeout"),
    ("upstream prematurely closed connection while reading response header from upstream",
     nu.ERROR, "reset"),
    ("recv() failed (104: Connection reset by peer) while reading response header", nu.ERROR,
     "reset"),
    ("upstream sent invalid header (invalid constant string) while reading",
     nu.INVALID_HEADER, "invalid_header"),
    ("upstream sent no valid HTTP/1.0 header while reading", nu.INVALID_HEADER,
     "invalid_header"),
    ("something new", nu.ERROR, "other"),
])
def test_failure_reason_from_kind_and_nginx_error_text(message, kind, reason):
    error = UpstreamError(message, kind=kind)
    assert seg.FAILURE_REASONS[failure_reason(error)] == reason
