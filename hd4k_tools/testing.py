"""Public home of the tiny random checkpoint (documented as ``hd4k_tools.testing``), and a minimal PDF writer
for test documents.

The checkpoint's implementation lives in the model family folder (:mod:`hd4k_tools.models.xcomposer2_4khd.tiny`);
this module re-exports its public names.
"""

from collections.abc import Sequence

from hd4k_tools.models.xcomposer2_4khd.tiny import (
    TINY_VOCAB_SIZE,
    make_tiny_checkpoint,
    random_model,
    tiny_config_dict,
    write_weights,
)

__all__ = ["TINY_VOCAB_SIZE", "make_tiny_checkpoint", "pdf_file", "random_model", "tiny_config_dict", "write_weights"]


def pdf_file(objects: Sequence[bytes], *, version: bytes = b"1.4", trailer: bytes = b"") -> bytes:
    """A PDF file of ``objects`` (object ``i + 1`` is ``objects[i]``; object 1 is the catalog) with its
    cross-reference table; ``trailer`` adds entries to the trailer dictionary (e.g. ``/Encrypt 4 0 R``)."""
    out = bytearray(b"%PDF-" + version + b"\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    extra = b" " + trailer if trailer else b""
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, extra, xref)
    return bytes(out)
