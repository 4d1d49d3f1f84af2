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
    """The fast "nothing to escape" check of escape=default finds exactly what the
    escape set's regex finds, for every character up to U+01FF and in mixtures."""
    from forklb.log import _NEEDS_ESCAPE, _needs_default_escape

    regex = _NEEDS_ESCAPE["default"].search
    samples = [chr(c) for c in range(0x200)] + ["", "plain text", 'a"b', "a\\b", "x\x7fy",
                                                 "caf\xe9 ok", "tab\there", "~!#[]"]
    for text in samples:
        assert (_needs_default_escape(text) is None) == (regex(text) is None), repr(text)


def test_renderer_braces_and_empty_values():
    """Literal braces survive the format pattern; empty values show as "-" (default)
    or nothing (json)."""
    template = compile_template('{"$request_uri"} {$http_referer}')
    r = _request(target="/x", headers={})
    assert line_renderer(template, "default")(r) == '{"/x"} {-}'
    assert line_renderer(template, "json")(r) == '{"/x"} {}'


def _request(**values):
    """A request context as the access log reads it: headers a variable names are
    in ``header_map`` (noted while parsing), and behind ``header()``."""
    headers = values.pop("headers", {})
    return SimpleNamespace(header=lambda name: headers.get(name, ""), header_map=headers or None,
                           **values)


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
def test_generated_renderer_matches_the_reference_for_every_variable(escape):
    """line_renderer builds its function as source at load: it gives what rendering
    part by part gives, for every variable (read inline, as a number, a header, or
    called) next to literal text with braces, quotes and backslashes, whether a
    value is empty, plain or hostile."""
    import random

    from forklb.config.loader import COMBINED
    from forklb.http.variables import VARIABLES

    clocks = {"msec", "request_time"}  # read the time when called: not comparable
    names = sorted(set(VARIABLES) - clocks) + ["http_user_agent", "http_x_forwarded_for",
                                                "arg_page"]
    rng = random.Random(6)
    hostile = ['', 'plain', 'a"b\\c', "tab\there\n", "caf\xe9", "{}", "-", "0"]
    for round_ in range(60):
        picked = rng.sample(names, 6)
        source = "".join(f'{rng.choice(["", " ", "{", "}", chr(34), chr(92), "[x]"])}${n}'
                         for n in picked) + ' "$request" $status'
        if round_ == 0:
            source = COMBINED
        template = compile_template(source)
        values = {a: rng.choice(hostile) for a in (
            "host", "remote_addr", "request_line", "method", "target", "uri", "args", "scheme",
            "https", "ssl_protocol", "ssl_cipher", "ssl_server_name", "protocol", "server_addr",
            "server_name", "proxy_host", "upstream_addr", "upstream_status",
            "upstream_response_time", "upstream_connect_time")}
        numbers = {a: rng.choice([0, 7, 200, 65535]) for a in (
            "remote_port", "server_port", "status", "body_bytes_sent", "bytes_sent", "pid",
            "connection_id", "connection_requests")}
        headers = {"user-agent": rng.choice(hostile), "x-forwarded-for": rng.choice(hostile)}
        r = _request(headers=headers, start_time=1.7e9, **values, **numbers)
        assert line_renderer(template, escape)(r) == _reference_line(template, escape, r), \
            (source, values, numbers, headers)


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
