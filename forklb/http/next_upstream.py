"""``proxy_next_upstream``: when a failed attempt moves on to the next peer.

Pure functions over a bit mask, as nginx's ``NGX_HTTP_UPSTREAM_FT_*`` flags
(``ngx_http_upstream_next`` and ``ngx_http_upstream_test_next``).  The mask is
parsed once at config load; per request the proxy only asks :func:`decide`.

* error, timeout and invalid_header are failures of the peer (max_fails) whether
  or not they are listed; listed ones are retried.
* http_500/502/503/504/429 are retried when listed, and then count as failures
  too; http_403/404 are retried when listed but never count (``NGX_PEER_NEXT``).
* A sent POST, LOCK or PATCH is retried only when ``non_idempotent`` is listed.
* Out of tries (``proxy_next_upstream_tries``, or every peer tried), out of
  time (``proxy_next_upstream_timeout`` since the first attempt), or a request
  body already streamed and gone: no retry.
"""

from __future__ import annotations

from dataclasses import dataclass

ERROR = 1 << 1
TIMEOUT = 1 << 2
INVALID_HEADER = 1 << 3
HTTP_500 = 1 << 4
HTTP_502 = 1 << 5
HTTP_503 = 1 << 6
HTTP_504 = 1 << 7
HTTP_403 = 1 << 8
HTTP_404 = 1 << 9
HTTP_429 = 1 << 10
NON_IDEMPOTENT = 1 << 14
OFF = 1 << 30

DEFAULT = ERROR | TIMEOUT

NAMES = {
    "error": ERROR, "timeout": TIMEOUT, "invalid_header": INVALID_HEADER,
    "http_500": HTTP_500, "http_502": HTTP_502, "http_503": HTTP_503, "http_504": HTTP_504,
    "http_403": HTTP_403, "http_404": HTTP_404, "http_429": HTTP_429,
    "non_idempotent": NON_IDEMPOTENT, "off": OFF,
}

# Upstream response statuses proxy_next_upstream can act on, and their flag.
STATUS_FLAGS = {500: HTTP_500, 502: HTTP_502, 503: HTTP_503, 504: HTTP_504,
                403: HTTP_403, 404: HTTP_404, 429: HTTP_429}

# ngx_http_upstream_next: only these methods are "non-idempotent" once sent.
NON_IDEMPOTENT_METHODS = frozenset({b"POST", b"LOCK", b"PATCH"})

# The client's status when nginx gives up on a failure of this kind.
_GIVE_UP_STATUS = {TIMEOUT: 504, HTTP_504: 504, HTTP_500: 500, HTTP_503: 503,
                   HTTP_403: 403, HTTP_404: 404, HTTP_429: 429}


class PolicyError(ValueError):
    """A bad ``proxy_next_upstream`` value; ``message`` is nginx's wording."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def parse_mask(values: list[str]) -> int:
    """The mask of one or more ``proxy_next_upstream`` argument lists (ORed, as
    ``ngx_conf_set_bitmask_slot``); ``off`` anywhere wins over everything else."""
    mask = 0
    for value in values:
        flag = NAMES.get(value)
        if flag is None:
            raise PolicyError(f'invalid value "{value}"')
        mask |= flag
    return OFF if mask & OFF else mask


def mask_names(mask: int) -> tuple[str, ...]:
    """The option names set in ``mask`` (for messages and tests)."""
    return tuple(name for name, flag in NAMES.items() if mask & flag)


@dataclass(frozen=True, slots=True)
class NextUpstream:
    """One location's retry policy, built at config load."""

    mask: int = DEFAULT
    tries: int = 0  # proxy_next_upstream_tries; 0: as many as there are peers
    timeout: float = 0.0  # proxy_next_upstream_timeout; 0: no limit

    def retried_statuses(self) -> frozenset[int]:
        """Upstream statuses worth checking after a response head (precomputed)."""
        return frozenset(s for s, flag in STATUS_FLAGS.items() if self.mask & flag)


def counts_as_failure(kind: int) -> bool:
    """Whether an attempt that ended with ``kind`` counts against the peer's max_fails
    (``NGX_PEER_FAILED``); a 403 or 404 only moves on (``NGX_PEER_NEXT``)."""
    return kind not in (HTTP_403, HTTP_404)


def give_up_status(kind: int) -> int:
    """The status the client gets when an attempt failing with ``kind`` is the last."""
    return _GIVE_UP_STATUS.get(kind, 502)


def decide(policy: NextUpstream, kind: int, *, tries_done: int, peers: int, elapsed: float,
           sent: bool, method: bytes, body_gone: bool) -> bool:
    """True when the attempt that just failed with ``kind`` should go to the next peer.

    ``tries_done`` counts attempts so far (this one included), ``peers`` the
    peers nginx would try at most, ``elapsed`` the seconds since the first
    attempt, ``sent`` whether request bytes reached the upstream, ``body_gone``
    whether request body bytes were streamed and cannot be sent again.
    """
    limit = min(policy.tries, peers) if policy.tries else peers
    if tries_done >= limit:
        return False
    need = kind
    if sent and method in NON_IDEMPOTENT_METHODS:
        need |= NON_IDEMPOTENT
    if policy.mask & need != need:
        return False
    if body_gone:
        return False
    return not (policy.timeout and elapsed >= policy.timeout)
