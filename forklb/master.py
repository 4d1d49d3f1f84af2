"""The master process: binds, forks, supervises, reloads.

Modelled on gunicorn's arbiter.  One class, one loop, no threads and no gevent
(children fork from a process that never had a hub):

* Signal handlers do nothing themselves.  ``signal.set_wakeup_fd`` makes the
  interpreter write each signal number to a pipe that the loop's selector
  watches; the loop then handles the signal as ordinary code.
* Every child has a role from :data:`ROLES` (``worker``, ``sidecar``) and a
  status pipe on which it writes ``R`` once it serves.  The selector wakes on
  those bytes too.
* Children also hold the read end of the *life pipe*, whose only write end is
  the master's: when the master dies, they see EOF and exit.
* ``waitpid(-1, WNOHANG)`` reaps; a child of the current generation that dies
  unexpectedly is replaced at once (with back-off if it keeps dying young); a
  child that dies before it ever became ready during start-up is fatal.

Reload (HUP) parses the new configuration first; if it is bad the error is
logged and nothing changes.  Otherwise new addresses are bound, a new
generation of workers is started, and only once all of them report ready are
the previous generation's workers sent QUIT.  At most two generations live at
once (a HUP during a change waits for it).  Addresses no longer configured are
closed when no worker of an older generation is left.

USR2 execs a new master that inherits the listening sockets; WINCH stops the
workers only; a worker whose heartbeat (scoreboard) goes silent is killed.

``listen ... reuseport`` (nginx's ``ngx_clone_listening``): the master binds one
SO_REUSEPORT socket per worker *slot* and the worker in slot N serves only
socket N.  The sockets belong to the master, keyed by (address, slot), so a
worker respawned into slot N, or the next generation's worker N, takes the
same socket and the connections queued on it are served, not lost.  Slot 0's
socket is the address's entry in ``Master.sockets``; slots 1.. are in
``Master.clones``.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from forklb import systemd
from forklb.config import ConfigError
from forklb.log import ErrorLog
from forklb.metrics.segment import StatsSegment
from forklb.model import Config, Listen
from forklb.pidfile import remove_pid, write_pid
from forklb.scoreboard import Scoreboard
from forklb.upstream.shared import SharedUpstreamState

HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT,
                   signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD, signal.SIGWINCH)
FAST_STOP_GRACE = 5.0  # seconds children get after TERM before SIGKILL
BOOT_BACKOFF_MAX = 5.0
YOUNG = 1.0  # a child that dies younger than this counts towards back-off
TICK = 0.5
PENDING_BOOT_TIMEOUT = 30.0  # a reload's workers must all be ready within this
FORK_RETRY = 1.0  # after a failed fork() of a running generation's child


class StartupError(Exception):
    """Start-up failed; the message is printed as ``forklb: [emerg] ...``."""


@dataclass(frozen=True)
class Role:
    """A kind of child process the master keeps running."""

    name: str
    count: Callable[[Config], int]
    listens: Callable[[Config], tuple[Listen, ...]]  # the listening sockets it serves
    heartbeat: bool  # writes its scoreboard slot; killed when it goes silent
    # Runs in the forked child and never returns:
    # (master, generation, slot, status_fd, its listening sockets by address)
    target: Callable[[Master, Generation, int, int, dict], None]


def usable_cpus() -> int:
    """CPUs this process may run on (affinity-aware, unlike os.cpu_count())."""
    try:
        return max(1, len(psutil.Process().cpu_affinity()))
    except (AttributeError, psutil.Error):
        return max(1, psutil.cpu_count() or 1)


def worker_count(config: Config) -> int:
    return config.main.worker_processes or usable_cpus()


def _run_worker(master: Master, gen: Generation, slot: int, status_fd: int,
                sockets: dict) -> None:
    from forklb import worker  # imported only in the child: the master stays gevent-free
    from forklb.metrics.recorder import attach

    attach(master.stats, master.stats.child_slot)
    worker.run(gen.config, sockets, gen.shared, gen.scoreboard, slot, gen.number,
               master.life_r, status_fd, master.pid)


def _run_sidecar(master: Master, gen: Generation, slot: int, status_fd: int,
                 sockets: dict) -> None:
    from forklb.metrics.recorder import attach
    from forklb.sidecar import process  # gevent again: only in the child

    attach(master.stats, master.stats.child_slot)
    process.MASTER = master  # the stats segment and reload_config, for /metrics and /-/reload
    process.run(gen.config, sockets, gen.shared, master.life_r, status_fd, master.pid)


ROLES: tuple[Role, ...] = (
    Role("worker", worker_count, Config.listen_addresses, True, _run_worker),
    Role("sidecar", lambda config: 1 if config.needs_sidecar else 0, Config.sidecar_addresses,
         False, _run_sidecar),
)


@dataclass
class Child:
    pid: int
    role: Role
    slot: int
    generation: int
    status_fd: int
    started: float
    scoreboard: Scoreboard
    ready: bool = False
    stopping: bool = False  # we asked it to stop; its death is expected
    kill_at: float | None = None  # SIGKILL deadline once asked to stop
    stats_slot: int = -1  # its region of the stats segment (forklb.metrics)
    stuck: bool = False  # killed by the heartbeat check


@dataclass
class Generation:
    """Workers started from one configuration, with the shared memory they use."""

    number: int
    config: Config
    shared: SharedUpstreamState = field(init=False)
    scoreboard: Scoreboard = field(init=False)
    deaths: dict[tuple[str, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Created before any of the generation's workers forks, so all map them;
        # they outlive worker respawns and are replaced by a reload.
        self.shared = SharedUpstreamState(self.config.http.upstreams, worker_count(self.config))
        self.scoreboard = Scoreboard(worker_count(self.config))


class Master:
    def __init__(self, config: Config, reload_config: Callable[[], Config],
                 log: ErrorLog | None = None):
        self.config = config
        self.reload_config = reload_config
        self.log = log or ErrorLog(config.main.error_log, config.main.error_log_level)
        self.pid = os.getpid()
        self.children: dict[int, Child] = {}
        self.sockets: dict[tuple[str, int], socket.socket] = {}
        # reuseport: the sockets of worker slots 1.. (slot 0 uses self.sockets)
        self.clones: dict[tuple[tuple[str, int], int], socket.socket] = {}
        self.generation = Generation(1, config)
        self.generations_started = 1
        self.pending: Generation | None = None  # a reload waiting for its workers to be ready
        self.pending_deadline = 0.0
        self.reload_queued = False  # HUP while a generation starts or drains: later
        self.booting = True  # until the first generation is all ready
        self.stopping: str | None = None  # "graceful" or "fast"
        self.stop_deadline = 0.0
        self.respawn_due: dict[tuple[str, int], float] = {}
        self.selector = selectors.DefaultSelector()
        self.life_r = self.life_w = -1
        self.wake_r = self.wake_w = -1
        self.pid_path = config.main.pid  # becomes PATH.oldbin during a binary upgrade
        self.new_master: int | None = None  # pid of the exec'ed binary during USR2
        self.workers_stopped = False  # after WINCH: no workers until HUP
        # Counters for the whole master life (forklb.metrics.segment); two generations
        # of workers and sidecars can live at once, plus respawns in between.
        self.stats = StatsSegment(max(16, 4 * (worker_count(config) + 1)))
        self.stats.register(config)
        self.stats.loaded(time.time())

    # -- start-up --
    def bind(self) -> None:
        """Bind every configured address (before forking: errors are fatal here).

        Sockets handed over by a previous master (USR2) or by systemd are used
        for the addresses they are bound to (a reuseport address's per-slot
        sockets too, in the order they were handed over); the rest are bound here.
        """
        inherited: dict[tuple[str, int], list[socket.socket]] = {}
        for fd in systemd.inherited_fds():
            sock = socket.socket(fileno=fd)
            inherited.setdefault(sock.getsockname()[:2], []).append(sock)
        for listen in self.config.bound_addresses():
            self.sockets[listen.address] = self._take(listen, inherited)
        for key in sorted(_clone_keys(self.config)):
            listen = self._listen_of(self.config, key[0])
            self.clones[key] = self._take(listen, inherited)
        for address, socks in inherited.items():
            for sock in socks:
                self.log.notice(f"closing inherited socket {address[0]}:{address[1]}: "
                                "not in config")
                sock.close()

    def _take(self, listen: Listen,
              inherited: dict[tuple[str, int], list[socket.socket]]) -> socket.socket:
        """An inherited socket for ``listen``'s address if one is left, else a new one."""
        socks = inherited.get(listen.address)
        if not socks:
            return self._bind(listen)
        sock = socks.pop(0)
        sock.setblocking(False)
        sock.set_inheritable(True)
        if listen.reuseport:  # it may come from a configuration without reuseport
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock

    @staticmethod
    def _listen_of(config: Config, address: tuple[str, int]) -> Listen:
        return next(lst for lst in config.listen_addresses() if lst.address == address)

    def _bind(self, listen: Listen) -> socket.socket:
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if listen.reuseport:  # before bind(): the kernel groups the slots' sockets
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(listen.address)
            sock.listen(listen.backlog)
        except OSError as e:
            sock.close()
            host = f"[{listen.host}]" if family == socket.AF_INET6 else listen.host
            hint = ""
            if e.errno == errno.EACCES and listen.port < 1024:
                hint = "; ports below 1024 need root (or CAP_NET_BIND_SERVICE)"
            raise StartupError(f"bind() to {host}:{listen.port} failed "
                               f"({e.errno}: {e.strerror}){hint}") from None
        # Non-blocking is essential: a blocking shared listener hangs the worker
        # that loses the accept race.  Inheritable for a future binary upgrade.
        sock.setblocking(False)
        sock.set_inheritable(True)
        return sock

    def _keep_only(self, listens: tuple[Listen, ...],
                   slot: int = 0) -> dict[tuple[str, int], socket.socket]:
        """In a child: close the listening sockets it does not serve, return the rest.

        A child must not hold other addresses: a reload that drops an address
        closes it only once no process holds it.  On a reuseport address the
        child keeps only its slot's socket: another slot's socket held here would
        outlive that slot's worker and take connections nobody accepts.
        """
        wanted = {}
        for lst in listens:
            if lst.reuseport and slot:
                wanted[lst.address] = self.clones[(lst.address, slot)]
            else:
                wanted[lst.address] = self.sockets[lst.address]
        kept = {id(sock) for sock in wanted.values()}
        for sock in self._all_sockets():
            if id(sock) not in kept:
                sock.close()
        return wanted

    def _all_sockets(self) -> list[socket.socket]:
        """Every listening socket, slot 0 / shared ones first, then per slot."""
        return [*self.sockets.values(), *(self.clones[key] for key in sorted(self.clones))]

    def run(self) -> int:
        """The master loop; returns the exit status."""
        self._setup()
        try:
            write_pid(self.pid_path)
        except OSError as e:
            sys.stderr.write(f'forklb: [emerg] open() "{self.pid_path}" failed '
                             f"({e.errno}: {e.strerror})\n")
            self._cleanup()
            return 1
        self.log.notice(f"forklb master process started, {self._describe()}")
        if self.config.main.user and os.geteuid() != 0:
            self.log.warn('the "user" directive makes sense only if the master process runs '
                          "with super-user privileges, ignored")
        self._spawn_generation(self.generation)
        try:
            while True:
                self._wait()
                self._reap()
                if self.stopping and not self.children:
                    break
                self._tick()
        except StartupError as e:
            self.log.emerg(str(e))
            self._stop_children(signal.SIGTERM)
            self._wait_children(FAST_STOP_GRACE)
            sys.stderr.write(f"forklb: [emerg] {e}\n")
            return 1
        finally:
            self._cleanup()
        self.log.notice("exit")
        return 0

    def _describe(self) -> str:
        reuseport = self.config.reuseport_addresses()
        listens = ", ".join(f"{h}:{p}" + (" (reuseport)" if (h, p) in reuseport else "")
                            for h, p in self.sockets)
        return f"{worker_count(self.config)} workers, listening on {listens or 'nothing'}"

    def _setup(self) -> None:
        self.life_r, self.life_w = os.pipe()
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _noop_handler)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "signals")
        try:
            import setproctitle

            setproctitle.setproctitle("forklb: master process " + " ".join(sys.argv))
        except ImportError:
            pass

    def _cleanup(self) -> None:
        signal.set_wakeup_fd(-1)
        for sock in self._all_sockets():
            sock.close()
        self.sockets.clear()
        self.clones.clear()
        remove_pid(self.pid_path)

    # -- the loop --
    def _wait(self) -> None:
        timeout = TICK
        if self.respawn_due:
            timeout = max(0.0, min(timeout, min(self.respawn_due.values()) - time.monotonic()))
        for key, _ in self.selector.select(timeout):
            if key.data == "signals":
                self._read_signals()
            else:
                self._read_status(key.fd, key.data)

    def _read_signals(self) -> None:
        try:
            data = os.read(self.wake_r, 64)
        except BlockingIOError:
            return
        for signum in data:
            self._handle_signal(signum)

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # reaping follows every wake-up
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop("fast")
        elif signum == signal.SIGQUIT:
            self.stop("graceful")
        elif signum == signal.SIGHUP:
            self.reload()
        elif signum == signal.SIGUSR1:
            self.log.notice("reopening logs")
            self.log.reopen()
            self._signal_all(signal.SIGUSR1)
        elif signum == signal.SIGUSR2:
            self.upgrade()
        elif signum == signal.SIGWINCH:
            self.stop_workers()

    def _read_status(self, fd: int, child: Child) -> None:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(fd)
            return
        if b"R" in data and not child.ready:
            child.ready = True
            self.stats.ready(child.stats_slot)
            self._on_ready(child)

    def _tick(self) -> None:
        now = time.monotonic()
        if self.pending is not None and now > self.pending_deadline:
            self.log.emerg(f"generation {self.pending.number} not ready after "
                           f"{PENDING_BOOT_TIMEOUT:g}s; keeping the running configuration")
            self._abandon_pending()
        if self.reload_queued and self.pending is None and not self._draining():
            self.reload()
        for key, due in list(self.respawn_due.items()):
            if now >= due and not self.stopping:
                del self.respawn_due[key]
                role_name, slot = key
                role = next(r for r in ROLES if r.name == role_name)
                self._spawn_or_retry(role, slot)
        timeout = self.config.main.worker_timeout
        for child in list(self.children.values()):
            if child.kill_at is not None and now >= child.kill_at:
                self.log.warn(f"{child.role.name} process {child.pid} did not exit, killing it")
                self._kill(child.pid, signal.SIGKILL)
                child.kill_at = None
            elif timeout and child.role.heartbeat and not child.stopping:
                silent = child.scoreboard.silence(child.slot, now)
                # A starting worker beats only once it serves: give it longer.
                if silent > (timeout if child.ready else max(timeout, PENDING_BOOT_TIMEOUT)):
                    self.log.alert(f"{child.role.name} process {child.pid} is stuck (event loop "
                                   f"silent for {silent:.1f}s), killing it")
                    self._kill(child.pid, signal.SIGKILL)
                    child.stuck = True

    # -- children --
    def _spawn_generation(self, gen: Generation) -> bool:
        """Fork ``gen``'s children.  A failed fork of the running generation's is
        tried again later; a reload's stops at the first: False."""
        for role in ROLES:
            for slot in range(role.count(gen.config)):
                if gen is self.generation:
                    self._spawn_or_retry(role, slot)
                elif not self._spawn(role, slot, gen):
                    return False
        return True

    def _spawn(self, role: Role, slot: int, gen: Generation) -> bool:
        """Fork one child; False if the fork failed (logged, as nginx does)."""
        gen.scoreboard.beat(slot)  # a fresh child starts with a fresh heartbeat
        status_r, status_w = os.pipe()
        self.stats.child_slot = self.stats.acquire(role.name, gen.number)
        try:
            pid = os.fork()
        except OSError as e:  # EAGAIN (a process limit), ENOMEM
            os.close(status_r)
            os.close(status_w)
            self.stats.release(self.stats.child_slot)
            self.log.alert(f'fork() failed while spawning "{role.name} process" '
                           f"({e.errno}: {e.strerror})")
            return False
        if pid == 0:  # child
            try:
                os.close(status_r)
                self._close_in_child()
                role.target(self, gen, slot, status_w,
                            self._keep_only(role.listens(gen.config), slot))
            finally:
                os._exit(1)
        os.close(status_w)
        child = Child(pid, role, slot, gen.number, status_r, time.monotonic(), gen.scoreboard,
                      stats_slot=self.stats.child_slot)
        self.stats.started(child.stats_slot, pid)
        self.children[pid] = child
        self.selector.register(status_r, selectors.EVENT_READ, child)
        return True

    def _spawn_or_retry(self, role: Role, slot: int) -> None:
        """Fork a child of the running generation; when the fork fails, try again
        FORK_RETRY later (nginx leaves the slot empty until a reload)."""
        if not self._spawn(role, slot, self.generation):
            self.respawn_due[(role.name, slot)] = time.monotonic() + FORK_RETRY

    def _close_in_child(self) -> None:
        """Drop the master's private descriptors so they die with the master."""
        signal.set_wakeup_fd(-1)
        for fd in (self.life_w, self.wake_r, self.wake_w, self.selector.fileno()):
            _close_quietly(fd)
        for child in self.children.values():
            _close_quietly(child.status_fd)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.new_master:
                self._on_new_master_exit(status)
                continue
            child = self.children.pop(pid, None)
            if child is None:
                continue
            try:
                self.selector.unregister(child.status_fd)
            except (KeyError, ValueError):
                pass
            _close_quietly(child.status_fd)
            self.stats.release(child.stats_slot)
            self._on_exit(child, status)

    def _on_exit(self, child: Child, status: int) -> None:
        how = _describe_status(status)
        if child.stopping or self.stopping or self.workers_stopped:
            self.log.notice(f"{child.role.name} process {child.pid} exited {how}")
            self._close_unused_sockets()
            return
        self.log.alert(f"{child.role.name} process {child.pid} exited {how}")
        gen = self._generation_of(child)
        if gen is None:
            self._close_unused_sockets()
            return
        if gen is self.pending:
            self.log.emerg("new workers failed to start; keeping the running configuration")
            self._abandon_pending()
            return
        if not child.ready and self.booting and os.WIFEXITED(status):
            # It failed by itself before serving (a killed one is simply replaced).
            raise StartupError(f"{child.role.name} process exited on start-up ({how}), "
                               f"see {self.config.main.error_log}")
        self.stats.restarted(child.role.name, "stuck" if child.stuck else
                             "killed" if os.WIFSIGNALED(status) else "exited")
        key = (child.role.name, child.slot)
        young = time.monotonic() - child.started < YOUNG
        deaths = gen.deaths.get(key, 0) + 1 if young else 0
        gen.deaths[key] = deaths
        delay = 0.0 if deaths <= 1 else min(BOOT_BACKOFF_MAX, 0.1 * 2 ** (deaths - 1))
        self.respawn_due[key] = time.monotonic() + delay

    def _generation_of(self, child: Child) -> Generation | None:
        if child.generation == self.generation.number:
            return self.generation
        if self.pending and child.generation == self.pending.number:
            return self.pending
        return None

    def _on_ready(self, child: Child) -> None:
        if self.booting and all(c.ready for c in self.children.values()
                                if c.generation == self.generation.number):
            self.booting = False
            self.log.notice("all workers ready")
            systemd.notify(f"READY=1\nMAINPID={self.pid}\nSTATUS=serving")
        if self.pending and all(c.ready for c in self.children.values()
                                if c.generation == self.pending.number):
            self._promote_pending()

    def _stop_child(self, child: Child, sig: int, grace: float) -> None:
        child.stopping = True
        child.kill_at = time.monotonic() + grace
        self._kill(child.pid, sig)

    def _stop_children(self, sig: int, grace: float = FAST_STOP_GRACE,
                       generations: set[int] | None = None) -> None:
        for child in list(self.children.values()):
            if generations is None or child.generation in generations:
                self._stop_child(child, sig, grace)

    def _signal_all(self, sig: int) -> None:
        for pid in list(self.children):
            self._kill(pid, sig)

    def _kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _wait_children(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.children and time.monotonic() < deadline:
            time.sleep(0.05)
            self._reap()
        for pid in list(self.children):
            self._kill(pid, signal.SIGKILL)
        while self.children:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.pop(pid, None)

    # -- stop and reload --
    def stop(self, how: str) -> None:
        if self.stopping == "fast" or self.stopping == how:
            return
        self.stopping = how
        self.respawn_due.clear()
        self.log.notice(f"{'fast' if how == 'fast' else 'graceful'} shutdown")
        systemd.notify("STOPPING=1")
        if how == "fast":
            self._stop_children(signal.SIGTERM, FAST_STOP_GRACE)
        else:
            grace = self.config.main.worker_shutdown_timeout + FAST_STOP_GRACE
            self._stop_children(signal.SIGQUIT, grace)
        # Workers close their copies as they stop; closing ours too makes new
        # connections fail at once instead of waiting in a backlog nobody serves.
        for sock in self._all_sockets():
            sock.close()
        self.sockets.clear()
        self.clones.clear()

    def reload(self) -> None:
        """HUP.  At most two generations of workers live at once: while one is
        starting or an old one is still draining, the reload waits (several
        HUPs meanwhile make one reload, of the newest file)."""
        if self.stopping:
            return
        if self.workers_stopped:
            # nginx: HUP after WINCH starts workers again, without re-reading the config.
            self.log.notice("signal HUP received, starting workers again")
            self.workers_stopped = False
            self._start_generation(self.generation.config)
            return
        if self.pending is not None or self._draining():
            if not self.reload_queued:
                self.log.notice("signal HUP received; reloading once the previous "
                                "generation change is over")
            self.reload_queued = True
            return
        self.reload_queued = False
        self.log.notice("signal HUP received, reconfiguring")
        try:
            config = self.reload_config()
        except ConfigError as e:
            self.log.emerg(str(e))
            self.log.notice("reload failed, the running configuration is kept")
            self.stats.reloaded(False, time.time())
            return
        added: list[tuple[str, int]] = []
        added_clones: list[tuple[tuple[str, int], int]] = []
        made_reusable: list[socket.socket] = []
        try:
            for listen in config.bound_addresses():
                sock = self.sockets.get(listen.address)
                if sock is None:
                    self.sockets[listen.address] = self._bind(listen)
                    added.append(listen.address)
                elif listen.reuseport and not sock.getsockopt(socket.SOL_SOCKET,
                                                               socket.SO_REUSEPORT):
                    # nginx's add_reuseport: the address's socket becomes slot 0's,
                    # and must allow the other slots' sockets to bind beside it.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    made_reusable.append(sock)
            for key in sorted(_clone_keys(config) - self.clones.keys()):
                self.clones[key] = self._bind(self._listen_of(config, key[0]))
                added_clones.append(key)
        except StartupError as e:
            for address in added:
                self.sockets.pop(address).close()
            for key in added_clones:
                self.clones.pop(key).close()
            for sock in made_reusable:  # no other process may bind beside it after all
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
            self.log.emerg(f"{e}; the running configuration is kept")
            self.stats.reloaded(False, time.time())
            return
        self._start_generation(config)

    def _draining(self) -> bool:
        return any(c.generation < self.generation.number for c in self.children.values())

    def _start_generation(self, config: Config) -> None:
        """Start workers for ``config``; they replace the current ones once all are ready."""
        if self.pending is not None:
            self._abandon_pending()
        self.generations_started += 1
        self.stats.register(config)  # before the fork: the new children see the new names
        self.pending = Generation(self.generations_started, config)
        self.pending_deadline = time.monotonic() + PENDING_BOOT_TIMEOUT
        self.log.notice(f"starting generation {self.pending.number}")
        if not self._spawn_generation(self.pending):
            self.log.emerg("new workers failed to start; keeping the running configuration")
            self._abandon_pending()

    def _abandon_pending(self) -> None:
        gen = self.pending
        self.pending = None
        if gen is None:
            return
        self.stats.reloaded(False, time.time())
        self._stop_children(signal.SIGTERM, FAST_STOP_GRACE, {gen.number})
        self._close_unused_sockets()

    def _promote_pending(self) -> None:
        new = self.pending
        assert new is not None
        old_numbers = {c.generation for c in self.children.values()
                       if c.generation != new.number}
        self.pending = None
        self.generation = new
        self.config = new.config
        self.stats.reloaded(True, time.time())
        self.respawn_due.clear()
        self.log.notice(f"generation {new.number} ready, retiring generation(s) "
                        f"{sorted(old_numbers) or '-'}")
        grace = new.config.main.worker_shutdown_timeout + FAST_STOP_GRACE
        self._stop_children(signal.SIGQUIT, grace, old_numbers)
        self._close_unused_sockets()

    def stop_workers(self) -> None:
        """WINCH: stop the workers gracefully, keep the master and its sockets.

        Used with a binary upgrade: the old master stays ready to take over
        again (HUP) should the new binary misbehave.
        """
        if self.stopping:
            return
        self.log.notice("signal WINCH received, stopping workers gracefully")
        self.workers_stopped = True
        self.respawn_due.clear()
        if self.pending is not None:
            self._abandon_pending()
        grace = self.config.main.worker_shutdown_timeout + FAST_STOP_GRACE
        self._stop_children(signal.SIGQUIT, grace)

    def upgrade(self) -> None:
        """USR2: start a new master from the current binary with our listening sockets.

        The pid file becomes ``PATH.oldbin`` so that the new master can write
        its own; if the new master exits, the name is restored and this master
        goes on as before.  The operator then sends QUIT (or WINCH) here.
        """
        if self.new_master is not None or self.stopping:
            self.log.notice("USR2 ignored: an upgrade is already running")
            return
        oldbin = self.config.main.pid + ".oldbin"
        try:
            os.rename(self.pid_path, oldbin)
        except OSError as e:
            self.log.alert(f'rename() "{self.pid_path}" to "{oldbin}" failed ({e}), '
                           "upgrade cancelled")
            return
        self.pid_path = oldbin
        env = dict(os.environ)
        # Per-slot sockets too, slot 0 first: the new master takes them in this order.
        env[systemd.INHERIT_ENV] = ";".join(str(s.fileno()) for s in self._all_sockets())
        argv = [sys.executable, *sys.orig_argv[1:]]
        try:
            pid = os.fork()
        except OSError as e:
            self.log.alert(f"fork() failed while spawning the new binary process "
                           f"({e.errno}: {e.strerror}), upgrade cancelled")
            self._restore_pid_file()
            return
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.new_master = pid
        self.log.notice(f"started new binary process {pid}: {' '.join(argv)}")

    def _on_new_master_exit(self, status: int) -> None:
        self.log.alert(f"new binary process {self.new_master} exited "
                       f"{_describe_status(status)}; this master keeps serving")
        self.new_master = None
        self._restore_pid_file()

    def _restore_pid_file(self) -> None:
        """The upgrade is over without a new master: the ".oldbin" pid file goes back."""
        try:
            os.rename(self.pid_path, self.config.main.pid)
            self.pid_path = self.config.main.pid
        except OSError as e:
            self.log.alert(f'rename() "{self.pid_path}" back failed ({e})')

    def _close_unused_sockets(self) -> None:
        """Close addresses that no live configuration of any child uses."""
        wanted = {lst.address for lst in self.generation.config.bound_addresses()}
        if self.pending:
            wanted |= {lst.address for lst in self.pending.config.bound_addresses()}
        self._close_unused_clones()
        if any(c.generation < self.generation.number for c in self.children.values()):
            return  # older workers may still be draining on them
        for address in list(self.sockets):
            if address not in wanted:
                self.sockets.pop(address).close()
                self.log.notice(f"closed listening socket {address[0]}:{address[1]}")

    def _close_unused_clones(self) -> None:
        """Drop the per-slot sockets that neither the current nor the starting
        generation has a worker slot for (fewer workers, reuseport removed).

        Done as soon as the older generation is retired, not when its workers
        have exited: a retired worker stops accepting at QUIT, so a socket still
        open here would only collect connections that are reset when it closes
        (the kernel drops a closed socket's queue, as with nginx).  The retired
        worker's own copy keeps the socket alive until it stops accepting.
        """
        wanted = _clone_keys(self.generation.config)
        if self.pending:
            wanted |= _clone_keys(self.pending.config)
        for key in sorted(self.clones.keys() - wanted):
            self.clones.pop(key).close()
            (host, port), slot = key
            self.log.notice(f"closed listening socket {host}:{port} of worker slot {slot}")


def _clone_keys(config: Config) -> set[tuple[tuple[str, int], int]]:
    """(address, slot) of every per-slot socket ``config`` needs beyond slot 0's."""
    return {(address, slot) for address in config.reuseport_addresses()
            for slot in range(1, worker_count(config))}


def _noop_handler(signum, frame) -> None:
    """Signals are read from the wake-up pipe; the handler must exist but does nothing."""


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"on signal {sig} ({name})"
    return f"with code {os.WEXITSTATUS(status)}"
