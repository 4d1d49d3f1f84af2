"""Unit tests of the limits area: log escaping and the limit directives.

Escaping follows nginx's ``ngx_http_log_escape`` (escape=default) and
``ngx_escape_json`` (escape=json); the expected strings below were compared with
Debian's nginx 1.22 writing the same values (see test_e2e_limits for the live check).
Config errors were compared by hand with ``nginx -t`` on the same lines.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from forklb.config import ConfigError, load
from forklb.http.connection import Exchange
from forklb.http.variables import compile_template
from forklb.log import escape_value, line_renderer


def load_text(tmp_path: Path, text: str):
    (tmp_path / "nginx.conf").write_text(text)
    return load("nginx.conf", prefix=str(tmp_path))


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


def http(body: str, server: str = "", location: str = "") -> str:
    return ("events {}\nhttp {\n" + body + "\nserver {\nlisten 127.0.0.1:8080;\n" + server
            + "\nlocation / {\n" + location + "\n}\n}\n}\n")


# -- escaping ----------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("plain /path?a=b", "plain /path?a=b"),
    ('say "hi"', 'say \\x22hi\\x22'),
    ("back\\slash", "back\\x5Cslash"),
    ("tab\there\nnl\r\x00", "tab\\x09here\\x0Anl\\x0D\\x00"),
    ("del\x7f", "del\\x7F"),
    ("caf\xe9 \xff", "caf\\xE9 \\xFF"),  # bytes >= 0x80 (latin-1 decoded)
    ("'single' <>{}", "'single' <>{}"),
])
def test_default_escaping_is_nginx_log_escape(value, expected):
    assert escape_value(value, "default") == expected


@pytest.mark.parametrize("value, expected", [
    ("plain", "plain"),
    ('a"b', 'a\\"b'),
    ("a\\b", "a\\\\b"),
    ("\n\r\t\b\f", "\\n\\r\\t\\b\\f"),
    ("\x00\x01\x1f", "\\u0000\\u0001\\u001F"),  # upper-case hex, as ngx_escape_json
    ("\x7f caf\xe9", "\x7f caf\xe9"),  # 0x7f and up pass unchanged
])
def test_json_escaping_is_ngx_escape_json(value, expected):
    assert escape_value(value, "json") == expected


def test_none_escaping_keeps_everything():
    assert escape_value('"\\\x00\xe9', "none") == '"\\\x00\xe9'


def test_escape_check_agrees_with_the_escape_set():
    """The generated line function checks request text for anything to escape before
    escaping it: it escapes exactly what the escape set covers, for every character up
    to U+01FF and in mixtures."""
    samples = [chr(c) for c in range(0x200)] + ["", "plain text", 'a"b', "a\\b", "x\x7fy",
                                                 "caf\xe9 ok", "tab\there", "~!#[]"]
    for escape in ("default", "json"):
        render = line_renderer(compile_template("$uri"), escape)
        for text in samples:
            expected = escape_value(text, escape) or ("-" if escape == "default" else "")
            assert render(_request(uri=text)) == expected, (escape, repr(text))


def test_renderer_braces_and_empty_values():
    """Literal braces survive the format pattern; empty values show as "-" (default)
    or nothing (json)."""
    template = compile_template('{"$request_uri"} {$http_referer}')
    r = _request(target="/x", headers={})
    assert line_renderer(template, "default")(r) == '{"/x"} {-}'
    assert line_renderer(template, "json")(r) == '{"/x"} {}'


class _Connection(SimpleNamespace):
    def tls_detail(self, what: str) -> str:
        return self.tls.get(what, "")


def _request(headers=None, target="/", method="GET", version="1.1", tls=None,
             server_name="example.org", **attrs) -> Exchange:
    """A real Exchange on a stand-in connection, as the access log reads it:
    headers a variable names are in ``header_map`` (noted while parsing).
    Connection-level values go to the connection, the rest to the Exchange."""
    listener = SimpleNamespace(port=attrs.pop("server_port", 8080),
                               host=attrs.pop("server_addr", "127.0.0.1"))
    conn = _Connection(remote_addr=attrs.pop("remote_addr", "192.0.2.1"),
                       remote_port=attrs.pop("remote_port", 40000),
                       serial=attrs.pop("connection_id", 1),
                       requests=attrs.pop("connection_requests", 1),
                       scheme=attrs.pop("scheme", "http"), listener=listener, tls=tls or {})
    ex = Exchange(conn, 0.0)
    ex.target_raw, ex.method_b, ex.version = target.encode("latin-1"), method.encode(), version
    ex.header_map = dict(headers) if headers else None
    ex.server = SimpleNamespace(names=(server_name,))
    for name, value in attrs.items():
        setattr(ex, name, value)
    return ex


def test_renderer_escapes_variables_not_literal_text():
    template = compile_template('"$request_uri" \\ "$http_user_agent"')
    r = _request(target='/a"b', headers={"user-agent": "x\ny"})
    assert line_renderer(template, "default")(r) == '"/a\\x22b" \\ "x\\x0Ay"'
    assert line_renderer(template, "json")(r) == '"/a\\"b" \\ "x\\ny"'
    assert line_renderer(template, "none")(r) == '"/a"b" \\ "x\ny"'


def test_renderer_empty_value_is_dash_only_with_default_escaping():
    template = compile_template("[$http_referer]")
    r = _request()
    assert line_renderer(template, "default")(r) == "[-]"
    assert line_renderer(template, "json")(r) == "[]"
    assert line_renderer(template, "none")(r) == "[]"


def test_json_log_line_is_valid_json_for_hostile_values():
    import json

    template = compile_template('{"uri":"$request_uri","ua":"$http_user_agent"}')
    hostile = 'x"}, "admin": true, "y": "\\\x01\n'
    line = line_renderer(template, "json")(_request(target="/" + hostile,
                                                    headers={"user-agent": hostile}))
    assert json.loads(line) == {"uri": "/" + hostile, "ua": hostile}


def _reference_line(template, escape: str, r) -> str:
    """What a log line must be: each part in turn, a variable's value escaped, an
    empty one as "-" with escape=default."""
    out = []
    for part in template.parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value = part(r)
        out.append(escape_value(value, escape) if value else ("-" if escape == "default" else ""))
    return "".join(out)


@pytest.mark.parametrize("escape", ["default", "json", "none"])
def test_generated_renderer_matches_the_reference_for_every_variable(escape, monkeypatch):
    """line_renderer builds its function as source at load: it gives what rendering
    part by part gives, for every variable (read inline, as a number, a header, or
    called) next to literal text with braces, quotes and backslashes, whether a
    value is empty, plain or hostile."""
    import random
    import time

    from forklb.config.loader import COMBINED
    from forklb.http import protocol
    from forklb.http.variables import VARIABLES

    # The line function reads the process clock as a worker's timer leaves it; the
    # getters refresh it first. One fixed second keeps the two comparable.
    monkeypatch.setattr(protocol, "time", SimpleNamespace(
        time=lambda: 1.7e9, strftime=time.strftime, gmtime=time.gmtime,
        localtime=time.localtime))
    protocol.CLOCK.now()
    clocks = {"msec", "request_time"}  # read the time when called: not comparable
    names = sorted(set(VARIABLES) - clocks) + ["http_user_agent", "http_x_forwarded_for",
                                                "arg_page"]
    rng = random.Random(6)
    hostile = ['', 'plain', 'a"b\\c', "tab\there\n", "caf\xe9", "{}", "-", "0"]
    # What forklb writes itself (SAFE_TEXT: not checked for escapes) takes the values
    # it can have; what comes from the request or the config can be anything.
    own = {"remote_addr": ["192.0.2.1", "2001:db8::1", ""], "scheme": ["http", "https"],
           "upstream_status": ["", "200", "502, 200", "504"],
           "upstream_connect_time": ["", "0.001", "0.000, 0.002"]}
    methods = ["GET", "POST", "PROPFIND", "M-SEARCH", ""]  # llhttp passes tokens only
    for round_ in range(60):
        picked = rng.sample(names, 6)
        source = "".join(f'{rng.choice(["", " ", "{", "}", chr(34), chr(92), "[x]", "é"])}${n}'
                         for n in picked) + ' "$request" $status'
        if round_ == 0:
            source = COMBINED
        template = compile_template(source)
        values = {a: rng.choice(hostile) for a in (
            "host", "target", "uri", "args", "server_addr", "server_name", "proxy_host",
            "upstream_addr")}
        values.update({a: rng.choice(choices) for a, choices in own.items()})
        tls = {a: rng.choice(hostile) for a in ("protocol", "cipher", "server_name")}
        numbers = {a: rng.choice([0, 7, 200, 65535]) for a in (
            "remote_port", "server_port", "status", "body_bytes_sent", "bytes_sent",
            "connection_id", "connection_requests")}
        headers = {"user-agent": rng.choice(hostile), "x-forwarded-for": rng.choice(hostile)}
        r = _request(headers=headers, tls=tls, method=rng.choice(methods),
                     version=rng.choice(["1.0", "1.1"]), start_time=1.7e9,
                     upstream_time=rng.choice([None, 0.0125]),
                     request_method_b=rng.choice([b"", b"POST"]), **values, **numbers)
        assert line_renderer(template, escape)(r) == _reference_line(template, escape, r), \
            (source, values, numbers, headers)
    monkeypatch.undo()
    protocol.CLOCK.now()


# -- directives ----------------------------------------------------------------

def test_log_format_escape_is_kept_in_the_model(tmp_path):
    config = load_text(tmp_path, http("log_format j escape=json '{\"h\":\"$host\"}';\n"
                                      "log_format n escape=none '$host';\n"
                                      "log_format d escape=default '$host';\n"
                                      "log_format plain '$host';\naccess_log a.log j;"))
    (log,) = config.http.servers[0].locations[0].access_log
    assert log.format.escape == "json"
    assert log.format.template.source == '{"h":"$host"}'


def test_log_format_escape_alone_is_an_empty_format(tmp_path):
    # nginx -t accepts "log_format j escape=json;"
    load_text(tmp_path, http("log_format j escape=json;"))


def test_unknown_log_format_escaping(tmp_path):
    text = http("log_format j escape=xml '$host';")
    assert load_error(tmp_path, text) == 'unknown log format escaping "xml" in nginx.conf:3'


def test_limit_defaults(tmp_path):
    config = load_text(tmp_path, http(""))
    server = config.http.servers[0]
    loc = server.locations[0]
    assert server.large_client_header_buffers == (4, 8192)
    assert loc.send_timeout == 60.0
    assert loc.client_body_min_rate == 500


def test_limits_are_inherited(tmp_path):
    config = load_text(tmp_path, http("send_timeout 5s; client_body_min_rate 1k;\n"
                                      "large_client_header_buffers 2 1k;",
                                      location="send_timeout 2s;"))
    server = config.http.servers[0]
    assert server.large_client_header_buffers == (2, 1024)
    assert [loc.send_timeout for loc in server.locations] == [2.0, 5.0]
    assert {loc.client_body_min_rate for loc in server.locations} == {1024}


@pytest.mark.parametrize("directive, message", [
    ("large_client_header_buffers 0 8k;", '"large_client_header_buffers" directive invalid value'),
    ("large_client_header_buffers 4 0;", '"large_client_header_buffers" directive invalid value'),
    ("large_client_header_buffers 4 x;", '"large_client_header_buffers" directive invalid value'),
    ("large_client_header_buffers 4 100;",
     'the "large_client_header_buffers" size must be equal to or greater than '
     '"connection_pool_size"'),
    ("large_client_header_buffers 4;",
     'invalid number of arguments in "large_client_header_buffers" directive'),
    ("send_timeout x;", '"send_timeout" directive invalid value'),
    ("client_body_min_rate fast;", '"client_body_min_rate" directive invalid value'),
])
def test_limit_directive_errors_as_nginx(tmp_path, directive, message):
    assert load_error(tmp_path, http(directive)) == f"{message} in nginx.conf:3"


def test_large_client_header_buffers_not_in_location(tmp_path):
    text = http("", location="large_client_header_buffers 4 8k;")
    assert load_error(tmp_path, text) == ('"large_client_header_buffers" directive is not '
                                          "allowed here in nginx.conf:8")
