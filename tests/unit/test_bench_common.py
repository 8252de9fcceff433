"""The benchmark suite's own arithmetic and timing helpers (``benchmarks/common.py``), the
load generator's request framing and the targets' ratio text: what ``make bench`` prints is
only as good as these."""

from __future__ import annotations

import math

import pytest

from benchmarks import common
from benchmarks.common import Spread, interleaved_rates, percentile, ratio_spread
from benchmarks.loadgen import _header_value, _request
from benchmarks.run import ratio_text


def test_spread_median_and_range() -> None:
    spread = Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (spread.median, spread.low, spread.high) == (2.5, 1.0, 10.0)
    assert spread.fmt() == "         2/s [1-10]"
    assert Spread.of([1234.5]).fmt("", 1) == "   1,234.5 [1,234.5-1,234.5]"


def test_spread_needs_a_measurement() -> None:
    with pytest.raises(ValueError):
        Spread.of([])


def test_ratio_spread_pairs_runs_and_skips_empty_baselines() -> None:
    ratios = ratio_spread([10.0, 30.0, 8.0], [20.0, 30.0, 0.0])
    assert ratios.values == (0.5, 1.0)
    with pytest.raises(ValueError):
        ratio_spread([1.0], [1.0, 2.0])


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile(values, 0.0) == 1.0
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))


def test_interleaved_rates_count_every_candidate() -> None:
    calls = [0, 0]

    def cheap() -> None:
        calls[0] += 1

    def dear() -> None:
        calls[1] += 1
        sum(range(2000))

    rates = interleaved_rates([cheap, dear], 0.05, slice_seconds=0.005)
    assert len(rates) == 2
    assert all(r.wall > 0 and r.cpu > 0 for r in rates)
    assert rates[0].wall > rates[1].wall  # the cheap call is the faster one
    assert calls[0] > calls[1] > 5  # both ran past their warm-up


def test_wait_until_quiet_returns_at_the_first_quiet_window(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # (busy, total) jiffies: windows 50% busy, 30% busy, then 5% busy.
    readings = iter([(0, 0), (50, 100), (50, 100), (80, 200), (80, 200), (85, 300)])
    monkeypatch.setattr(common, "_cpu_ticks", lambda: next(readings))
    monkeypatch.setattr(common.time, "sleep", lambda _s: None)
    busy, waited = common.wait_until_quiet(below=0.10, window=0.1, limit=5.0)
    assert busy == 0.5
    assert 0.0 <= waited < 5.0
    assert next(readings, None) is None  # stopped after the quiet window, not before


def test_wait_until_quiet_gives_up_at_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "_cpu_ticks", iter([(0, 100), (100, 200)] * 1000).__next__)
    busy, waited = common.wait_until_quiet(below=0.10, window=0.01, limit=0.05)
    assert busy == 1.0
    assert waited >= 0.05


def test_cpu_ticks_reads_this_machine() -> None:
    busy, total = common._cpu_ticks()
    assert 0 < busy <= total


def test_request_framing_and_header_lookup() -> None:
    body = b'{"token":"t","amount":1999,"currency":"USD"}'
    request = _request(8443, body)
    head, _, sent = request.partition(b"\r\n\r\n")
    assert sent == body
    assert head.startswith(b"POST /v1/payments HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n")
    assert _header_value(head.lower() + b"\r\n", b"\r\ncontent-length:") == b"%d" % len(body)
    assert _header_value(b"http/1.1 201\r\nx-bench-pid: 42\r\n", b"\r\nx-bench-pid:") == b"42"
    assert _header_value(b"http/1.1 201\r\n", b"\r\nx-bench-pid:") is None


def test_ratio_text_shows_enough_digits_to_explain_the_verdict() -> None:
    assert ratio_text(0.7412, 0.5) == "0.74x"
    assert ratio_text(0.498, 0.5) == "0.498x"  # "0.50x" next to MISS would read as a pass
    assert ratio_text(1.503, 1.5) == "1.503x"
    assert ratio_text(0.5, 0.5) == "0.50x"
    assert ratio_text(0.66661, 1 / 1.5) == "0.6666x"
