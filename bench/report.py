"""Medians over rounds, forklb/nginx ratios, the printed table and results.json."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

#: Metrics kept as medians, with their table headings and formats.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("rps", "req/s", "{:>9.0f}"),
    ("p50_ms", "p50 ms", "{:>8.2f}"),
    ("p99_ms", "p99 ms", "{:>8.2f}"),
    ("errors", "errors", "{:>7.0f}"),
    ("cpu_us_per_req", "CPU µs/req", "{:>10.1f}"),
    ("peak_rss_kib_per_worker", "RSS/worker MiB", "{:>14.1f}"),
    ("busiest_worker_share", "busiest", "{:>7.2f}"),
    ("gbps", "GB/s", "{:>6.2f}"),
    ("rss_per_conn_kib", "RSS/conn KiB", "{:>12.2f}"),
)
NAME_WIDTH = 18  # "haproxy 2 workers"
#: Metrics for which forklb/nginx is reported.
RATIO_KEYS = ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "peak_rss_kib_per_worker", "gbps",
              "rss_per_conn_kib")


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric metric over the rounds (None where no round has it)."""
    out: dict[str, Any] = {}
    for key in sorted({k for r in runs for k in r}):
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        out[key] = statistics.median(values) if values else None
    return out


def ratios(by_proxy: dict[str, dict[str, Any]], num: str = "forklb",
           den: str = "nginx") -> dict[str, float | None]:
    """``num``/``den`` of the median metrics, when both proxies ran."""
    a = by_proxy.get(num, {}).get("median")
    b = by_proxy.get(den, {}).get("median")
    if not a or not b:
        return {}
    out: dict[str, float | None] = {}
    for key in RATIO_KEYS:
        x, y = a.get(key), b.get(key)
        if x is not None and y:
            out[key] = round(x / y, 3)
    return out


def derived(scenarios: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """What the access log (and forklb's metrics) cost, and what 2 workers bring over 1.

    Each comes from one scenario, whose rows were measured in the same rounds: the
    access-log rows against their "log off" twins, the metrics rows against "metrics off",
    the 1-worker rows against "2 workers".
    """
    out: dict[str, dict[str, float]] = {}

    def rps(scenario: str, key: str) -> float | None:
        m = scenarios.get(scenario, {}).get("proxies", {}).get(key, {}).get("median") or {}
        return m.get("rps")

    for proxy in ("forklb", "nginx", "haproxy"):
        figures = {}
        on, off = rps("access-log", proxy), rps("access-log", f"{proxy} log off")
        if on and off:
            figures["access_log_cost"] = round(1 - on / off, 3)
        on, off = rps("metrics", proxy), rps("metrics", f"{proxy} metrics off")
        if on and off:
            figures["metrics_cost"] = round(1 - on / off, 3)
        on, off = rps("metrics-log", proxy), rps("metrics-log", f"{proxy} metrics+log off")
        if on and off:
            figures["metrics_and_log_cost"] = round(1 - on / off, 3)
        one, two = rps("workers-1", proxy), rps("workers-1", f"{proxy} 2 workers")
        if one and two:
            figures["workers_2_over_1"] = round(two / one, 3)
        if figures:
            out[proxy] = figures
    return out


def _cell(key: str, fmt: str, value: Any) -> str:
    width = len(fmt.format(0)) if "f" in fmt else 8
    if value is None:
        return " " * (width - 1) + "-"
    if key == "peak_rss_kib_per_worker":
        value = value / 1024
    return fmt.format(value)


def table(name: str, description: str, by_proxy: dict[str, dict[str, Any]],
          ratio: dict[str, float | None]) -> str:
    """The printed table of one scenario: one row per proxy, then forklb/nginx."""
    cols = [c for c in COLUMNS
            if any((p.get("median") or {}).get(c[0]) is not None for p in by_proxy.values())]
    head = f"{'proxy':<{NAME_WIDTH}}" + " ".join(f"{h:>{len(f.format(0))}}" for _, h, f in cols)
    lines = [f"== {name}: {description}", head]
    for proxy, data in by_proxy.items():
        if "error" in data:
            lines.append(f"{proxy:<{NAME_WIDTH}}FAILED: {data['error'].splitlines()[0]}")
            continue
        m = data["median"]
        lines.append(f"{proxy:<{NAME_WIDTH}}" + " ".join(_cell(k, f, m.get(k)) for k, _, f in cols))
    if ratio:
        cells = []
        for key, _, fmt in cols:
            width = len(fmt.format(0))
            r = ratio.get(key)
            cells.append(f"{r:>{width}.2f}" if r is not None else " " * (width - 1) + "-")
        lines.append(f"{'forklb/nginx':<{NAME_WIDTH}}" + " ".join(cells))
    return "\n".join(lines)


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` (atomically: a partial run never leaves a broken file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
