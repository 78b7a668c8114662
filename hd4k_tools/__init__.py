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
    "Runner": "hd4k_tools.runtime.runner",
    "LocalRunner": "hd4k_tools.runtime.local",
    "RemoteRunner": "hd4k_tools.runtime.remote",
    "Message": "hd4k_tools.runtime.runner",
    "GenerationRequest": "hd4k_tools.runtime.runner",
    "RunnerResult": "hd4k_tools.runtime.runner",
    "TextStream": "hd4k_tools.runtime.runner",
    "GenerationConfig": "hd4k_tools.runtime.generation_config",
    "TaskResult": "hd4k_tools.results",
    "ChartResult": "hd4k_tools.results",
    "ChartTable": "hd4k_tools.results",
    "DocumentResult": "hd4k_tools.results",
    "PlanSummary": "hd4k_tools.results",
    "Timings": "hd4k_tools.results",
    "Usage": "hd4k_tools.results",
    "TASKS": "hd4k_tools.tasks",
    "TaskSpec": "hd4k_tools.tasks",
    "TaskCall": "hd4k_tools.tasks",
    "TaskRegistry": "hd4k_tools.tasks",
    "DetailLoss": "hd4k_tools.zoom",
    "errors": "hd4k_tools.errors",
    "HD4KError": "hd4k_tools.errors",
    "InputError": "hd4k_tools.errors",
    "ContextOverflowError": "hd4k_tools.errors",
    "OutputParseError": "hd4k_tools.errors",
    "CancelledError": "hd4k_tools.errors",
    "image_content_hash": "hd4k_tools.inputs.images",
    "to_data_url": "hd4k_tools.inputs.images",
    "read_source_bytes": "hd4k_tools.inputs.images",
    "ImageSource": "hd4k_tools.inputs.images",
    "make_tiny_checkpoint": "hd4k_tools.models.xcomposer2_4khd.tiny",
    "resolve_hd_num": "hd4k_tools.models.xcomposer2_4khd.tiling",
    "StopFilter": "hd4k_tools.runtime.stops",
    "cut_at_stops": "hd4k_tools.runtime.stops",
    "page_count": "hd4k_tools.inputs.pdf",
    "parse_page_range": "hd4k_tools.inputs.pdf",
    "render_pages": "hd4k_tools.inputs.pdf",
    "select_pages": "hd4k_tools.inputs.pdf",
    "AgentTools": "hd4k_tools.agent_tools",
    "ToolSettings": "hd4k_tools.agent_tools",
    "ToolAnswer": "hd4k_tools.agent_tools",
    "ImageRegistry": "hd4k_tools.agent_tools",
    "TOOL_DESCRIPTIONS": "hd4k_tools.agent_tools",
    "TOOL_ARGS": "hd4k_tools.agent_tools",
    "ReadDocumentArgs": "hd4k_tools.tasks",
    "ChartQuestionArgs": "hd4k_tools.tasks",
    "DescribeImageArgs": "hd4k_tools.tasks",
    "error_message": "hd4k_tools.agent_tools",
    "invalid_arguments": "hd4k_tools.agent_tools",
    "resolve_image_argument": "hd4k_tools.agent_tools",
    "ImagePolicy": "hd4k_tools.inputs.policy",
    "load_image": "hd4k_tools.inputs.images",
    "HDPlan": "hd4k_tools.models.xcomposer2_4khd.tiling",
    "plan": "hd4k_tools.models.xcomposer2_4khd.tiling",
    "auto_hd_num": "hd4k_tools.models.xcomposer2_4khd.tiling",
    "hd_transform": "hd4k_tools.models.xcomposer2_4khd.tiling",
    "to_model_inputs": "hd4k_tools.models.xcomposer2_4khd.tiling",
    "draw_plan": "hd4k_tools.models.xcomposer2_4khd.preview",
    "ingest": "hd4k_tools.ingestion",
    "iter_ingest_records": "hd4k_tools.ingestion",
    "PageRecord": "hd4k_tools.ingestion",
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
        invalid_arguments,
        resolve_image_argument,
    )
    from hd4k_tools.errors import CancelledError, ContextOverflowError, HD4KError, InputError, OutputParseError
    from hd4k_tools.hd4k import HD4K
    from hd4k_tools.ingestion import PageRecord, ingest, iter_ingest_records
    from hd4k_tools.inputs.images import ImageSource, image_content_hash, load_image, read_source_bytes, to_data_url
    from hd4k_tools.inputs.pdf import page_count, parse_page_range, render_pages, select_pages
    from hd4k_tools.inputs.policy import ImagePolicy
    from hd4k_tools.models.xcomposer2_4khd.preview import draw_plan
    from hd4k_tools.models.xcomposer2_4khd.tiling import (
        HDPlan,
        auto_hd_num,
        hd_transform,
        plan,
        resolve_hd_num,
        to_model_inputs,
    )
    from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint
    from hd4k_tools.results import ChartResult, ChartTable, DocumentResult, PlanSummary, TaskResult, Timings, Usage
    from hd4k_tools.runtime.generation_config import GenerationConfig
    from hd4k_tools.runtime.local import LocalRunner
    from hd4k_tools.runtime.remote import RemoteRunner
    from hd4k_tools.runtime.runner import GenerationRequest, Message, Runner, RunnerResult, TextStream
    from hd4k_tools.runtime.stops import StopFilter, cut_at_stops
    from hd4k_tools.tasks import TASKS, TaskCall, TaskRegistry, TaskSpec
    from hd4k_tools.zoom import DetailLoss


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hd4k_tools' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if name == "errors" else getattr(mod, name)
    globals()[name] = value
    return value
