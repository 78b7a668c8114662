"""LangChain integration of hd4k-tools (InternLM-XComposer2-4KHD: high-resolution documents, charts
and images).

- :class:`HD4KToolkit` and the tools :class:`HD4KReadDocumentTool`, :class:`HD4KChartQuestionTool`,
  :class:`HD4KDescribeImageTool`: let a tool-calling agent look at documents and images.
- :class:`ChatHD4K`: the model itself as a multimodal chat model (no tool calling).
- :class:`HD4KDocumentLoader`: documents and PDFs to ``Document`` objects, one per page.
- :class:`HD4KIngestLoader`: the output folder of ``hd4k ingest`` as ``Document`` objects.

Names are imported lazily, so ``import langchain_hd4k`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "ChatHD4K": "langchain_hd4k.chat_models",
    "HD4KDocumentLoader": "langchain_hd4k.document_loaders",
    "HD4KIngestLoader": "langchain_hd4k.ingest_loader",
    "HD4KToolkit": "langchain_hd4k.tools",
    "HD4KBaseTool": "langchain_hd4k.tools",
    "HD4KReadDocumentTool": "langchain_hd4k.tools",
    "HD4KChartQuestionTool": "langchain_hd4k.tools",
    "HD4KDescribeImageTool": "langchain_hd4k.tools",
}

__all__ = [
    "ChatHD4K",
    "HD4KBaseTool",
    "HD4KChartQuestionTool",
    "HD4KDescribeImageTool",
    "HD4KDocumentLoader",
    "HD4KIngestLoader",
    "HD4KReadDocumentTool",
    "HD4KToolkit",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from langchain_hd4k.chat_models import ChatHD4K
    from langchain_hd4k.document_loaders import HD4KDocumentLoader
    from langchain_hd4k.ingest_loader import HD4KIngestLoader
    from langchain_hd4k.tools import (
        HD4KBaseTool,
        HD4KChartQuestionTool,
        HD4KDescribeImageTool,
        HD4KReadDocumentTool,
        HD4KToolkit,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'langchain_hd4k' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
