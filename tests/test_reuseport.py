"""``listen ... reuseport``: parsing and nginx's rules (checked against nginx 1.22 ``-t``).

nginx (``ngx_http_core_listen``): ``reuseport`` sets ``lsopt.set`` like ``backlog=``, so
only one ``listen`` of an address may carry it ("duplicate listen options for ...");
``default_server``, ``ssl`` and ``backlog=`` may sit beside it.  The declaration that
carries the options stands for the address wherever it is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from forklb.config import ConfigError, load
from forklb.model import Config, Listen


def load_text(tmp_path: Path, text: str) -> Config:
    (tmp_path / "forklb.conf").write_text(text)
    return load("forklb.conf", prefix=str(tmp_path))


def load_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return info.value


def http(body: str) -> str:
    return "events {}\nhttp {\n" + body + "\n}\n"


def test_reuseport_parsed(tmp_path: Path) -> None:
    config = load_text(tmp_path, http("server { listen 127.0.0.1:8080 reuseport; }"))
    (listen,) = config.http.servers[0].listens
    assert listen == Listen("127.0.0.1", 8080, reuseport=True)
    assert config.reuseport_addresses() == {("127.0.0.1", 8080)}


def test_reuseport_beside_default_server_backlog(tmp_path: Path) -> None:
    config = load_text(tmp_path, http(
        "server { listen 8080 default_server reuseport backlog=9; }"))
    (listen,) = config.listen_addresses()
    assert (listen.default_server, listen.backlog, listen.reuseport) == (True, 9, True)


def test_reuseport_written_on_a_later_server_applies_to_the_address(tmp_path: Path) -> None:
    config = load_text(tmp_path, http(
        "server { listen 8080; }\nserver { listen 8080 reuseport; server_name b; }"))
    assert config.listen_addresses() == (Listen("0.0.0.0", 8080, reuseport=True),)
    assert config.reuseport_addresses() == {("0.0.0.0", 8080)}


def test_backlog_written_on_a_later_server_applies_too(tmp_path: Path) -> None:
    config = load_text(tmp_path, http(
        "server { listen 8080; }\nserver { listen 8080 backlog=7; server_name b; }"))
    assert [lst.backlog for lst in config.listen_addresses()] == [7]


def test_addresses_without_reuseport(tmp_path: Path) -> None:
    config = load_text(tmp_path, http("server { listen 8080; listen 8081 reuseport; }"))
    assert config.reuseport_addresses() == {("0.0.0.0", 8081)}


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        # nginx -t: "duplicate listen options for 127.0.0.1:18080" at the second listen
        (http("server { listen 127.0.0.1:8080 reuseport; }\n"
              "server { listen 127.0.0.1:8080 reuseport; }"),
         "duplicate listen options for 127.0.0.1:8080", 4),
        (http("server { listen 8080 backlog=5; }\nserver { listen 8080 reuseport; }"),
         "duplicate listen options for 0.0.0.0:8080", 4),
        (http("server { listen [::1]:8080 reuseport; }\n"
              "server { listen [::1]:8080 backlog=5; }"),
         "duplicate listen options for [::1]:8080", 4),
        # the same server twice: nginx's check order puts this one first
        (http("server { listen 8080 reuseport; listen 8080; }"),
         "a duplicate listen 0.0.0.0:8080", 3),
        (http("server { listen 8080 reuseport default_server; }\n"
              "server { listen 8080 default_server; }"),
         "a duplicate default server for 0.0.0.0:8080", 4),
        (http("server { listen 8080 reuseports; }"), 'invalid parameter "reuseports"', 3),
    ],
)
def test_reuseport_conflicts(tmp_path: Path, text: str, message: str, line: int) -> None:
    err = load_error(tmp_path, text)
    assert (err.message, err.line) == (message, line)
    assert str(err).endswith(f"forklb.conf:{line}")


def test_reuseport_repeated_in_one_listen_is_accepted(tmp_path: Path) -> None:
    # nginx -t accepts "listen ... reuseport reuseport"
    config = load_text(tmp_path, http("server { listen 8080 reuseport reuseport; }"))
    assert config.reuseport_addresses() == {("0.0.0.0", 8080)}


def test_sidecar_refuses_reuseport(tmp_path: Path) -> None:
    text = "events {}\nsidecar {\nlisten 127.0.0.1:9145 reuseport;\n}\n"
    err = load_error(tmp_path, text)
    assert (err.message, err.line) == ('the sidecar does not support the "reuseport" parameter',
                                       3)
