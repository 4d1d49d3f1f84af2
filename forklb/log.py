"""The error log and the access log, in nginx's formats.

Error log lines read ``2026/11/30 07:16:07 [notice] 1234#0: message``.  Both
logs are plain append-mode files that ``reopen()`` swaps (USR1, logrotate).
Access log lines are buffered in memory and written in batches (by default at
most once a second, or when 64 KiB are waiting; ``access_log``'s buffer=,
flush= and gzip set it per file) so the request path never waits on disk.
No gevent here: the master uses this module too.
"""

from __future__ import annotations

import os
import re
import sys
import time
import zlib
from collections.abc import Callable
from http import HTTPMethod
from typing import Any, TextIO

from forklb.http.protocol import CLOCK
from forklb.http.variables import Template, inline_form
from forklb.model import DEFAULT_LOG_BUFFER, LogBuffer

LEVELS = ("debug", "info", "notice", "warn", "error", "crit", "alert", "emerg")
_RANK = {name: i for i, name in enumerate(LEVELS)}


class ErrorLog:
    """nginx-style error log; ``path`` may be ``"stderr"``."""

    def __init__(self, path: str = "stderr", level: str = "error", echo_stderr: bool = False):
        self.path = path
        self.min_rank = _RANK[level]
        self.echo_stderr = echo_stderr and path != "stderr"
        self.ident = 0  # worker slot shown after the pid, as nginx's "#tid"
        self._file: TextIO = sys.stderr
        self.reopen()

    def reopen(self) -> None:
        """(Re)open the file; used at start and on USR1 for log rotation."""
        if self.path == "stderr":
            self._file = sys.stderr
            return
        old = self._file
        self._file = open(_prepared(self.path), "a", buffering=1,  # noqa: SIM115
                          encoding="utf-8")
        if old is not sys.stderr:
            old.close()

    def log(self, level: str, message: str) -> None:
        rank = _RANK[level]
        if rank < self.min_rank and not (self.echo_stderr and rank >= _RANK["notice"]):
            return
        stamp = time.strftime("%Y/%m/%d %H:%M:%S")
        line = f"{stamp} [{level}] {os.getpid()}#{self.ident}: {message}\n"
        if rank >= self.min_rank:
            try:
                self._file.write(line)
            except (OSError, ValueError):
                pass
        if self.echo_stderr:
            sys.stderr.write(line)

    def emerg(self, message: str) -> None:
        self.log("emerg", message)

    def alert(self, message: str) -> None:
        self.log("alert", message)

    def error(self, message: str) -> None:
        self.log("error", message)

    def warn(self, message: str) -> None:
        self.log("warn", message)

    def notice(self, message: str) -> None:
        self.log("notice", message)

    def info(self, message: str) -> None:
        self.log("info", message)


class AccessLogFile:
    """One access log file and its buffer of lines; writing never blocks on disk.

    A worker appends each line to :attr:`lines` and adds its length to
    :attr:`size` itself (a method call per request costs more than the two), and
    calls :meth:`spill` once ``size`` reaches :attr:`limit`.  What ``spill`` writes
    is at most ``limit`` bytes, as nginx writes a buffer when the next line would
    not fit (a single longer line goes alone).  A timer calls :meth:`flush` every
    ``buffer.flush`` seconds, if set; reopening and exiting flush too.
    """

    def __init__(self, path: str, buffer: LogBuffer = DEFAULT_LOG_BUFFER):
        self.path = path
        self.buffer = buffer
        self.limit = buffer.size
        self.lines: list[str] = []
        self.size = 0
        self.fd = -1
        self.reopen()

    def reopen(self) -> None:
        self.flush()
        fd = os.open(_prepared(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd

    def spill(self) -> None:
        """The buffer has reached its limit: write all but a last line that went
        past it, which stays for the next write (or goes now if it is too long)."""
        lines = self.lines
        if self.size > self.limit and len(lines) > 1:
            last = lines.pop()
            self.flush()
            lines.append(last)
            self.size = len(last)
            if self.size < self.limit:
                return
        self.flush()

    def flush(self) -> None:
        if not self.lines or self.fd < 0:
            return
        text = "".join(self.lines)
        self.lines.clear()
        self.size = 0
        try:
            # Request bytes are held as latin-1 characters: written back as the
            # same bytes (escape=json/none pass bytes >= 0x80 through, as nginx).
            data = text.encode("latin-1")
        except UnicodeEncodeError:  # non-latin-1 literal text from the config
            data = text.encode("utf-8", "backslashreplace")
        if self.buffer.gzip:
            # a gzip member per write, as nginx: zcat reads the file at any time
            packer = zlib.compressobj(self.buffer.gzip, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            data = packer.compress(data) + packer.flush()
        try:
            os.write(self.fd, data)
        except OSError:
            pass


def conditional(render: Callable[[Any], str], condition: Template) -> Callable[[Any], str]:
    """``access_log ... if=CONDITION``: ``render``, or an empty line (nothing written)
    for a request whose condition is empty or "0"."""

    def render_if(r: Any) -> str:
        value = condition.render(r)
        return render(r) if value and value != "0" else ""

    return render_if


def _prepared(path: str) -> str:
    """``path`` with its directory created; errors name the log file itself."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    return path


# -- access log escaping (ngx_http_log_escape, ngx_escape_json) ----------------
# Values are str holding bytes as latin-1 (how requests are decoded), so one
# character is one byte and str.translate does the escaping in C.

def _default_table() -> dict[int, str]:
    """``escape=default``: ``"``, ``\\``, bytes below 0x20 and from 0x7f on as ``\\xXX``
    (upper-case hex), as ``ngx_http_log_escape``."""
    escaped = [*range(0x20), ord('"'), ord("\\"), *range(0x7F, 0x100)]
    return {b: f"\\x{b:02X}" for b in escaped}


def _json_table() -> dict[int, str]:
    """``escape=json``: ``"`` and ``\\`` backslashed; control bytes as ``\\n \\r \\t \\b
    \\f`` or ``\\u00XX`` (upper-case hex), as ``ngx_escape_json``.  Bytes from 0x7f on
    pass unchanged."""
    table = {b: f"\\u{b:04X}" for b in range(0x20)}
    table.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", ord("\b"): "\\b",
                  ord("\f"): "\\f", ord('"'): '\\"', ord("\\"): "\\\\"})
    return table


ESCAPE_TABLES: dict[str, dict[int, str] | None] = {
    "default": _default_table(), "json": _json_table(), "none": None,
}


def escape_value(value: str, escape: str) -> str:
    """``value`` as an access log line shows it under ``escape`` (default|json|none)."""
    table = ESCAPE_TABLES[escape]
    return value if table is None else value.translate(table)


# What an escape=json value must not contain to be copied as it is (one regex
# search, in C); escape=default is checked by str methods (see line_renderer).
_NEEDS_JSON_ESCAPE = re.compile(r'[\x00-\x1f"\\]')


# The usual methods' text, found by their bytes (cheaper than decoding them)
_METHOD_TEXT = {m.value.encode(): m.value for m in HTTPMethod}


def _source_literal(text: str) -> str:
    """``text`` as the literal part of a single-quoted f-string in generated source:
    printable ASCII but quote, backslash and braces as it is, the rest escaped, so
    no config text can end the string or open a field."""
    out = []
    for char in text:
        if char in "{}":
            out.append(char * 2)
        elif " " <= char <= "~" and char not in "'\\":
            out.append(char)
        else:
            out.append(f"\\U{ord(char):08x}")
    return "".join(out)


def line_renderer(template, escape: str = "default", end: str = ""):
    """A function ``render(request) -> str`` for a log_format, built once at load;
    each line ends with ``end``.

    Literal text is copied; every variable's value is escaped.  An empty value
    shows as ``-`` with ``escape=default`` and as nothing with ``json``/``none``
    (nginx's ``not_found`` variables).

    The function is generated as Python source (as ``dataclasses`` makes its
    methods), one f-string with the line in it.  Each variable is read as
    :func:`forklb.http.variables.inline_form` says: attributes of the request
    and of the worker's clock inline, headers from the request's ``header_map``
    where the worker notes every header a variable names, the request line from
    its parts; the others are called.  Text from the request is checked for
    characters to escape with one check over all of it (the escape sets are
    single characters, so that equals a check per value), and escaped value by
    value only when something needs it; text forklb writes itself (numbers,
    addresses, times) is not checked.  The config's literal text is in the
    f-string, escaped by :func:`_source_literal`; header names and getters are
    passed in as constants.
    """
    table = ESCAPE_TABLES[escape]
    empty = "-" if escape == "default" else ""
    line: list[str] = []  # the f-string's pieces: fields, and literal text as source
    body: list[str] = []
    texts: list[str] = []  # the variables holding text, which may need escaping
    names: dict = {"table": table, "empty": empty, "clock": CLOCK, "methods": _METHOD_TEXT}
    headers = False  # a header is read: the header map is fetched first
    pending: list[str] = []  # literal text not yet in the line

    def literals() -> None:
        line.append(_source_literal("".join(pending)))
        pending.clear()

    def maybe_empty(expression: str) -> str:
        return f"{{{expression} or empty}}" if empty else f"{{{expression}}}"

    for part in template.parts:
        if isinstance(part, str):
            pending.append(part)
            continue
        kind, path = inline_form(part) or ("call", "")
        if kind == "empty":
            pending.append(empty)
            continue
        literals()
        v = f"v{len(line)}"
        if kind == "number":  # never empty, nothing to escape
            line.append(f"{{r.{path}}}")
        elif kind == "safe":  # an identifier path from forklb's own tables
            line.append(maybe_empty(f"r.{path}"))
        elif kind == "clock":
            line.append(f"{{clock.{path}}}")
        elif kind == "request":  # as Exchange.request_line; the method is a token
            body.append(f"{v} = (r.target_received or r.target_raw).decode('latin-1')")
            texts.append(v)
            m = "(r.request_method_b or r.method_b)"
            line.append(f'{{methods.get({m}) or {m}.decode("latin-1")}} {{{v}}} HTTP/{{r.version}}')
        else:
            if kind == "call":
                names[f"g_{v}"] = part
                body.append(f"{v} = g_{v}(r)")
            elif kind == "header":  # noted while parsing (Exchange.header_map)
                headers = True
                names[f"h_{v}"] = path
                body.append(f"{v} = hm.get(h_{v}, '') if hm is not None else ''")
            else:  # text
                body.append(f"{v} = r.{path}")
            texts.append(v)
            line.append(maybe_empty(v))
    pending.append(end)
    literals()
    if headers:
        body.insert(0, "hm = r.header_map")
    if texts and table is not None:
        body.append(f"s = {texts[0]}" if len(texts) == 1
                    else f"s = f'{''.join(f'{{{v}}}' for v in texts)}'")
        if escape == "default":
            # str methods, in C: faster than a regex on the usual printable ASCII
            body.append("if not (s.isascii() and s.isprintable()) or '\"' in s or '\\\\' in s:")
        else:
            names["needs"] = _NEEDS_JSON_ESCAPE.search
            body.append("if needs(s) is not None:")
        body += [f"    {v} = {v}.translate(table)" for v in texts]
    body.append(f"return f'{''.join(line)}'")
    source = "def render(r):\n" + "".join(f"    {line}\n" for line in body)
    exec(compile(source, f"<log_format {template.source!r}>", "exec"), names)  # noqa: S102
    return names["render"]
