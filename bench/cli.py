"""``python -m bench``: start everything, run the scenarios A B C A B C, report.

For every selected scenario the three proxies are started with that scenario's config,
warmed up, then measured in turn for each round (forklb, nginx, haproxy, forklb, ...), so
slow drifts of the machine's load hit all of them alike; the median of the rounds is kept.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from harness import free_port

from bench import REPO_ROOT, configs, load, report
from bench.procs import Managed, raise_nofile
from bench.proxies import (
    PROXIES,
    Proxy,
    make_proxy,
    start_backends,
    start_sink,
    use_python,
    versions,
)
from bench.scenarios import (
    BY_NAME,
    SCENARIOS,
    Scenario,
    Settings,
    Variant,
    measure,
    variants,
    warm_up,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round of 3 s, 1 s warm-up")
    ap.add_argument("--scenario", action="append", default=[],
                    help="scenario(s) to run, comma-separated or repeated (default: all)")
    ap.add_argument("--proxy", action="append", default=[],
                    help=f"proxies to run, comma-separated or repeated (default: "
                         f"{','.join(PROXIES)})")
    ap.add_argument("--duration", type=float, help="seconds per wrk run (default 10; quick 3)")
    ap.add_argument("--rounds", type=int, help="rounds, median kept (default 3; quick 1)")
    ap.add_argument("--warmup", type=float, help="seconds of warm-up per proxy (default 2)")
    ap.add_argument("--upload-mib", type=int, default=1024, help="upload size (default 1024)")
    ap.add_argument("--idle-conns", type=int, default=10000,
                    help="idle connections in idle-10k (default 10000)")
    ap.add_argument("--pin", choices=("auto", "none"), default="auto",
                    help="auto: load generators on the first CPU, a 1-worker proxy on the "
                         "second, a 2-worker proxy on all (default); none: no pinning")
    ap.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results.json",
                    help="where to write the JSON results (default bench/results.json)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temp dir (configs, logs) even when every proxy ran")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter that runs forklb (default: this one); it needs "
                         "forklb's dependencies, see docs/PERFORMANCE.md")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args(argv)
    use_python(args.python)
    args.scenarios = _names(args.scenario, [s.name for s in SCENARIOS], "scenario")
    args.proxies = _names(args.proxy, list(PROXIES), "proxy")
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    return args


def _names(given: list[str], known: list[str], what: str) -> list[str]:
    names = [n for item in given for n in item.split(",") if n] or known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"bench: unknown {what} {unknown[0]!r} (known: {', '.join(known)})")
    return [n for n in known if n in names]  # canonical order


class Placement:
    """Which CPUs the load generators and the proxies run on."""

    def __init__(self, mode: str) -> None:
        self.all = sorted(os.sched_getaffinity(0))
        self.enabled = mode == "auto" and len(self.all) >= 2
        self.load = {self.all[0]} if self.enabled else None

    def proxy(self, workers: int) -> set[int] | None:
        """1 worker: a CPU of its own; more: every CPU (shared with the load generator)."""
        if not self.enabled:
            return None
        return {self.all[1]} if workers == 1 else set(self.all)

    def describe(self) -> str:
        if not self.enabled:
            return "no pinning"
        return (f"load generators (wrk, curl, idle client) on CPU {self.all[0]}; 1-worker "
                f"proxies on CPU {self.all[1]}; multi-worker proxies and backends on CPUs "
                f"{','.join(map(str, self.all))}")


def main(argv: list[str] | None = None) -> int:
    cli_args = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(cli_args)
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:22} {s.description}")
        return 0
    for tool in ("wrk", "curl"):
        load.require(tool)
    if "haproxy" in args.proxies:
        load.require("haproxy")
    nofile = raise_nofile(configs.NOFILE)
    placement = Placement(args.pin)
    tmp = Path(tempfile.mkdtemp(prefix="forklb-bench-"))
    results: dict[str, Any] = {"meta": _meta(args, placement, cli_args), "scenarios": {}}
    started: list[Managed] = []
    failed = False
    try:
        backend_ports = (free_port(), free_port())
        started.append(start_backends(tmp / "backends", backend_ports, nofile))
        sink_ports = (free_port(), free_port())
        scenarios = [BY_NAME[n] for n in args.scenarios]
        upload = None
        if any(s.kind == "upload" for s in scenarios):
            started.append(start_sink(tmp / "sink", sink_ports))
            upload = load.make_upload_file(tmp / "upload.bin", args.upload_mib << 20)
        if placement.load is not None:
            os.sched_setaffinity(0, placement.load)  # wrk and curl inherit it
        settings = Settings(args.duration, args.warmup, upload, args.idle_conns, tmp, nofile)
        print(f"bench: {len(scenarios)} scenario(s) x {len(args.proxies)} proxies x "
              f"{args.rounds} round(s); {placement.describe()}; files in {tmp}", flush=True)
        for scenario in scenarios:
            entry = run_scenario(scenario, args, settings, placement, backend_ports,
                                 sink_ports, tmp)
            results["scenarios"][scenario.name] = entry
            failed |= any("error" in p for p in entry["proxies"].values())
            print(report.table(scenario.name, scenario.description, entry["proxies"],
                               entry["ratio_forklb_nginx"]) + "\n", flush=True)
            report.write_json(args.output, results)
        results["derived"] = report.derived(results["scenarios"])
        if results["derived"]:
            print("derived:", results["derived"])
    except BaseException:
        failed = True
        raise
    finally:
        for proc in reversed(started):
            proc.stop()
        results["meta"]["loadavg_end"] = os.getloadavg()
        report.write_json(args.output, results)
        if failed or args.keep:
            print(f"bench: configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"bench: results in {args.output}")
    return 1 if failed else 0


def run_scenario(scenario: Scenario, args: argparse.Namespace, settings: Settings,
                 placement: Placement, backends: tuple[int, int], sinks: tuple[int, int],
                 tmp: Path) -> dict[str, Any]:
    """Start the proxies for ``scenario``, measure them round-robin, stop them."""
    workdir = tmp / scenario.name
    by_proxy: dict[str, dict[str, Any]] = {}
    live: list[tuple[Variant, Proxy, configs.ProxyParams]] = []

    def start(v: Variant, proxy: Proxy, params: configs.ProxyParams) -> bool:
        try:
            proxy.start(params, placement.proxy(v.workers))
            warm_up(scenario, proxy, params.port, settings)
            return True
        except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
            proxy.stop()
            by_proxy[v.key] = {"error": f"{type(e).__name__}: {e}"}
            return False

    try:
        for v in variants(scenario, args.proxies):
            pdir = workdir / v.key.replace(" ", "-")
            params = configs.ProxyParams(
                port=free_port(), backends=backends, sinks=sinks, workers=v.workers,
                nofile=settings.nofile,
                access_log=str(pdir / "access.log") if v.access_log else None,
                metrics=v.metrics)
            proxy = make_proxy(v.proxy, pdir)
            if start(v, proxy, params):
                by_proxy[v.key] = {"runs": []}
                live.append((v, proxy, params))
        for round_no in range(args.rounds):
            for v, proxy, params in live:
                if "error" in by_proxy[v.key]:
                    continue
                if round_no and scenario.fresh_each_round:
                    proxy.stop()
                    if not start(v, proxy, params):
                        continue
                try:
                    by_proxy[v.key]["runs"].append(measure(scenario, proxy, params.port,
                                                           settings))
                except Exception as e:  # noqa: BLE001
                    by_proxy[v.key] = {"error": f"{type(e).__name__}: {e}",
                                       "traceback": traceback.format_exc()}
    finally:
        for _, proxy, _ in live:
            proxy.stop()
    for data in by_proxy.values():
        if "runs" in data:
            data["median"] = report.medians(data["runs"])
    return {
        "description": scenario.description,
        "params": {"path": scenario.path, "connections": scenario.connections,
                   "headers": list(scenario.headers), "workers": scenario.workers,
                   "access_log": scenario.access_log, "kind": scenario.kind,
                   "baseline": list(scenario.baseline) if scenario.baseline else None},
        "proxies": by_proxy,
        "ratio_forklb_nginx": report.ratios(by_proxy),
    }


def _meta(args: argparse.Namespace, placement: Placement, cli_args: list[str]) -> dict[str, Any]:
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {
        "command": shlex.join(["python", "-m", "bench", *cli_args]),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "forklb_commit": commit,
        "cpus": len(placement.all),
        "kernel": os.uname().release,
        "loadavg_start": os.getloadavg(),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "upload_mib": args.upload_mib,
        "idle_conns": args.idle_conns,
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "placement": placement.describe(),
        "weights": list(configs.WEIGHTS),
        "versions": versions(),
    }

