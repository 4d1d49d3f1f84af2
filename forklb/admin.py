"""``forklb upstream ...``: the runtime API from the command line.

The sidecar's address and the token come from the same config file the
balancer runs with, so ``forklb -c FILE upstream drain www_pools 127.0.0.1:9002``
needs nothing else.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from forklb.model import Config

USAGE = ("usage: forklb upstream list | upstream drain|up|down NAME ADDR | "
         "upstream set-weight NAME ADDR WEIGHT")


def run_command(config: Config, words: list[str]) -> int:
    if not words or words[0] != "upstream" or len(words) < 2:
        return _fail(USAGE)
    action, rest = words[1], words[2:]
    if config.sidecar is None:
        return _fail("no sidecar { listen ...; } block in the configuration: no runtime API")
    if action == "list" and not rest:
        status, body = _call(config, "GET", "/api/upstreams")
        if status != 200:
            return _fail(body.get("error", f"HTTP {status}"))
        _print_table(body)
        return 0
    if action in ("drain", "up", "down") and len(rest) == 2:
        change: dict[str, Any] = {"state": action}
    elif action == "set-weight" and len(rest) == 3 and rest[2].isdigit():
        change = {"weight": int(rest[2])}
    else:
        return _fail(USAGE)
    name, address = rest[0], rest[1]
    path = f"/api/upstreams/{quote(name, safe='')}/servers/{quote(address, safe='')}"
    status, body = _call(config, "PATCH", path, change)
    if status != 200:
        return _fail(body.get("error", f"HTTP {status}"))
    _print_table(body)
    return 0


def _call(config: Config, method: str, path: str,
          body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    listen = config.sidecar.listens[0]
    host = "127.0.0.1" if listen.host == "0.0.0.0" else listen.host
    host = f"[{host}]" if ":" in host else host
    request = urllib.request.Request(f"http://{host}:{listen.port}{path}", method=method)
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
        token = _token(config)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - ours
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {}
    except OSError as e:
        return 0, {"error": f"cannot reach the sidecar at {host}:{listen.port}: {e}"}


def _token(config: Config) -> str | None:
    path = config.sidecar.admin_token_file
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _print_table(body: dict[str, Any]) -> None:
    print(f"{'upstream':16} {'server':24} {'weight':>6} {'state':9} {'active':>6} "
          f"{'requests':>9} {'failures':>8}")
    for name, upstream in body.get("upstreams", {}).items():
        for s in upstream["servers"]:
            print(f"{name:16} {s['address']:24} {s['weight']:>6} {s['state']:9} "
                  f"{s['active']:>6} {s['requests']:>9} {s['failures']:>8}")


def _fail(message: str) -> int:
    sys.stderr.write(f"forklb: [error] {message}\n")
    return 1
