"""LlamaIndex integration for hd4k-tools (InternLM-XComposer2-4KHD, high-resolution vision).

* :class:`HD4KToolSpec`: ``read_document``, ``answer_chart_question`` and ``describe_image`` as agent
  tools (``FunctionAgent``, ``ReActAgent``...), with untrusted-argument rules.
* :class:`HD4KMultiModalLLM`: a chat ``LLM`` that reads ``ImageBlock``\\ s (query engines, chat engines,
  ``structured_predict``).
* :class:`HD4KReader`: images and PDFs to one ``Document`` per page for any index.
* :class:`HD4KIngestReader`: the output folder of ``hd4k ingest`` as ``Document``\\ s.
"""

from llama_index_hd4k.llms import HD4KMultiModalLLM, json_instruction, parse_structured_output
from llama_index_hd4k.readers import HD4KIngestReader, HD4KReader
from llama_index_hd4k.tools import HD4KFunctionTool, HD4KToolSpec

__all__ = [
    "HD4KFunctionTool",
    "HD4KIngestReader",
    "HD4KMultiModalLLM",
    "HD4KReader",
    "HD4KToolSpec",
    "json_instruction",
    "parse_structured_output",
]
