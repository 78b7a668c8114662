"""Typed errors for hd4k-tools.

Every error the library raises on purpose derives from :class:`HD4KError`. Messages name the problem
*and* the fix, because they are read by people at a terminal and by LLM agents that retry a tool call
with corrected arguments. Input problems also derive from :class:`ValueError` (or the closest builtin)
so that generic ``except ValueError`` code keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping

#: The audiences an error's hint can be written for: Python callers (the default, also what ``str(err)``
#: shows) and the ``hd4k`` command line.
PYTHON = "python"
CLI = "cli"


class HD4KError(Exception):
    """Base class of every error raised by hd4k-tools.

    The message names the problem; the fix often depends on who reads it (``HD4K.from_pretrained(DIR)``
    in Python, ``--model DIR`` on the command line). Such an error carries one hint per audience in
    ``hints`` (``{"python": ..., "cli": ...}``) and the caller picks one with :meth:`render`; ``str(err)``
    is the message with the Python hint, so Python callers, agents and logs see what they can act on.
    """

    def __init__(self, *args: object, hints: Mapping[str, str] | None = None) -> None:
        super().__init__(*args)
        self.hints: dict[str, str] = dict(hints or {})

    def render(self, audience: str = PYTHON) -> str:
        """The message with the hint for ``audience`` (``"python"`` or ``"cli"``; the Python hint when
        there is none for ``audience``, nothing when there is none at all)."""
        base = super().__str__()
        hints = getattr(self, "hints", {})  # absent on an instance built without __init__ (copy, unpickle)
        hint = hints.get(audience, hints.get(PYTHON, ""))
        return f"{base} {hint}" if hint else base

    def __str__(self) -> str:
        return self.render(PYTHON)


def short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)`` for error messages: at most ``limit`` characters, and safe for ints too long to
    print (Python refuses ``str()`` of 4,300+ digit ints) or objects whose repr fails."""
    try:
        text = repr(value)
    except Exception:
        return f"<a {type(value).__name__} that cannot be printed>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# Input: images, documents, URLs
# ----------------------------------------------------------------------------------------------------
class InputError(HD4KError, ValueError):
    """The image or document handed to us cannot be used."""


class ConflictingOptionsError(InputError):
    """The same option was given twice (e.g. ``max_new_tokens=`` and ``generation={"max_new_tokens": ...}``)."""


class InvalidRegionError(InputError):
    """A ``region`` box that is not ``[x0, y0, x1, y1]`` page fractions with ``0 <= x0 < x1 <= 1``."""


class EmptyInputError(InputError):
    """A 0-byte file, empty bytes or an empty string."""


class ImageNotFoundError(InputError, FileNotFoundError):
    """A path that does not exist or is not a regular file."""


class CorruptImageError(InputError):
    """The data claims to be an image but cannot be decoded (truncated, damaged)."""


class UnsupportedFormatError(InputError):
    """The data is not an image format we read (e.g. a text file named ``.png``)."""


class ImageTooLargeError(InputError):
    """The image has more pixels than allowed (a decompression bomb or simply too big)."""


class FileTooLargeError(InputError):
    """The encoded file or download is larger than the byte limit."""


class PathNotAllowedError(InputError, PermissionError):
    """A path resolves (symlinks followed) outside the allowed root directories."""


class RequestTooLargeError(InputError):
    """One request carries more images, or more pixels in all, than allowed (checked before decoding)."""


class InvalidBase64Error(InputError):
    """A base64 string that does not decode."""


class InvalidDataURLError(InputError):
    """A ``data:`` URL that is malformed, not base64, or not an image/PDF media type."""


class URLNotAllowedError(InputError, PermissionError):
    """URL input is disabled, the scheme is not http(s), or the host is a private address."""


class URLFetchError(InputError, ConnectionError):
    """A URL could not be fetched: unreachable, timed out, or answered with an error status."""


class InvalidHDNumError(InputError):
    """An ``hd_num`` that is not a positive integer or ``"auto"``."""


class HDNumOverBudgetError(InvalidHDNumError):
    """A per-request ``hd_num`` above a serving engine's budget (the hd_num its caches were sized for)."""


class PDFError(InputError):
    """A PDF that cannot be rendered: corrupt, encrypted, too many pages, bad page range."""


class EncryptedPDFError(PDFError):
    """A password-protected PDF."""


class PageRangeError(PDFError):
    """Pages requested that the document does not have."""


class MissingDependencyError(HD4KError, ImportError):
    """An optional extra (``pdf``, ``serve``, ``langchain``...) is not installed."""


# ----------------------------------------------------------------------------------------------------
# Model, checkpoint, generation
# ----------------------------------------------------------------------------------------------------
class ModelError(HD4KError):
    """Problems with the model itself."""


class CheckpointError(ModelError):
    """A checkpoint folder or file that does not match the expected layout (keys, shapes, files)."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A model folder or hub id that cannot be found (offline, or no such repository)."""


class HubAuthError(ModelError, PermissionError):
    """The Hugging Face Hub refused the request (401/403: a missing or invalid token, a gated or private
    repository)."""


class DeviceError(ModelError):
    """A device or quantisation request the machine cannot satisfy (e.g. 4-bit without CUDA)."""


class ContextOverflowError(ModelError, ValueError):
    """The prompt (text plus image tokens) does not fit the model's context."""


class CancelledError(HD4KError):
    """Long work (generation, PDF pages, model loading) was cancelled through its ``cancel`` event."""


class OutputParseError(HD4KError, ValueError):
    """The model's text could not be parsed into the requested structure (table, JSON schema)."""


class TableParseError(OutputParseError):
    """The chart task asked for a table and the model did not produce one."""


# ----------------------------------------------------------------------------------------------------
# Remote engines
# ----------------------------------------------------------------------------------------------------
class RemoteError(HD4KError):
    """An OpenAI-compatible server failed or answered with an error."""


class RemoteConnectionError(RemoteError, ConnectionError):
    """The server could not be reached or dropped the connection (after retries)."""


class RemoteResponseError(RemoteError):
    """The server answered with an error status or a malformed body."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


# ----------------------------------------------------------------------------------------------------
# Corpus ingestion (hd4k ingest)
# ----------------------------------------------------------------------------------------------------
class IngestError(HD4KError):
    """``hd4k ingest`` cannot go on: an unusable output folder or a Ray cluster it cannot join."""
