"""Processes the benchmark starts, and what it reads about them from /proc.

Every process is started in its own session with output to files in the run's temp dir,
and stopped by pid with its whole tree (``harness.kill_tree``). CPU time and memory come
from ``/proc/PID/stat`` and ``/proc/PID/status`` of every process of a proxy.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil
from harness import kill_tree, port_is_open

from bench import REPO_ROOT

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ /proc readings

def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    try:
        root = psutil.Process(pid)
        return [pid] + [p.pid for p in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _stat_seconds(path: str) -> float:
    """utime+stime from a /proc ``stat`` file, in seconds; 0 if it is gone."""
    try:
        # Field 2 (comm) may contain spaces: split after its closing parenthesis.
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pids: Sequence[int]) -> float:
    """Sum of utime+stime (all threads) of ``pids``, from /proc/PID/stat."""
    return sum(_stat_seconds(f"/proc/{pid}/stat") for pid in pids)


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime+stime of each thread of ``pid`` (from /proc/PID/task/TID/stat)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return {}
    return {tid: _stat_seconds(f"/proc/{pid}/task/{tid}/stat") for tid in tids}


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (``VmRSS``, ``VmHWM``); 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pids: Sequence[int]) -> int:
    """Sum of the resident set sizes of ``pids``, KiB."""
    return sum(status_kib(pid, "VmRSS") for pid in pids)


def reset_peak_rss(pids: Sequence[int]) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > clear_refs``, Linux >= 4.0)."""
    ok = True
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def peak_rss_kib(pids: Sequence[int]) -> int:
    """Largest VmHWM among ``pids``, KiB."""
    return max((status_kib(pid, "VmHWM") for pid in pids), default=0)


# ------------------------------------------------------------------ CPU placement

@contextlib.contextmanager
def affinity(cpus: set[int] | None) -> Iterator[None]:
    """Run the body with this process pinned to ``cpus`` (None: leave as is).

    Children started inside inherit the mask, including all their threads and forks,
    which is how a proxy is placed without using its own affinity directives.
    """
    if cpus is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


# ------------------------------------------------------------------ managed processes

class Managed:
    """A process started in its own session, output in ``workdir``; stopped with its tree."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def spawn(self, argv: Sequence[str], env: dict[str, str] | None = None,
              stdout_name: str = "stdout.log") -> None:
        with open(self.workdir / stdout_name, "ab") as out, \
                open(self.workdir / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen(list(argv), cwd=self.workdir, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         start_new_session=True)

    def wait_ports(self, ports: Sequence[int], timeout: float = 20.0) -> None:
        """Wait for ``ports`` to accept; raise with the process's stderr if it died."""
        deadline = time.monotonic() + timeout
        pending = list(ports)
        while pending:
            if self.proc is None or self.proc.poll() is not None:
                problem = "exited early"
            elif time.monotonic() > deadline:
                problem = f"127.0.0.1:{pending[0]} not accepting after {timeout:g}s"
            else:
                if port_is_open(pending[0]):
                    pending.pop(0)
                else:
                    time.sleep(0.05)
                continue
            err = (self.workdir / "stderr.log").read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {problem}\n{err}")

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc.pid, popen=self.proc)
            self.proc = None


def python_env() -> dict[str, str]:
    """Environment for Python children: this checkout first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def raise_nofile(limit: int) -> int:
    """Raise RLIMIT_NOFILE (soft and, as root, hard) towards ``limit``; returns the soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for new_hard in (max(hard, limit), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, new_hard), new_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
