"""LlamaIndex integration for hd4k-tools (InternLM-XComposer2-4KHD, high-resolution vision), under the
import name used before the split into LlamaIndex's namespace. The classes live in:

* ``llama_index.tools.hd4k`` (``llama-index-tools-hd4k``): :class:`HD4KToolSpec`, the three agent tools;
* ``llama_index.llms.hd4k`` (``llama-index-llms-hd4k``): :class:`HD4KMultiModalLLM`, a chat ``LLM`` that
  reads ``ImageBlock``\\ s;
* ``llama_index.readers.hd4k`` (``llama-index-readers-hd4k``): :class:`HD4KReader`, one ``Document`` per page, and
  :class:`HD4KIngestReader`, an ``hd4k ingest`` output folder as ``Document``\\ s.
"""

from llama_index.llms.hd4k import HD4KMultiModalLLM, json_instruction, parse_structured_output
from llama_index.readers.hd4k import HD4KIngestReader, HD4KReader
from llama_index.tools.hd4k import HD4KFunctionTool, HD4KToolSpec

__version__ = "0.1.0"

__all__ = [
    "HD4KFunctionTool",
    "HD4KIngestReader",
    "HD4KMultiModalLLM",
    "HD4KReader",
    "HD4KToolSpec",
    "__version__",
    "json_instruction",
    "parse_structured_output",
]
