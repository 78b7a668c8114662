"""InternLM-XComposer2-4KHD (hd4k-tools) as a LlamaIndex chat ``LLM`` that reads ``ImageBlock``\\ s."""

from llama_index.llms.hd4k.base import HD4KMultiModalLLM, json_instruction, parse_structured_output

__version__ = "0.1.0"

__all__ = ["HD4KMultiModalLLM", "__version__", "json_instruction", "parse_structured_output"]
