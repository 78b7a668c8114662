"""A careful HTTP(S) fetcher for images and PDFs named by URL (server-side request forgery guarded).

What it guarantees, for each request and each redirect hop:

* only ``http`` and ``https``; URL input must be switched on (``ImagePolicy.allow_urls``);
* the host is resolved once, and the request is refused if *any* resolved address is loopback,
  private, link-local, reserved, multicast, unspecified or otherwise not globally routable (IPv4-mapped
  IPv6 addresses are unwrapped first), unless ``allow_private_urls`` is set or the host is listed in
  ``allowed_private_hosts``;
* the connection then goes to an address from that same check: the network layer never resolves the
  name again, so DNS rebinding between check and connect is closed (for https the certificate is still
  verified against the host name);
* redirects are followed by hand, at most ``max_redirects``, each hop checked again;
* the body is streamed, never decompressed (``Accept-Encoding: identity``), and abandoned once it
  passes ``max_bytes``;
* one deadline, ``url_timeout`` seconds, bounds everything: DNS, connect, TLS and every socket read
  get only the time left, so a server that drips one byte at a time cannot hold us.

Residual risk: the system resolver may be slow past the deadline; we stop waiting for it (the lookup
finishes in a daemon thread). Proxies and ``.netrc`` from the environment are ignored.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from hd4k_tools.errors import FileTooLargeError, HD4KError, URLFetchError, URLNotAllowedError
from hd4k_tools.inputs.http_transport import CoreTransport, DeadlineBackend
from hd4k_tools.inputs.policy import ImagePolicy

__all__ = ["FetchedURL", "address_refusal", "embedded_ipv4", "fetch_url", "redact_url"]

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "hd4k-tools (+https://github.com/hd4k-tools)"
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpx.HTTPError,
    OSError,
)


@dataclass(frozen=True)
class FetchedURL:
    """A downloaded body.

    Attributes:
        data: the body bytes (at most ``max_bytes``).
        url: the final URL after redirects, credentials removed.
        content_type: the ``Content-Type`` header, if any.
    """

    data: bytes
    url: str
    content_type: str | None


def redact_url(url: str | httpx.URL) -> str:
    """``url`` without ``user:password@``, for messages and names. Never raises, even for a malformed
    URL (``http://[::1``), since it runs while reporting errors."""
    text = str(url)
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:  # unbalanced or invalid bracketed host
        return _CREDENTIALS_RE.sub("//", text)
    if "@" not in parts.netloc:
        return text
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


_CREDENTIALS_RE = re.compile(r"//[^/?#]*@")

# IPv6 prefixes that carry an IPv4 address in their last 32 bits (RFC 6052 NAT64 well-known and
# local-use prefixes, RFC 2765 IPv4-translated) plus the deprecated site-local range (RFC 3879).
_NAT64_PREFIXES = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_TRANSLATED_PREFIX = ipaddress.IPv6Network("::ffff:0:0:0/96")
_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")
# ISATAP interface identifiers: ::0:5efe:a.b.c.d and ::200:5efe:a.b.c.d (RFC 5214), in any /64.
_ISATAP_IDS = (0x00005EFE, 0x02005EFE)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address embeds: IPv4-mapped, IPv4-compatible (``::a.b.c.d``),
    IPv4-translated, NAT64 (``64:ff9b::/96``, ``64:ff9b:1::/48``), 6to4 (``2002::/16``), Teredo
    (``2001::/32``: server and client) and ISATAP."""
    value = int(ip)
    low = ipaddress.IPv4Address(value & 0xFFFFFFFF)
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if value >> 32 == 0 and value > 1:  # IPv4-compatible ::a.b.c.d (not :: or ::1)
        found.append(low)
    if ip in _TRANSLATED_PREFIX or any(ip in net for net in _NAT64_PREFIXES):
        found.append(low)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if (value >> 32) & 0xFFFFFFFF in _ISATAP_IDS:
        found.append(low)
    return found


def address_refusal(address: str) -> str | None:
    """Why ``address`` (an IP literal) must not be fetched from, or ``None`` if it is public. IPv6
    addresses that embed an IPv4 address are refused if the embedded address would be."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is a.b.c.d on a dual-stack socket
            return _refusal(ip.ipv4_mapped)
        if ip in _SITE_LOCAL:
            return f"{ip}, a site-local address"
        for inner in embedded_ipv4(ip):
            refusal = _refusal(inner)
            if refusal:
                return f"{ip}, which embeds {refusal}"
    return _refusal(ip)


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    # Most specific first: Python also counts link-local and unspecified ranges as "private".
    checks = (
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("not globally routable", not ip.is_global),
    )
    for label, hit in checks:
        if hit:
            return f"{ip}, a {label} address"
    return None


def fetch_url(url: str, *, policy: ImagePolicy) -> FetchedURL:
    """Download ``url`` under ``policy`` (see the module docstring for every check made).

    Raises:
        URLNotAllowedError: URLs are off, the scheme is not http(s), or a host is private.
        URLFetchError: DNS failure, refused connection, timeout, too many redirects, non-2xx status.
        FileTooLargeError: the body is larger than ``policy.max_bytes``.
    """
    if not policy.allow_urls:
        raise URLNotAllowedError(
            f"URL input is disabled, so {redact_url(url)} was not fetched; download the file and pass "
            "its path or bytes, or enable URLs with allow_urls=True."
        )
    deadline = time.monotonic() + policy.url_timeout
    current, previous = _parse(url), None
    for _ in range(policy.max_redirects + 1):
        try:
            result = _fetch_once(current, policy, deadline)
        except URLNotAllowedError as err:
            if previous is None:
                raise
            raise URLNotAllowedError(f"{redact_url(previous)} redirected to a refused URL: {err}") from err
        if isinstance(result, FetchedURL):
            return result
        try:
            current, previous = _parse(str(current.join(result))), current
        except URLNotAllowedError as err:
            raise URLNotAllowedError(f"{redact_url(current)} redirected to a refused URL: {err}") from err
    raise URLFetchError(
        f"{redact_url(url)} redirected more than max_redirects={policy.max_redirects} times; pass the "
        "final URL directly, or raise max_redirects."
    )


def _parse(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as err:
        raise URLFetchError(f"{redact_url(url)} is not a valid URL ({err}); check its spelling.") from err
    if parsed.scheme not in ("http", "https"):
        raise URLNotAllowedError(
            f"URL scheme {parsed.scheme!r} is not supported ({redact_url(url)}); use http:// or https://."
        )
    if not parsed.host:
        raise URLFetchError(f"{redact_url(url)} has no host; pass a full http(s):// URL.")
    return parsed


def _fetch_once(url: httpx.URL, policy: ImagePolicy, deadline: float) -> FetchedURL | str:
    """One request. Returns the body, or the ``Location`` of a redirect."""
    shown = redact_url(url)
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = _resolve(host, port, deadline, shown)
    _check_addresses(host, addresses, policy, shown)
    transport = _PinnedTransport(addresses, deadline)
    headers = {
        "User-Agent": _USER_AGENT,
        "Accept": "image/*,application/pdf,*/*;q=0.5",
        # Compressed bodies could expand far past max_bytes inside one chunk; never ask for them.
        "Accept-Encoding": "identity",
    }
    try:
        with (
            httpx.Client(transport=transport, follow_redirects=False, trust_env=False) as client,
            client.stream("GET", url, headers=headers, timeout=policy.url_timeout) as response,
        ):
            if response.status_code in _REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise URLFetchError(f"{shown} answered {response.status_code} without a Location.")
                return location
            if not 200 <= response.status_code < 300:
                raise URLFetchError(
                    f"{shown} answered HTTP {response.status_code} {response.reason_phrase}; check the "
                    "URL, or download the file and pass its path."
                )
            data = _read_body(response, policy, deadline, shown)
            return FetchedURL(data=data, url=shown, content_type=response.headers.get("content-type"))
    except HD4KError:
        raise  # our own errors; URLFetchError is an OSError and must not be wrapped again
    except _NETWORK_ERRORS as err:
        raise URLFetchError(_network_reason(shown, err, policy)) from err


def _read_body(response: httpx.Response, policy: ImagePolicy, deadline: float, shown: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise _too_big(shown, f"{int(declared):,} bytes declared", policy)
    chunks: list[bytes] = []
    received = 0
    for chunk in response.iter_raw():
        received += len(chunk)
        if received > policy.max_bytes:
            raise _too_big(shown, f"more than {policy.max_bytes:,} bytes", policy)
        if time.monotonic() > deadline:
            raise httpcore.ReadTimeout("the overall deadline passed")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_big(shown: str, size: str, policy: ImagePolicy) -> FileTooLargeError:
    return FileTooLargeError(
        f"{shown} is too large ({size}; the limit is max_bytes={policy.max_bytes:,}); the download was "
        "stopped. Use a smaller file, or raise max_bytes in the ImagePolicy."
    )


def _network_reason(shown: str, err: BaseException, policy: ImagePolicy) -> str:
    if isinstance(err, httpcore.TimeoutException | httpx.TimeoutException | TimeoutError):
        return (
            f"{shown} did not finish within url_timeout={policy.url_timeout:g} s; try again later, "
            "raise url_timeout, or download the file and pass its path."
        )
    if isinstance(err, httpcore.ConnectError | httpx.ConnectError | ConnectionRefusedError):
        reason = "the connection failed"
    else:
        reason = type(err).__name__
    detail = str(err).strip()
    suffix = f": {detail}" if detail else ""
    return f"could not fetch {shown} ({reason}{suffix}); check the URL and that the server is up."


# ----------------------------------------------------------------------------------------------------
# Resolution and the address check
# ----------------------------------------------------------------------------------------------------
def _resolve(host: str, port: int, deadline: float, shown: str) -> list[str]:
    """``getaddrinfo`` bounded by the deadline; returns unique addresses in resolver order."""
    outcome: dict[str, Any] = {}

    def lookup() -> None:
        try:
            outcome["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as err:
            outcome["error"] = err

    worker = threading.Thread(target=lookup, name="hd4k-dns", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive():
        raise URLFetchError(f"resolving the host of {shown} timed out; try again or raise url_timeout.")
    if "error" in outcome:
        err = outcome["error"]
        raise URLFetchError(f"cannot resolve the host of {shown} ({err}); check the host name and your DNS.") from err
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in outcome["infos"]:
        if sockaddr[0] not in addresses:
            addresses.append(str(sockaddr[0]))
    if not addresses:
        raise URLFetchError(f"the host of {shown} resolved to no address; check the host name.")
    return addresses


def _check_addresses(host: str, addresses: Iterable[str], policy: ImagePolicy, shown: str) -> None:
    if policy.allow_private_urls or host.strip("[]").rstrip(".").lower() in policy.allowed_private_hosts:
        return
    for address in addresses:
        refusal = address_refusal(address)
        if refusal:
            raise URLNotAllowedError(
                f"{shown} was not fetched: its host resolves to {refusal}. Only public hosts are "
                "fetched; set allow_private_urls=True or list the host in allowed_private_hosts if "
                "you trust it."
            )


# ----------------------------------------------------------------------------------------------------
# Transport: connect only to the checked addresses, every socket operation bounded by the deadline
# ----------------------------------------------------------------------------------------------------
class _PinnedTransport(CoreTransport):
    """An httpx transport over httpcore that connects only to the checked ``addresses`` (whatever host the URL
    names) and bounds every socket operation by ``deadline``."""

    def __init__(self, addresses: list[str], deadline: float) -> None:
        super().__init__(DeadlineBackend(lambda: deadline, addresses))
