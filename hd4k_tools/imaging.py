"""Public home of image loading (documented as ``hd4k_tools.imaging``).

The implementation lives in :mod:`hd4k_tools.inputs.images`; this module re-exports its public names.
"""

from hd4k_tools.inputs.images import (
    SUPPORTED_FORMATS,
    ImagePolicy,
    ImageSource,
    SourceBytes,
    image_content_hash,
    load_image,
    read_source_bytes,
    sniff_kind,
    to_data_url,
)

__all__ = [
    "SUPPORTED_FORMATS",
    "ImagePolicy",
    "ImageSource",
    "SourceBytes",
    "image_content_hash",
    "load_image",
    "read_source_bytes",
    "sniff_kind",
    "to_data_url",
]
