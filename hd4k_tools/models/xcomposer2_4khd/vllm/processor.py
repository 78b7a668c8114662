"""vLLM multimodal processor of IXC2-4KHD: HD-N tiling, ``hd_num`` per engine and per request, the
official prompt layout (imports vLLM).

* **Planning** is the family's :func:`~hd4k_tools.models.xcomposer2_4khd.tiling.plan_images` (the one
  planner), once per image in :meth:`XComposer2MultiModalProcessor.apply`; the plans travel to the tiler.
* **Tiling** is :func:`hd4k_tools.tiling.to_model_inputs` (the native engine's) on those plans: one image becomes
  ``1 + rows*cols`` normalised 336-px crops (global view first), flattened across images as
  ``pixel_values`` with ``image_grid`` ``[rows, cols]`` per image.
* **hd_num.** The engine's value (``mm_processor_kwargs={"hd_num": N}`` when the engine starts, default
  :data:`DEFAULT_ENGINE_HD_NUM`; ``"auto"`` allows up to ``MAX_AUTO_HD_NUM``) is both the default and the
  budget: start-up profiling sizes the encoder cache for it. A request may send ``hd_num`` (an int,
  ``"auto"``, or one value per image) in ``mm_processor_kwargs``; a value above the engine's is refused
  with :class:`HDNumOverBudgetError` (a ``ValueError``: HTTP 400 in vLLM's server). ``"auto"`` picks, per
  image, the largest hd_num whose tokens fit an equal share of the context left after the prompt's own
  text tokens (as ``HD4K`` does), capped by the engine's budget.
* **Prompt layout.** ``<ImageHere>`` is one token (see :mod:`.tokenizer`); the prompt ids are rebuilt
  with the shared BOS rule (:func:`~hd4k_tools.models.xcomposer2_4khd.prompt.with_part_bos`): a BOS
  before every non-empty text part (``layout="chat"``, default) or one BOS at the start
  (``layout="eval"``, per request). Each placeholder then becomes the image's token positions.
* **Caching.** Each image's processor/encoder-cache identity includes its own resolved hd_num.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: F401  (re-exported for the model's decorator)
from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.multimodal.processing.inputs import ProcessorInputs

from hd4k_tools.errors import HDNumOverBudgetError, InputError, InvalidHDNumError
from hd4k_tools.models.xcomposer2_4khd.prompt import with_part_bos
from hd4k_tools.models.xcomposer2_4khd.special_tokens import IMAGE_PLACEHOLDER
from hd4k_tools.models.xcomposer2_4khd.tiling import MAX_AUTO_HD_NUM, HDNum, HDPlan, plan, plan_images, to_model_inputs
from hd4k_tools.models.xcomposer2_4khd.vision import image_token_count
from hd4k_tools.models.xcomposer2_4khd.vllm.names import DEFAULT_ENGINE_HD_NUM

#: Keys a request may send in ``mm_processor_kwargs`` (``hd_plans``: the in-process engine's own plans).
REQUEST_KWARGS = ("hd_num", "hd_plans", "layout")
__all__ = ["DEFAULT_ENGINE_HD_NUM", "HDNumOverBudgetError", "XComposer2MultiModalProcessor", "XComposer2ProcessingInfo"]
LAYOUTS = ("chat", "eval")


def _engine_hd_num(value: object) -> HDNum:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidHDNumError(
            f"The engine's mm_processor_kwargs hd_num must be a positive integer or 'auto', got {value!r}."
        )
    return value


def official_prompt_ids(prompt: Sequence[int], *, image_id: int, bos_id: int, layout: str) -> list[int]:
    """Prompt ids in the official layout: text parts between ``<ImageHere>`` ids get the BOS rule of the
    native prompt (``chat``: BOS before every non-empty part; ``eval``: one BOS at the start).

    A BOS at the very start (added by the tokenizer or written by the chat template) is the first part's
    own and is dropped before the rule is applied, so either way of tokenising gives the same ids.
    """
    if layout not in LAYOUTS:
        raise InputError(f"layout must be 'chat' or 'eval', got {layout!r}.")
    parts: list[list[int]] = [[]]
    for tok in prompt:
        if tok == image_id:
            parts.append([])
        else:
            parts[-1].append(int(tok))
    if parts[0][:1] == [bos_id]:
        parts[0] = parts[0][1:]
    out: list[int] = []
    for i, ids in enumerate(with_part_bos(parts, bos_id, bos_each_part=layout == "chat")):
        if i:
            out.append(image_id)
        out.extend(ids)
    return out


class XComposer2ProcessingInfo(BaseProcessingInfo):
    """Limits, hd_num budget and token counts of the IXC2-4KHD processor."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {}  # no Hugging Face processor: the kwargs are this processor's own (REQUEST_KWARGS)

    # -- hd_num ----------------------------------------------------------------------------------------
    def engine_hd_num(self) -> HDNum:
        """The engine's hd_num (``mm_processor_kwargs`` at start-up), validated."""
        mm_config = self.ctx.model_config.get_multimodal_config()
        configured = dict(mm_config.mm_processor_kwargs or {})
        unknown = sorted(set(configured) - {"hd_num"})
        if unknown:
            raise InputError(
                f"Unknown engine mm_processor_kwargs {unknown}; IXC2-4KHD takes only hd_num "
                "(and per request hd_num and layout)."
            )
        return _engine_hd_num(configured.get("hd_num", DEFAULT_ENGINE_HD_NUM))

    def max_hd_num(self) -> int:
        """The largest hd_num a request may use: the engine's, or ``MAX_AUTO_HD_NUM`` for ``"auto"``."""
        engine = self.engine_hd_num()
        return MAX_AUTO_HD_NUM if engine == "auto" else int(engine)

    def plan_images(self, requested: object, images: Sequence[Image.Image], *, text_tokens: int) -> list[HDPlan]:
        """One plan per image, made once by the family's ``plan_images`` (the one planner) and checked against
        the engine's budget: an int above it is refused, ``"auto"`` is capped by it. No ``max_new_tokens``
        is known here, so ``"auto"`` shares ``max_model_len`` minus the prompt's ``text_tokens``."""
        cap = self.max_hd_num()
        values = list(requested) if isinstance(requested, (list, tuple)) else [requested] * len(images)
        for value in values:
            if isinstance(value, bool) or not (value is None or isinstance(value, (int, str))):
                raise InvalidHDNumError(f"hd_num must be a positive integer or 'auto', got {value!r}.")
        plans = plan_images(
            list(images),
            values,
            default_hd_num=self.engine_hd_num(),
            context_length=self.ctx.model_config.max_model_len,
            max_new_tokens=0,
            text_tokens=text_tokens,
            max_auto_hd_num=cap,
        )
        for p in plans:
            if p.hd_num > cap:
                raise HDNumOverBudgetError(
                    f"hd_num={p.hd_num} is above this engine's budget of {cap} (set when the engine started, "
                    f"mm_processor_kwargs={{'hd_num': {self.engine_hd_num()!r}}}); use hd_num <= {cap} or 'auto', "
                    "or start the engine with a larger hd_num."
                )
        return list(plans)

    def check_plans(self, plans: object, images: Sequence[Image.Image]) -> list[HDPlan]:
        """Plans made by the caller (the in-process engine): one :class:`HDPlan` per image, of its size, within
        the engine's budget."""
        if not isinstance(plans, (list, tuple)) or not all(isinstance(p, HDPlan) for p in plans):
            raise InputError("mm_processor_kwargs hd_plans must be HDPlan objects (in process); send hd_num instead.")
        if [(p.width, p.height) for p in plans] != [image.size for image in images]:
            raise InputError("mm_processor_kwargs hd_plans do not match the images (one plan per image, in order).")
        cap = self.max_hd_num()
        for p in plans:
            if p.hd_num > cap:
                raise HDNumOverBudgetError(
                    f"hd_num={p.hd_num} is above this engine's budget of {cap}; use hd_num <= {cap} or 'auto', "
                    "or start the engine with a larger hd_num."
                )
        return list(plans)

    # -- sizes -----------------------------------------------------------------------------------------
    def largest_image(self) -> tuple[int, int, int]:
        """``(width, height, tokens)`` of an image with the most tokens at the engine's budget."""
        cap = self.max_hd_num()
        best = (336, 336, plan(336, 336, cap).num_tokens)
        for rows in range(1, cap + 1):
            for cols in range(1, cap // rows + 1):
                w, h = 336 * cols, 336 * rows
                tokens = plan(w, h, cap).num_tokens
                if tokens > best[2]:
                    best = (w, h, tokens)
        return best

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.largest_image()[2]}

    def placeholder_ids(self) -> tuple[int, int, int]:
        """``(image placeholder id, BOS id, id written at image positions)``."""
        tok = self.get_tokenizer()
        image_id = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if image_id is None or image_id == tok.unk_token_id:
            raise InputError(
                f"The tokenizer has no {IMAGE_PLACEHOLDER} token: load the checkpoint with the hd4k-tools plugin "
                "(tokenizer class InternLMXComposer2Tokenizer), not another tokenizer."
            )
        # Image positions carry the unk id: a real token (vLLM checks ids against the vocabulary), never
        # embedded (the image embeddings replace it), and distinct from every text token of the prompt.
        return int(image_id), int(tok.bos_token_id), int(tok.unk_token_id)


class XComposer2DummyInputsBuilder(BaseDummyInputsBuilder[XComposer2ProcessingInfo]):
    """Images with the most tokens at the engine's hd_num, for start-up profiling."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any) -> dict[str, Any]:
        width, height, _ = self.info.largest_image()
        options = mm_options.get("image") if mm_options else None
        return {
            "image": self._get_dummy_images(
                width=width, height=height, num_images=mm_counts.get("image", 0), overrides=options
            )
        }


class XComposer2MultiModalProcessor(BaseMultiModalProcessor[XComposer2ProcessingInfo]):
    """See the module docstring."""

    def apply(self, inputs: ProcessorInputs, timing_ctx: Any) -> Any:
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        unknown = sorted(set(kwargs) - set(REQUEST_KWARGS))
        if unknown:
            raise InputError(
                f"Unknown mm_processor_kwargs {unknown}; IXC2-4KHD accepts {', '.join(REQUEST_KWARGS)} per request."
            )
        images = inputs.mm_data_items.get("image")
        if images is not None and not isinstance(images, ImageProcessorItems):
            raise InputError("IXC2-4KHD takes images (PIL or image URLs/data), not precomputed image embeddings.")
        pil_images = [images.get(i) for i in range(images.get_count())] if images is not None else []
        for image in pil_images:
            if not isinstance(image, Image.Image):
                raise InputError(f"IXC2-4KHD images must be PIL images or image URLs, got {type(image).__name__}.")
        image_id, bos_id, _ = self.info.placeholder_ids()
        placeholders = sum(1 for t in inputs.prompt if t == image_id)
        if placeholders != len(pil_images):
            raise InputError(
                f"The prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(pil_images)} image(s) were "
                f"given; put exactly one {IMAGE_PLACEHOLDER} where each image belongs, in the same order."
            )
        prompt = official_prompt_ids(
            inputs.prompt, image_id=image_id, bos_id=bos_id, layout=kwargs.get("layout", "chat")
        )
        given = kwargs.get("hd_plans")
        if given is not None:  # planned by the in-process engine's caller: checked, not re-planned
            plans = self.info.check_plans(given, pil_images)
        else:
            plans = self.info.plan_images(kwargs.get("hd_num"), pil_images, text_tokens=len(prompt) - len(pil_images))
        # Only the per-image plans reach tiling, and their hd_nums hashing and caching (the layout is in the ids).
        mm_kwargs = {"hd_num": tuple(p.hd_num for p in plans), "hd_plans": tuple(plans)}
        inputs = replace(inputs, prompt=prompt, hf_processor_mm_kwargs=mm_kwargs)
        return super().apply(inputs, timing_ctx)

    # -- cache identity: each image with its own hd_num --------------------------------------------------
    def _get_mm_hashes(self, inputs: ProcessorInputs) -> dict[str, list[str]]:
        hd_nums = tuple(inputs.hf_processor_mm_kwargs.get("hd_num", ()))
        base = super()._get_mm_hashes(replace(inputs, hf_processor_mm_kwargs={}))
        algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
        out = dict(base)
        if "image" in base:
            out["image"] = [
                MultiModalHasher.hash_kwargs(algorithm, image=h, hd_num=n)
                for h, n in zip(base["image"], hd_nums, strict=True)
            ]
        return out

    def _get_cache_missing_processor_kwargs(self, inputs: ProcessorInputs, mm_is_cached: Any) -> Mapping[str, object]:
        plans = tuple(inputs.hf_processor_mm_kwargs.get("hd_plans", ()))
        cached = mm_is_cached.get("image", [False] * len(plans))
        missing = tuple(p for p, hit in zip(plans, cached, strict=True) if not hit)
        return {"hd_num": tuple(p.hd_num for p in missing), "hd_plans": missing}

    # -- tiling ----------------------------------------------------------------------------------------
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """Tensors of the images from their plans (``hf_kwargs["hd_plans"]``, made in :meth:`apply`)."""
        images = list(hf_data.get("images") or [])
        plans = tuple(hf_kwargs.get("hd_plans", ()))
        if len(plans) != len(images) or not all(isinstance(p, HDPlan) for p in plans):
            raise RuntimeError(f"{len(images)} images but {len(plans)} HD plans reached the tiler")
        crops: list[torch.Tensor] = []
        grids: list[list[int]] = []
        for image, p in zip(images, plans, strict=True):
            if not isinstance(image, Image.Image):
                raise InputError(f"IXC2-4KHD images must be PIL images or image URLs, got {type(image).__name__}.")
            inputs = to_model_inputs(image, p)
            crops.append(torch.cat([inputs.global_view, inputs.tiles], dim=0))  # [1 + rows*cols, 3, 336, 336]
            grids.append([inputs.plan.rows, inputs.plan.cols])
        return BatchFeature(
            {
                "pixel_values": torch.cat(crops, dim=0) if crops else torch.empty(0, 3, 336, 336),  # [sum crops, ...]
                "image_grid": torch.tensor(grids, dtype=torch.long).reshape(-1, 2),  # [N, 2] rows, cols
                "image_num_crops": torch.tensor([c.shape[0] for c in crops], dtype=torch.long),  # [N]
            }
        )

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        num_crops = hf_inputs.get("image_num_crops", torch.empty(0, dtype=torch.long))
        return {
            "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", num_crops),
            "image_grid": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            "image_num_crops": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_id, _, fill_id = self.info.placeholder_ids()
        items = out_mm_kwargs.get("image", [])

        def image_positions(item_idx: int) -> list[int]:
            rows, cols = (int(v) for v in items[item_idx]["image_grid"].data.tolist())
            return [fill_id] * image_token_count(rows, cols)

        return [PromptReplacement(modality="image", target=[image_id], replacement=image_positions)]
