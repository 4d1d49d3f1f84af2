"""An upstream's response head: read with llhttp, rewritten for the client as bytes.

llhttp (httptools) validates the reply and follows its framing, but the header
lines are not handed to Python one by one (nine callbacks for a typical nginx
reply).  Once the head is complete, its header section is cut from the bytes
received, the framing headers are picked out with one regular expression, and
the lines the client must not see (hop-by-hop, framing, ``proxy_hide_header``)
are removed with one precompiled expression per location (:func:`hidden_lines`).

This works on the raw lines because llhttp's strict mode has already refused
everything that would make them ambiguous: bare LF, obs-fold continuation
lines, whitespace before the colon, control characters.  A head whose lines are
not in the canonical ``Name: value`` form is rebuilt line by line instead, as
nginx re-serialises every header it relays.

No I/O here: :class:`ResponseHead` is fed bytes and tests in microseconds.
"""

from __future__ import annotations

import re

import httptools

from forklb.http import protocol
from forklb.http.validate import Invalid, response_start_ok, transfer_coding

# The most an upstream's response head may take (status line and headers, 1xx
# interim responses before it included); beyond it the reply is refused as
# nginx refuses one that overflows proxy_buffer_size.
HEAD_MAX = 64 * 1024
TOO_BIG = "upstream sent too big header"

# The headers whose values decide framing and keep-alive (llhttp checked them).
_FRAMING = re.compile(
    rb"^(content-length|transfer-encoding|connection):[ \t]*([^\r]*?)[ \t]*\r$", re.I | re.M)
# A line not in "Name: value" form: no single space after the colon, an empty
# value, or whitespace before the CRLF.
_IRREGULAR = re.compile(rb"^[^:\r\n]*:(?! [^ \t\r])|[ \t]\r$", re.M)


def hidden_lines(names: frozenset[bytes]) -> re.Pattern[bytes]:
    """The expression that cuts the header lines named in ``names`` (lower-case)
    from a header section; built once per location."""
    alternatives = b"|".join(re.escape(name) for name in sorted(names))
    return re.compile(rb"^(?:" + alternatives + rb"):[^\r]*\r\n", re.I | re.M)


class ResponseHead:
    """httptools callbacks for one upstream response, and its head once complete.

    ``block`` is the header section as received (every line with its CRLF,
    without the status line and the empty line), ``reason`` the reason phrase.
    ``regular`` is True when every line has the ``Name: value`` form and the
    ``Connection`` header lists no other header: the lines can then be relayed
    as they are, less the hidden ones.
    """

    __slots__ = ("parser", "head_request", "received", "headers_done", "complete", "body",
                 "status", "keep_alive", "reason", "block", "content_length", "codings",
                 "listed", "regular", "upgrade_rest")

    def __init__(self, head_request: bool):
        self.parser = httptools.HttpResponseParser(self)
        self.head_request = head_request
        self.received = b""  # the reply so far, until its head is complete
        self.headers_done = False
        self.complete = False
        self.body: list[bytes] = []
        self.status = 0
        self.keep_alive = False
        self.reason = b""
        self.block = b""
        self.content_length: int | None = None
        self.codings: list[bytes] = []  # Transfer-Encoding values
        self.listed: frozenset[bytes] = frozenset()  # names a Connection header lists
        self.regular = True
        self.upgrade_rest: bytes | None = None  # after a 101 head: the tunnel's first bytes

    # -- llhttp's callbacks --
    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # interim response: skipped, the final one follows
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        if self.head_request:
            self.complete = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.complete = True

    # --
    def feed(self, data: bytes) -> None:
        """Parse ``data``.  A reply that is not HTTP/1.x, framing forklb refuses, or
        a head over HEAD_MAX raises Invalid (llhttp takes RTSP/ and ICE/ too,
        nginx 1.22 even HTTP/0.9); llhttp's own errors raise HttpParserError."""
        if self.headers_done:
            if self.head_request:
                return  # llhttp does not know HEAD responses have no body
        else:
            received = self.received + data if self.received else data
            if not response_start_ok(received[:5]):
                raise Invalid(502, "upstream sent no valid HTTP/1.0 header")
            self.received = received
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # 101 Switching Protocols: llhttp stops after the head.
            self.upgrade_rest = data[e.args[0]:]
            self.complete = True
        if self.received:
            if self.headers_done:
                self._take_head()
            elif len(self.received) > HEAD_MAX:
                raise Invalid(502, TOO_BIG)

    def _take_head(self) -> None:
        """Cut the final head out of what was received (1xx interim heads before
        it are skipped) and pick out its framing."""
        received = self.received
        self.received = b""
        start = 0
        end = received.find(b"\r\n\r\n")
        # "HTTP/1.1 100 ..." : the status code is at a fixed offset (llhttp checked it)
        while received[start + 9] == 0x31 and received[start + 9:start + 12] != b"101":
            start = end + 4
            end = received.find(b"\r\n\r\n", start)
        if end - start > HEAD_MAX:
            raise Invalid(502, TOO_BIG)
        line_end = received.find(b"\r\n", start)
        self.reason = received[start + 13:line_end]
        block = self.block = received[line_end + 2:end + 2]
        connection = None
        for name, value in _FRAMING.findall(block):
            lname = name.lower()
            if lname == b"content-length":
                self.content_length = int(value)
            elif lname == b"transfer-encoding":
                self.codings.append(value)
            elif connection is None:
                connection = [value]
            else:
                connection.append(value)
        if self.codings:
            # Any coding but chunked (nginx >= 1.23: "upstream sent unknown
            # Transfer-Encoding"): the body's end could not be found.
            transfer_coding(self.codings, "1.1")
        if connection is not None:
            self.listed = protocol.connection_tokens(connection)
        self.regular = not self.listed and _IRREGULAR.search(block) is None

    def header_pairs(self) -> list[tuple[bytes, bytes]]:
        """The header lines as (name, value), the value without surrounding whitespace."""
        pairs = []
        for line in self.block.split(b"\r\n")[:-1]:
            name, _, value = line.partition(b":")
            pairs.append((name, value.strip(b" \t")))
        return pairs

    def release(self) -> None:
        """Break the reference cycle with the parser (which holds this object for
        its callbacks), so the pair is freed at once, not by the cyclic collector."""
        self.parser = None
