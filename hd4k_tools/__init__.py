"""hd4k-tools: let agents see high-resolution documents, charts and images.

The public API is re-exported here lazily, so ``import hd4k_tools`` stays cheap (torch and the model
are imported only when a name that needs them is used). Integrations import from this module only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "HD4K": "hd4k_tools.hd4k",
    "Runner": "hd4k_tools.runner",
    "LocalRunner": "hd4k_tools.runner",
    "RemoteRunner": "hd4k_tools.remote",
    "Message": "hd4k_tools.runner",
    "GenerationRequest": "hd4k_tools.runner",
    "RunnerResult": "hd4k_tools.runner",
    "TextStream": "hd4k_tools.runner",
    "GenerationConfig": "hd4k_tools.generation_config",
    "TaskResult": "hd4k_tools.tasks",
    "ChartResult": "hd4k_tools.tasks",
    "ChartTable": "hd4k_tools.tasks",
    "DocumentResult": "hd4k_tools.tasks",
    "PlanSummary": "hd4k_tools.tasks",
    "Timings": "hd4k_tools.tasks",
    "Usage": "hd4k_tools.tasks",
    "TASKS": "hd4k_tools.tasks",
    "errors": "hd4k_tools.errors",
    "HD4KError": "hd4k_tools.errors",
    "InputError": "hd4k_tools.errors",
    "ContextOverflowError": "hd4k_tools.errors",
    "OutputParseError": "hd4k_tools.errors",
    "CancelledError": "hd4k_tools.errors",
    "image_content_hash": "hd4k_tools.imaging",
    "to_data_url": "hd4k_tools.imaging",
    "read_source_bytes": "hd4k_tools.imaging",
    "ImageSource": "hd4k_tools.imaging",
    "make_tiny_checkpoint": "hd4k_tools.testing",
    "resolve_hd_num": "hd4k_tools.tiling",
    "StopFilter": "hd4k_tools.stops",
    "cut_at_stops": "hd4k_tools.stops",
    "page_count": "hd4k_tools.pdf",
    "parse_page_range": "hd4k_tools.pdf",
    "render_pages": "hd4k_tools.pdf",
    "select_pages": "hd4k_tools.pdf",
    "AgentTools": "hd4k_tools.agent_tools",
    "ToolSettings": "hd4k_tools.agent_tools",
    "ToolAnswer": "hd4k_tools.agent_tools",
    "ImageRegistry": "hd4k_tools.agent_tools",
    "TOOL_DESCRIPTIONS": "hd4k_tools.agent_tools",
    "TOOL_ARGS": "hd4k_tools.agent_tools",
    "ReadDocumentArgs": "hd4k_tools.agent_tools",
    "ChartQuestionArgs": "hd4k_tools.agent_tools",
    "DescribeImageArgs": "hd4k_tools.agent_tools",
    "error_message": "hd4k_tools.agent_tools",
    "resolve_image_argument": "hd4k_tools.agent_tools",
    "ImagePolicy": "hd4k_tools.imaging",
    "load_image": "hd4k_tools.imaging",
    "HDPlan": "hd4k_tools.tiling",
    "plan": "hd4k_tools.tiling",
    "auto_hd_num": "hd4k_tools.tiling",
    "hd_transform": "hd4k_tools.tiling",
    "to_model_inputs": "hd4k_tools.tiling",
    "draw_plan": "hd4k_tools.tiling",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:  # pragma: no cover
    from hd4k_tools import errors
    from hd4k_tools.agent_tools import (
        TOOL_ARGS,
        TOOL_DESCRIPTIONS,
        AgentTools,
        ChartQuestionArgs,
        DescribeImageArgs,
        ImageRegistry,
        ReadDocumentArgs,
        ToolAnswer,
        ToolSettings,
        error_message,
        resolve_image_argument,
    )
    from hd4k_tools.errors import CancelledError, ContextOverflowError, HD4KError, InputError, OutputParseError
    from hd4k_tools.generation_config import GenerationConfig
    from hd4k_tools.hd4k import HD4K
    from hd4k_tools.imaging import (
        ImagePolicy,
        ImageSource,
        image_content_hash,
        load_image,
        read_source_bytes,
        to_data_url,
    )
    from hd4k_tools.pdf import page_count, parse_page_range, render_pages, select_pages
    from hd4k_tools.remote import RemoteRunner
    from hd4k_tools.runner import GenerationRequest, LocalRunner, Message, Runner, RunnerResult, TextStream
    from hd4k_tools.stops import StopFilter, cut_at_stops
    from hd4k_tools.tasks import TASKS, ChartResult, ChartTable, DocumentResult, PlanSummary, TaskResult, Timings, Usage
    from hd4k_tools.testing import make_tiny_checkpoint
    from hd4k_tools.tiling import HDPlan, auto_hd_num, draw_plan, hd_transform, plan, resolve_hd_num, to_model_inputs


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hd4k_tools' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if name == "errors" else getattr(mod, name)
    globals()[name] = value
    return value
