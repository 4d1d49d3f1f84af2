"""``forklb`` command line, modelled on nginx's.

    forklb [-c FILE] [-p PREFIX] [-g DIRECTIVES] [-t | -T | -s SIGNAL | -v | -V]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from forklb import __version__
from forklb.config import ConfigError, load
from forklb.model import Config
from forklb.pidfile import PidFileError, live_master, read_pid

SIGNALS = {
    "stop": signal.SIGTERM,
    "quit": signal.SIGQUIT,
    "reload": signal.SIGHUP,
    "reopen": signal.SIGUSR1,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="forklb",
        description="forklb: a pre-fork gevent HTTP load balancer configured like nginx.",
    )
    p.add_argument("-c", dest="conf", metavar="FILE",
                   help="configuration file (default: conf/forklb.conf under the prefix, "
                        "then /etc/forklb/forklb.conf)")
    p.add_argument("-p", dest="prefix", metavar="PREFIX",
                   help="prefix path for relative paths in the config (default: current "
                        "directory)")
    p.add_argument("-g", dest="directives", metavar="DIRECTIVES",
                   help='global directives, e.g. "worker_processes 2;"')
    p.add_argument("-t", dest="test", action="store_true",
                   help="test the configuration and exit")
    p.add_argument("-T", dest="dump", action="store_true",
                   help="test the configuration, dump it and exit")
    p.add_argument("-q", dest="quiet", action="store_true",
                   help="suppress non-error messages during configuration testing")
    p.add_argument("-s", dest="signal", choices=sorted(SIGNALS),
                   help="send a signal to the master process: stop, quit, reopen, reload")
    p.add_argument("-v", dest="version", action="store_true", help="show version and exit")
    p.add_argument("command", nargs="*", metavar="upstream ...",
                   help="runtime API through the sidecar: 'upstream list', 'upstream drain|up|"
                        "down NAME ADDR', 'upstream set-weight NAME ADDR N'")
    p.add_argument("-V", dest="full_version", action="store_true",
                   help="show version and build information and exit")
    return p


def _err(level: str, message: str) -> None:
    sys.stderr.write(f"forklb: [{level}] {message}\n")


def _default_conf(prefix: str) -> str:
    local = os.path.join("conf", "forklb.conf")
    if os.path.exists(os.path.join(prefix, local)):
        return local
    return "/etc/forklb/forklb.conf"


def _shown(path: str) -> str:
    """A path as the user would like to read it: relative to the cwd when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version or args.full_version:
        sys.stderr.write(f"forklb version: forklb/{__version__}\n")
        if args.full_version:
            import configobj
            import httptools
            import psutil

            sys.stderr.write(
                f"built with Python {sys.version.split()[0]}; httptools {httptools.__version__}, "
                f"psutil {psutil.__version__}, configobj {configobj.__version__}\n"
            )
        return 0
    prefix = os.path.abspath(args.prefix or os.getcwd())
    conf = args.conf or _default_conf(prefix)
    conf_full = conf if os.path.isabs(conf) else os.path.join(prefix, conf)
    shown = conf if args.conf else _shown(conf_full)

    def reload_config() -> Config:
        return load(conf if args.conf else conf_full, prefix, args.directives)

    try:
        config = reload_config()
    except ConfigError as e:
        _err("emerg", str(e))
        if args.test or args.dump:
            sys.stderr.write(f"forklb: configuration file {shown} test failed\n")
        return 1

    if args.test or args.dump:
        if not args.quiet:
            sys.stderr.write(f"forklb: the configuration file {shown} syntax is ok\n")
            sys.stderr.write(f"forklb: configuration file {shown} test is successful\n")
        if args.dump:
            for path in config.files:
                sys.stdout.write(f"# configuration file {path}:\n")
                with open(path, encoding="utf-8") as f:
                    sys.stdout.write(f.read())
                sys.stdout.write("\n")
        return 0

    if args.signal:
        return send_signal(config, args.signal)
    if args.command:
        from forklb.admin import run_command

        return run_command(config, args.command)
    return serve(config, reload_config)


def send_signal(config: Config, name: str) -> int:
    pid_path = config.main.pid
    try:
        pid = read_pid(pid_path)
    except PidFileError as e:
        _err("error", str(e))
        return 1
    if pid is None:
        _err("error", f"forklb is not running (no pid file {_shown(pid_path)})")
        return 1
    if live_master(pid_path) is None and _exists(pid):
        _err("error", f"pid {pid} in {_shown(pid_path)} is not a forklb master; "
                      "nothing sent")
        return 1
    try:
        os.kill(pid, SIGNALS[name])
    except ProcessLookupError:
        _err("error", f"forklb is not running (pid {pid} in {_shown(pid_path)} does not exist)")
        return 1
    except PermissionError as e:
        _err("alert", f"kill({pid}, {SIGNALS[name].name}) failed ({e.errno}: {e.strerror})")
        return 1
    return 0


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(config: Config, reload_config) -> int:
    from forklb.master import Master, StartupError
    from forklb.systemd import INHERIT_ENV

    running = live_master(config.main.pid)
    if running is not None:
        _err("emerg", f"forklb is already running (pid {running}, pid file "
                      f"{_shown(config.main.pid)})")
        return 1
    # A master exec'ed by USR2 is already where it should be: never detach it
    # again (its parent, the old master, would take the exit for a failure).
    upgrading = INHERIT_ENV in os.environ
    try:
        master = Master(config, reload_config)
        master.bind()
    except StartupError as e:
        _err("emerg", str(e))
        return 1
    except OSError as e:
        _err("emerg", f'open() "{e.filename}" failed ({e.errno}: {e.strerror})'
             if e.filename else str(e))
        return 1
    if config.main.daemon and not upgrading:
        _daemonize()
        master.pid = os.getpid()
    return master.run()


def _daemonize() -> None:
    """Classic double fork; the grandchild becomes the master."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
