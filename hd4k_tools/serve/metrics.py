"""Server metrics in the Prometheus text exposition format (``GET /metrics``), without a dependency.

One :class:`ServerMetrics` per app (no global registry). It counts requests by route and status, tracks
the requests in flight and the queue depth (accepted generation requests that have not produced their
first token yet: waiting for the model or in prefill), observes time to first token and decode speed in
histograms, and counts prompt/completion/image tokens. Cache statistics (vision-embedding cache, prefix KV
cache) are read from the runner when it has them (``runner.embedding_cache`` / ``runner.prefix_cache``
with ``stats()``, as :class:`~hd4k_tools.runtime.local.LocalRunner` does).

Time to first token: measured for streamed answers (request accepted to first delta); for whole answers it
is the wall time up to the start of decoding (wall time minus the runner's ``decode_s``).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hd4k_tools.results import Timings, Usage

__all__ = ["CONTENT_TYPE", "KNOWN_METHODS", "UNMATCHED_PATH", "Histogram", "ServerMetrics", "cache_stats"]

#: The media type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
_DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: HTTP methods counted under their own name; any other method name is counted as ``other``, so a client
#: cannot grow the series without bound (HTTP allows any token as a method).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The ``path`` label of requests no route matched.
UNMATCHED_PATH = "(unmatched)"


def cache_stats(runner: Any) -> dict[str, dict[str, int]]:
    """``{"vision_embeddings": {...}, "prefix_kv": {...}}`` for a runner with those caches (else ``{}``)."""
    out: dict[str, dict[str, int]] = {}
    for name, attr in (("vision_embeddings", "embedding_cache"), ("prefix_kv", "prefix_cache")):
        cache = getattr(runner, attr, None)
        stats = getattr(cache, "stats", None)
        if callable(stats):
            out[name] = dict(stats())
    return out


class Histogram:
    """A cumulative histogram (Prometheus ``histogram``) with fixed bucket bounds."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> Iterator[str]:
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            le = "+Inf" if bound == float("inf") else _num(bound)
            yield f'{name}_bucket{{le="{le}"}} {running}'
        yield f"{name}_sum {_num(self.total)}"
        yield f"{name}_count {self.count}"


def _num(value: float) -> str:
    f = float(value)
    return str(int(f)) if f.is_integer() and abs(f) < 1e15 else repr(f)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ServerMetrics:
    """Thread-safe counters of one server; :meth:`render` gives the exposition text."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.in_flight = 0
        self.queued = 0
        self.ttft = Histogram(_TTFT_BUCKETS)
        self.decode_tps = Histogram(_TPS_BUCKETS)
        self.duration = Histogram(_DURATION_BUCKETS)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.image_tokens = 0
        self.structured_retries = 0

    # -- recording -----------------------------------------------------------------------------------
    def record_request(self, method: str, path: str, status: int, duration_s: float) -> None:
        """Count one request. ``path`` must be a route template (or :data:`UNMATCHED_PATH`), never the raw
        path; a method outside :data:`KNOWN_METHODS` is counted as ``other``."""
        method = method if method in KNOWN_METHODS else "other"
        status = status if 100 <= status <= 599 else 0
        with self._lock:
            key = (method, path, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            if path.startswith("/v1/chat/") or path == "/v1/completions":
                self.duration.observe(duration_s)

    def start_generation(self) -> None:
        """A generation request was accepted: in flight, and queued until :meth:`first_token`."""
        with self._lock:
            self.in_flight += 1
            self.queued += 1

    def end_generation(self) -> None:
        """The generation request is over (answered, failed or cancelled)."""
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)

    @contextmanager
    def generation(self) -> Iterator[None]:
        """:meth:`start_generation` ... :meth:`end_generation` around a block."""
        self.start_generation()
        try:
            yield
        finally:
            self.end_generation()

    def first_token(self, seconds: float) -> None:
        """The request left the queue: its first token came ``seconds`` after it was accepted."""
        with self._lock:
            self.queued = max(0, self.queued - 1)
            self.ttft.observe(seconds)

    def dequeued(self) -> None:
        """The request left the queue without a first token (an error, a cancel)."""
        with self._lock:
            self.queued = max(0, self.queued - 1)

    def finished(self, usage: Usage, timings: Timings) -> None:
        with self._lock:
            self.prompt_tokens += usage.prompt_tokens
            self.completion_tokens += usage.completion_tokens
            self.image_tokens += usage.image_tokens
            if timings.decode_tokens_per_s > 0:
                self.decode_tps.observe(timings.decode_tokens_per_s)

    def structured_retry(self) -> None:
        with self._lock:
            self.structured_retries += 1

    @property
    def queue_depth(self) -> int:
        return self.queued

    # -- exposition ----------------------------------------------------------------------------------
    def render(self, runner: Any) -> str:
        """The metrics (and the runner's cache statistics) in the Prometheus text format."""
        caches = cache_stats(runner)
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        with self._lock:
            head("hd4k_info", "gauge", "The served model.")
            out.append(f'hd4k_info{{model="{_label(self.model)}"}} 1')
            head("hd4k_requests_total", "counter", "HTTP requests by method, path and status.")
            for (method, path, status), n in sorted(self.requests.items()):
                out.append(
                    f'hd4k_requests_total{{method="{_label(method)}",path="{_label(path)}",status="{status}"}} {n}'
                )
            head("hd4k_requests_in_flight", "gauge", "Generation requests being answered.")
            out.append(f"hd4k_requests_in_flight {self.in_flight}")
            head("hd4k_queue_depth", "gauge", "Generation requests accepted that have no first token yet.")
            out.append(f"hd4k_queue_depth {self.queued}")
            head("hd4k_time_to_first_token_seconds", "histogram", "Request accepted to first token.")
            out.extend(self.ttft.lines("hd4k_time_to_first_token_seconds"))
            head("hd4k_decode_tokens_per_second", "histogram", "Decode speed of each answer.")
            out.extend(self.decode_tps.lines("hd4k_decode_tokens_per_second"))
            head("hd4k_request_duration_seconds", "histogram", "Wall time of chat completion requests.")
            out.extend(self.duration.lines("hd4k_request_duration_seconds"))
            head("hd4k_tokens_total", "counter", "Tokens processed, by kind (prompt includes image).")
            out.append(f'hd4k_tokens_total{{kind="prompt"}} {self.prompt_tokens}')
            out.append(f'hd4k_tokens_total{{kind="image"}} {self.image_tokens}')
            out.append(f'hd4k_tokens_total{{kind="completion"}} {self.completion_tokens}')
            head("hd4k_structured_output_retries_total", "counter", "response_format answers that needed a retry.")
            out.append(f"hd4k_structured_output_retries_total {self.structured_retries}")
        if caches:
            for metric, key, kind, text in (
                ("hd4k_cache_hits_total", "hits", "counter", "Cache hits."),
                ("hd4k_cache_misses_total", "misses", "counter", "Cache misses."),
                ("hd4k_cache_evictions_total", "evictions", "counter", "Cache evictions."),
                ("hd4k_cache_entries", "entries", "gauge", "Entries in the cache."),
                ("hd4k_cache_bytes", "current_bytes", "gauge", "Bytes held by the cache."),
                ("hd4k_cache_max_bytes", "max_bytes", "gauge", "Byte budget of the cache."),
            ):
                head(metric, kind, text)
                for cache, stats in caches.items():
                    out.append(f'{metric}{{cache="{cache}"}} {int(stats.get(key, 0))}')
            head("hd4k_cache_hit_ratio", "gauge", "hits / (hits + misses) since start (0 before any lookup).")
            for cache, stats in caches.items():
                looked = stats.get("hits", 0) + stats.get("misses", 0)
                ratio = stats.get("hits", 0) / looked if looked else 0.0
                out.append(f'hd4k_cache_hit_ratio{{cache="{cache}"}} {_num(ratio)}')
        return "\n".join(out) + "\n"
