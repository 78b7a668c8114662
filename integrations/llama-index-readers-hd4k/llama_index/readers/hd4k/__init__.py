"""Images and PDFs to one LlamaIndex ``Document`` per page, transcribed by InternLM-XComposer2-4KHD
(:class:`HD4KReader`), or read back from an ``hd4k ingest`` output folder (:class:`HD4KIngestReader`)."""

from llama_index.readers.hd4k.base import HD4KIngestReader, HD4KReader

__version__ = "0.1.0"

__all__ = ["HD4KIngestReader", "HD4KReader", "__version__"]
