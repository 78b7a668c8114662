"""The URL guard (issue 12, item 6): every IPv6 form that embeds a private or loopback IPv4 address, and
deprecated site-local IPv6, is refused before any connection; public ones stay allowed."""

from __future__ import annotations

import pytest

from hd4k_tools import ImagePolicy, errors, load_image
from hd4k_tools.inputs.urlfetch import address_refusal, embedded_ipv4, fetch_url

REFUSED = [
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2002:c0a8:101::",  # 6to4 of 192.168.1.1
    "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254 (cloud metadata)
    "fec0::1",  # site-local
    "fed0:1:2::3",  # site-local
    "feff::1",  # site-local range end
    "::127.0.0.1",  # IPv4-compatible
    "::10.1.2.3",  # IPv4-compatible
    "::169.254.169.254",  # IPv4-compatible metadata
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:192.168.0.1",  # IPv4-mapped
    "::ffff:0:127.0.0.1",  # IPv4-translated (SIIT)
    "64:ff9b::127.0.0.1",  # NAT64 well-known prefix
    "64:ff9b::10.0.0.1",
    "64:ff9b:1::a00:1",  # NAT64 local-use prefix
    "64:ff9b:1:ffff::7f00:1",
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "2001:0:a00:1::1",  # Teredo, server 10.0.0.1
    "fe80::5efe:10.0.0.1",  # ISATAP
    "2607:f8b0::5efe:127.0.0.1",  # ISATAP in a global prefix
    "2607:f8b0::200:5efe:192.168.1.1",  # ISATAP (universal bit)
    "::1",
    "::",
    "fe80::1%eth0",
    "fc00::1",
]
ALLOWED = ["2606:4700:4700::1111", "2001:4860:4860::8888", "::ffff:8.8.8.8", "8.8.8.8", "2002:808:808::1"]


@pytest.mark.parametrize("address", REFUSED)
def test_embedded_and_site_local_addresses_are_refused(address: str) -> None:
    assert address_refusal(address) is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_stay_allowed(address: str) -> None:
    assert address_refusal(address) is None


def test_embedded_ipv4_finds_every_form() -> None:
    import ipaddress

    assert [str(a) for a in embedded_ipv4(ipaddress.IPv6Address("2002:7f00:1::"))] == ["127.0.0.1"]
    teredo = embedded_ipv4(ipaddress.IPv6Address("2001:0:4136:e378:8000:63bf:80ff:fffe"))
    assert "127.0.0.1" in [str(a) for a in teredo]


@pytest.mark.parametrize("address", ["2002:7f00:1::", "fec0::1", "::127.0.0.1", "64:ff9b::7f00:1", "2001:0:a00:1::1"])
def test_fetch_refuses_before_connecting(address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def no_connect(*args: object, **kwargs: object) -> None:
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_connect)
    policy = ImagePolicy(allow_urls=True, url_timeout=3)
    with pytest.raises(errors.URLNotAllowedError, match=r"embeds|site-local|loopback|private|reserved"):
        fetch_url(f"http://[{address}]/a.png", policy=policy)
    with pytest.raises(errors.URLNotAllowedError):
        load_image(f"http://[{address}]:8080/a.png", policy=policy)
