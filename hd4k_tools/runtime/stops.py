"""Stop sequences over streamed text, shared by the server and the framework integrations.

The model stops on token ids (eos, ``[UNUSED_TOKEN_145]``); callers may also give stop *strings*
(OpenAI ``stop``, LangChain ``stop=``). :class:`StopFilter` turns raw text deltas into the deltas of
the final answer: leading whitespace dropped (the non-streamed answer is stripped too), text cut before
the first stop string (and the whitespace before it), and anything that may still turn out to start a
stop string — or be trailing whitespace — held back until the next delta decides. Joined, the deltas
equal :func:`cut_at_stops` of the whole text, so streamed and non-streamed answers agree.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopFilter:
    """Incremental stop-string cutting; see the module docstring."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._stops = [s for s in stops if s]
        self._buffer = ""
        self._started = False
        self.stopped = False
        """True once a stop string was seen: the caller should stop generating."""

    def feed(self, delta: str) -> str:
        """Add a raw delta; return the text now certain to be part of the answer."""
        if self.stopped or not delta:
            return ""
        if not self._started:
            delta = delta.lstrip()
            if not delta:
                return ""
            self._started = True
        self._buffer += delta
        hits = [i for i in (self._buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._buffer = self._buffer[: min(hits)].rstrip(), ""
            return out
        keep = len(self._buffer.rstrip())
        for stop in self._stops:  # hold back a suffix that could be the start of a stop string
            for n in range(min(len(stop) - 1, len(self._buffer)), 0, -1):
                if self._buffer.endswith(stop[:n]):
                    keep = min(keep, len(self._buffer) - n)
                    break
        keep = len(self._buffer[:keep].rstrip())  # whitespace before a held suffix may end the answer
        out, self._buffer = self._buffer[:keep], self._buffer[keep:]
        return out

    def finish(self) -> str:
        """The held-back text at the end of generation (trailing whitespace removed)."""
        out = "" if self.stopped else self._buffer.rstrip()
        self._buffer = ""
        return out


def cut_at_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` stripped and cut before the first stop string; and whether one was found."""
    f = StopFilter(stops)
    out = f.feed(text) + f.finish()
    return out, f.stopped
