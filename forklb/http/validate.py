"""Request checks that llhttp's strict mode does not make, as pure functions.

llhttp (httptools) already rejects CL+TE, bad or duplicate Content-Length,
``chunked`` not last or repeated in one header, obs-fold, whitespace before the
colon, non-token name bytes, CR/NUL/CTL in values and every bare LF.  What it
lets through, and forklb refuses (see the "forklb" column of the hardening
reference):

- ``Transfer-Encoding`` with a coding other than ``chunked`` (``gzip, chunked``):
  501; a repeated Transfer-Encoding header line, or one on HTTP/1.0: 400;
- header names with bytes nginx calls invalid (``_``, ``.``, ...): dropped, as
  nginx does with ``ignore_invalid_headers on; underscores_in_headers off``, so
  ``X_Forwarded_For`` can never stand in for ``X-Forwarded-For``;
- chunk sizes of more than 16 hex digits and chunk extensions over 4 KiB
  (:class:`ChunkScanner`, which also finds where a chunked body ends).

Nothing here does I/O; :class:`Invalid` carries the status and nginx's wording.
"""

from __future__ import annotations

MAX_CHUNK_SIZE_DIGITS = 16
MAX_CHUNK_EXTENSION = 4096
MAX_TRAILER_BYTES = 32 * 1024

# nginx's valid header name bytes with underscores_in_headers off.
_NAME_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-"
_HEX = frozenset(b"0123456789abcdefABCDEF")


class Invalid(Exception):
    """A request forklb refuses: ``status`` and the error-log message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def header_name_allowed(name: bytes) -> bool:
    """True when ``name`` has only letters, digits and ``-`` (nginx's valid names)."""
    return bool(name) and not name.translate(None, _NAME_BYTES)


# Raw header name -> its lower-case form, or b"" when nginx calls it invalid.  Names
# repeat from request to request, so each is checked once (up to a bound).
LOWERED_NAMES: dict[bytes, bytes] = {}
_LOWERED_MAX = 4096


def lowered_name(name: bytes) -> bytes:
    """``name`` in lower case if :func:`header_name_allowed`, else b"" (cached)."""
    lname = LOWERED_NAMES.get(name)
    if lname is None:
        lname = name.lower() if header_name_allowed(name) else b""
        if len(LOWERED_NAMES) < _LOWERED_MAX:
            LOWERED_NAMES[name] = lname
    return lname


def transfer_coding(values: list[bytes], version: str) -> bool:
    """Check the request's Transfer-Encoding header values; True for a chunked body.

    Only exactly ``chunked`` (any case, optional whitespace) is accepted. An
    unknown coding (``gzip, chunked``) is 501, as nginx answers; a repeated header
    line, ``chunked`` twice or not last, an empty element and Transfer-Encoding on
    HTTP/1.0 are 400.
    """
    if not values:
        return False
    if version == "1.0":
        raise Invalid(400, 'client sent HTTP/1.0 request with "Transfer-Encoding" header')
    if len(values) > 1:
        raise Invalid(400, "client sent duplicate header line: \"Transfer-Encoding: "
                      + values[1].decode("latin-1") + '"')
    codings = [c.strip(b" \t").lower() for c in values[0].split(b",")]
    if codings == [b"chunked"]:
        return True
    if b"" in codings or codings.count(b"chunked") > 1 or (
            b"chunked" in codings and codings[-1] != b"chunked"):
        raise Invalid(400, "client sent invalid \"Transfer-Encoding\": \""
                      + values[0].decode("latin-1") + '"')
    raise Invalid(501, "client sent unknown \"Transfer-Encoding\": \""
                  + values[0].decode("latin-1") + '"')


def response_start_ok(prefix: bytes) -> bool:
    """True while an upstream reply's first bytes can still be ``HTTP/``."""
    return b"HTTP/".startswith(prefix[:5])


_BAD_CHUNK = "client sent invalid chunked body"


class ChunkScanner:
    """Follows chunked framing over a byte stream, to bound what llhttp does not.

    :meth:`advance` looks at ``data[pos:]`` and returns how many of those bytes
    belong to the body (all of them, unless the body ends inside ``data``);
    ``done`` is then True.  It checks only the size-digit count, the extension
    length and the trailer size; llhttp, fed the same bytes, checks the rest.
    """

    __slots__ = ("state", "line", "left", "trailer_bytes", "done")

    SIZE, DATA, DATA_CRLF, TRAILER = range(4)

    def __init__(self) -> None:
        self.state = self.SIZE
        self.line = b""  # a size or trailer line not yet ended by LF
        self.left = 0  # data bytes, or CRLF bytes, still to skip
        self.trailer_bytes = 0
        self.done = False

    def advance(self, data: bytes, pos: int = 0) -> int:
        """Consume ``data[pos:]`` up to the end of the body; the count consumed."""
        start = pos
        end = len(data)
        while pos < end and not self.done:
            state = self.state
            if state == self.DATA or state == self.DATA_CRLF:
                step = min(self.left, end - pos)
                pos += step
                self.left -= step
                if not self.left:
                    if state == self.DATA:
                        self.state, self.left = self.DATA_CRLF, 2
                    else:
                        self.state = self.SIZE
                continue
            lf = data.find(b"\n", pos)
            stop = end if lf < 0 else lf + 1
            self.line += data[pos:stop]
            pos = stop
            if state == self.SIZE:
                self._size_line(complete=lf >= 0)
            else:
                self._trailer_line(complete=lf >= 0)
        return pos - start

    def _size_line(self, complete: bool) -> None:
        line = self.line
        digits = 0
        for byte in line:
            if byte not in _HEX:
                break
            digits += 1
        if digits > MAX_CHUNK_SIZE_DIGITS:
            raise Invalid(400, _BAD_CHUNK)
        # What follows the digits: ";ext...", whitespace, CRLF.
        if len(line) - digits > MAX_CHUNK_EXTENSION + 2:
            raise Invalid(400, _BAD_CHUNK)
        if not complete:
            return
        if not digits:
            raise Invalid(400, _BAD_CHUNK)
        size = int(line[:digits], 16)
        self.line = b""
        if size:
            self.state, self.left = self.DATA, size
        else:
            self.state = self.TRAILER

    def _trailer_line(self, complete: bool) -> None:
        pending = len(self.line)
        if self.trailer_bytes + pending > MAX_TRAILER_BYTES:
            raise Invalid(400, _BAD_CHUNK)
        if not complete:
            return
        self.trailer_bytes += pending
        if self.line in (b"\r\n", b"\n"):
            self.done = True
        self.line = b""
