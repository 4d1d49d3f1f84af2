"""The three proxies under test, and the backends, as started processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from bench import configs
from bench.procs import Managed, affinity, cpu_seconds, python_env, thread_cpu_seconds, tree_pids

NGINX = "/usr/sbin/nginx"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
PROXIES = ("forklb", "nginx", "haproxy")


class Proxy(Managed):
    """A proxy under test: its processes and which of them are workers."""

    def start(self, params: configs.ProxyParams, cpus: set[int] | None) -> Proxy:
        """Write the config, start with ``cpus`` as affinity, wait until it accepts."""
        argv = self.prepare(params)
        with affinity(cpus):
            self.spawn(argv, env=self.env(params), stdout_name=self.stdout_name(params))
        self.wait_ports([params.port])
        return self

    def prepare(self, params: configs.ProxyParams) -> list[str]:
        raise NotImplementedError

    def env(self, params: configs.ProxyParams) -> dict[str, str] | None:
        return None

    def stdout_name(self, params: configs.ProxyParams) -> str:
        return "stdout.log"

    def pids(self) -> list[int]:
        """Every process of the proxy (master and workers)."""
        return tree_pids(self.pid) if self.proc is not None else []

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the master's children."""
        return self.pids()[1:]

    def worker_cpu(self) -> dict[int, float]:
        """CPU seconds so far of each worker (process, or thread for HAProxy)."""
        return {pid: cpu_seconds([pid]) for pid in self.worker_pids()}


class ForkLBProxy(Proxy):
    python = sys.executable  # the interpreter that runs forklb (use_python)

    def prepare(self, params: configs.ProxyParams) -> list[str]:
        conf = self.workdir / "conf" / "forklb.conf"
        conf.parent.mkdir(exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        conf.write_text(configs.forklb_conf(params))
        return [self.python, "-m", "forklb", "-p", str(self.workdir), "-c", str(conf)]

    def env(self, params: configs.ProxyParams) -> dict[str, str]:
        env = python_env()
        if not params.metrics:
            env["FORKLB_METRICS"] = "off"  # the workers' recorder counts nothing
        return env


class NginxProxy(Proxy):
    def prepare(self, params: configs.ProxyParams) -> list[str]:
        conf = self.workdir / "nginx.conf"
        conf.write_text(configs.nginx_conf(params, str(self.workdir)))
        return [NGINX, "-p", str(self.workdir), "-c", str(conf)]


class HAProxyProxy(Proxy):
    def prepare(self, params: configs.ProxyParams) -> list[str]:
        conf = self.workdir / "haproxy.cfg"
        conf.write_text(configs.haproxy_conf(params))
        return [HAPROXY, "-db", "-f", str(conf)]

    def stdout_name(self, params: configs.ProxyParams) -> str:
        # "log stdout" writes the access log to stdout: send it to the scenario's file.
        return str(params.access_log) if params.access_log else "stdout.log"

    def worker_pids(self) -> list[int]:
        # One process whose threads are the workers.
        return self.pids()[:1]

    def worker_cpu(self) -> dict[int, float]:
        return thread_cpu_seconds(self.pid)


def make_proxy(name: str, workdir: Path) -> Proxy:
    """A not yet started proxy called ``name`` (one of :data:`PROXIES`)."""
    cls = {"forklb": ForkLBProxy, "nginx": NginxProxy, "haproxy": HAProxyProxy}[name]
    return cls(name, workdir)


def start_backends(workdir: Path, ports: tuple[int, int], nofile: int) -> Managed:
    """Debian nginx (2 workers) serving :data:`configs.FILES` on both ``ports``."""
    docroot = workdir / "html"
    docroot.mkdir(parents=True, exist_ok=True)
    for uri, size in configs.FILES.items():
        text = b"chaoge_www_121\n" if size == 15 else bytes(range(256)) * (size // 256)
        assert len(text) == size
        (docroot / uri.lstrip("/")).write_bytes(text)
    conf = workdir / "nginx.conf"
    conf.write_text(configs.backend_nginx(str(workdir), str(docroot), ports, nofile))
    backends = Managed("backends", workdir)
    backends.spawn([NGINX, "-p", str(workdir), "-c", str(conf)])
    backends.wait_ports(ports)
    return backends


def start_sink(workdir: Path, ports: tuple[int, int]) -> Managed:
    """The upload sink (:mod:`bench.sink`) listening on every port in ``ports``."""
    sink = Managed("sink", workdir)
    sink.spawn([sys.executable, "-m", "bench.sink", *map(str, ports)], env=python_env())
    sink.wait_ports(ports)
    return sink


def use_python(path: str) -> None:
    """Run forklb with the interpreter ``path``; exits when it cannot import forklb's
    dependencies (forklb itself comes from this checkout, on PYTHONPATH)."""
    check = "import gevent, httptools, configobj, psutil, prometheus_client, setproctitle"
    try:
        failed = subprocess.run([path, "-c", check], capture_output=True, text=True,
                                timeout=60).returncode
    except OSError as e:
        raise SystemExit(f"bench: --python {path}: {e.strerror}") from None
    if failed:
        raise SystemExit(f"bench: --python {path} lacks forklb's dependencies "
                         f"(pip install them into it: docs/PERFORMANCE.md)")
    ForkLBProxy.python = path


def _python_build(path: str) -> str:
    """Version and build of interpreter ``path``: PGO/LTO and a shared libpython make
    tens of percent of difference to forklb's CPU per request."""
    probe = ("import sys, sysconfig as s; a = s.get_config_var('CONFIG_ARGS') or ''; "
             "shared = 'libpython' in open('/proc/self/maps').read(); "
             "print(sys.version.split()[0], sys.executable, "
             "'libpython shared' if shared else 'libpython in the executable', "
             "'--enable-optimizations' if '--enable-optimizations' in a else '')")
    try:
        out = subprocess.run([path, "-c", probe], capture_output=True, text=True, timeout=60)
    except OSError as e:
        return f"unavailable ({e.strerror})"
    return out.stdout.strip()


def versions() -> dict[str, str]:
    """Versions of the programs involved, for results.json."""
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError as e:
            return f"unavailable ({e.strerror})"
        lines = (out.stdout + out.stderr).strip().splitlines()
        return lines[0] if lines else ""

    return {
        "nginx": first_line([NGINX, "-v"]),
        "haproxy": first_line([HAPROXY, "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "python": sys.version.split()[0],
        "forklb_python": _python_build(ForkLBProxy.python),
    }
