"""The error log and the access log, in nginx's formats.

Error log lines read ``2026/11/30 07:16:07 [notice] 1234#0: message``.  Both
logs are plain append-mode files that ``reopen()`` swaps (USR1, logrotate).
Access log lines are buffered in memory and written in batches (at most once a
second, or when 64 KiB are waiting) so the request path never waits on disk.
No gevent here: the master uses this module too.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import TextIO

from forklb.http.variables import inline_form

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
    """One access log file with a write buffer; ``write`` never blocks on disk."""

    FLUSH_BYTES = 64 * 1024

    def __init__(self, path: str):
        self.path = path
        self.buffer: list[str] = []
        self.size = 0
        self.fd = -1
        self.reopen()

    def reopen(self) -> None:
        self.flush()
        fd = os.open(_prepared(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd

    def write(self, line: str) -> None:
        self.buffer.append(line)
        self.size += len(line)
        if self.size >= self.FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.buffer or self.fd < 0:
            return
        text = "".join(self.buffer)
        try:
            # Request bytes are held as latin-1 characters: written back as the
            # same bytes (escape=json/none pass bytes >= 0x80 through, as nginx).
            data = text.encode("latin-1")
        except UnicodeEncodeError:  # non-latin-1 literal text from the config
            data = text.encode("utf-8", "backslashreplace")
        self.buffer.clear()
        self.size = 0
        try:
            os.write(self.fd, data)
        except OSError:
            pass


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


# What a value must not contain to be copied as it is (one regex search, in C).
_NEEDS_ESCAPE = {
    "default": re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]'),
    "json": re.compile(r'[\x00-\x1f"\\]'),
}


def _needs_default_escape(text: str) -> bool | None:
    """``_NEEDS_ESCAPE["default"].search`` by str methods (in C, faster than the
    regex engine on the usual all-printable ASCII line): True, or None when
    nothing in ``text`` needs escaping."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return None
    return True


def line_renderer(template, escape: str = "default", end: str = ""):
    """A function ``render(request) -> str`` for a log_format, built once at load;
    each line ends with ``end``.

    Literal text is copied; every variable's value is escaped.  An empty value
    shows as ``-`` with ``escape=default`` and as nothing with ``json``/``none``
    (nginx's ``not_found`` variables).

    The function is generated as Python source (as ``dataclasses`` makes its
    methods).  Variables that are attributes of the request are read inline,
    and so are headers, from the request's ``header_map`` where the worker
    notes every header a variable names (:func:`forklb.http.variables.inline_form`);
    the others are called.  Numbers skip the escape check.  The text values are
    checked for characters to escape with one check over all of them (the
    escape sets are single characters, so that equals a check per value) and
    escaped one by one only when one has such a character.  The line is one
    f-string (0.29 µs for the combined format where ``str.format`` took 0.42);
    its literal text is in fields too, constants passed in by name like the
    header names and getters, so no text from the config goes into the source.
    """
    table = ESCAPE_TABLES[escape]
    needs = _NEEDS_ESCAPE[escape].search if table is not None else None
    if escape == "default":
        needs = _needs_default_escape
    empty = "-" if escape == "default" else ""
    line: list[str] = []  # the f-string's fields: variables and literal constants
    body: list[str] = []
    texts: list[str] = []  # the variables holding text, which may need escaping
    names: dict = {"needs": needs, "table": table, "empty": empty}
    headers = False  # a header is read: the header map is fetched first
    pending: list[str] = []  # literal text not yet in a field

    def literals() -> None:
        if "".join(pending):
            names[f"c{len(line)}"] = "".join(pending)
            line.append(f"{{c{len(line)}}}")
        pending.clear()

    for part in template.parts:
        if isinstance(part, str):
            pending.append(part)
            continue
        form = inline_form(part)
        if form is not None and form[0] == "empty":
            pending.append(empty)
            continue
        literals()
        v = f"v{len(line)}"
        if form is None:
            names[f"g_{v}"] = part
            body.append(f"{v} = g_{v}(r)")
        elif form[0] == "header":  # noted while parsing (Exchange.header_map)
            headers = True
            names[f"h_{v}"] = form[1]
            body.append(f"{v} = hm.get(h_{v}, '') if hm is not None else ''")
        else:  # an attribute: text or number (an identifier from forklb's own tables)
            body.append(f"{v} = r.{form[1]}")
            if form[0] == "number":
                line.append(f"{{{v}}}")
                continue
        texts.append(v)
        line.append(f"{{{v} or empty}}" if empty else f"{{{v}}}")
    pending.append(end)
    literals()
    if headers:
        body.insert(0, "hm = r.header_map")
    if texts and needs is not None:
        body.append(f"if needs(''.join(({', '.join(texts)},))) is not None:")
        body += [f"    {v} = {v}.translate(table)" for v in texts]
    body.append(f"return f'{''.join(line)}'" if line else "return ''")
    source = "def render(r):\n" + "".join(f"    {line}\n" for line in body)
    exec(compile(source, f"<log_format {template.source!r}>", "exec"), names)  # noqa: S102
    return names["render"]
