"""The hd4k tools (read a document, answer a chart question, describe an image) for LlamaIndex agents."""

from llama_index.tools.hd4k.base import HD4KFunctionTool, HD4KToolSpec

__version__ = "0.1.0"

__all__ = ["HD4KFunctionTool", "HD4KToolSpec", "__version__"]
