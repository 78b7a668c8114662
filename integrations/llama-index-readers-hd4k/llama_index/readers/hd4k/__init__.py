"""Images and PDFs to one LlamaIndex ``Document`` per page, transcribed by InternLM-XComposer2-4KHD."""

from llama_index.readers.hd4k.base import HD4KReader

__version__ = "0.1.0"

__all__ = ["HD4KReader", "__version__"]
