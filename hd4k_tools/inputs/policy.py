"""Limits for untrusted input (:class:`ImagePolicy`): sizes, allowed roots, URL rules. Passed down
explicitly to every reader (images, URL fetches, PDFs), never global."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ImagePolicy:
    """Limits for untrusted input. Passed down explicitly, never global.

    Attributes:
        max_pixels: largest ``width * height`` accepted; checked from the header, before decoding.
        max_bytes: largest encoded input (file, bytes, base64 payload, download), in bytes.
        allowed_roots: ``None`` accepts any path; otherwise a path must resolve (symlinks followed)
            inside one of these directories.
        allow_urls: accept ``http(s)://`` URLs at all.
        allow_private_urls: accept URLs whose host resolves to a loopback, private, link-local,
            reserved, multicast or unspecified address.
        url_timeout: seconds for the whole download (DNS, connect, redirects and body together).
        max_redirects: redirects followed before giving up.
        allowed_private_hosts: host names or IP literals (as written in the URL) exempt from the
            private-address check, e.g. ``frozenset({"127.0.0.1"})`` for a local test server.
        max_frames: most frames (animation frames, pages, embedded icons) an image file may declare.
        max_images: most images one request (one call, one server request) may carry.
        max_total_pixels: largest sum of ``width * height`` over one request's images, checked from
            the headers before any image is decoded.
    """

    max_pixels: int = 64_000_000
    max_bytes: int = 64 * 2**20
    allowed_roots: tuple[Path, ...] | None = None
    allow_urls: bool = False
    allow_private_urls: bool = False
    url_timeout: float = 10.0
    max_redirects: int = 3
    allowed_private_hosts: frozenset[str] = field(default_factory=frozenset)
    max_frames: int = 1024
    max_images: int = 16
    max_total_pixels: int = 128_000_000

    def __post_init__(self) -> None:
        _require_positive("max_pixels", self.max_pixels)
        _require_positive("max_bytes", self.max_bytes)
        _require_positive("url_timeout", self.url_timeout)
        for name in ("max_frames", "max_images", "max_total_pixels"):
            _require_positive(name, getattr(self, name))
        if isinstance(self.max_redirects, bool) or not isinstance(self.max_redirects, int):
            raise TypeError(f"max_redirects must be an int, got {self.max_redirects!r}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")
        # Normalising in a frozen dataclass needs object.__setattr__; callers may pass a list or a str.
        if self.allowed_roots is not None:
            roots = self.allowed_roots
            if isinstance(roots, str | os.PathLike):
                roots = (roots,)
            object.__setattr__(self, "allowed_roots", tuple(Path(os.fspath(r)) for r in roots))
        hosts = self.allowed_private_hosts
        if isinstance(hosts, str):
            hosts = (hosts,)
        object.__setattr__(self, "allowed_private_hosts", frozenset(normalise_host(h) for h in hosts))


def _require_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def normalise_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def resolve_policy(policy: ImagePolicy | None, overrides: dict[str, Any]) -> ImagePolicy:
    policy = policy if policy is not None else ImagePolicy()
    if not overrides:
        return policy
    known = {f.name for f in dataclasses.fields(ImagePolicy)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(
            f"unknown ImagePolicy field(s) {', '.join(unknown)}; valid names are {', '.join(sorted(known))}"
        )
    return dataclasses.replace(policy, **overrides)


__all__ = ["ImagePolicy", "normalise_host", "resolve_policy"]
