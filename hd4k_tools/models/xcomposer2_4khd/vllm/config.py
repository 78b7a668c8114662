"""The ``transformers`` configuration vLLM reads for ``model_type`` ``internlmxcomposer2`` (no vLLM import).

The official ``config.json`` names remote code (``auto_map``); registering this class for its
``model_type`` lets ``AutoConfig`` load it locally, without ``trust_remote_code``. The fields are parsed
by the native :class:`~hd4k_tools.models.xcomposer2_4khd.XComposer2Config` (one parser: LoRA defaults,
vision tower, validation) and :meth:`XComposer2VLLMConfig.native` returns that object for the model.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from hd4k_tools.models.xcomposer2_4khd.configuration import XComposer2Config
from hd4k_tools.models.xcomposer2_4khd.vllm.names import ARCHITECTURE, MODEL_TYPE, PLORA_MODES


class XComposer2VLLMConfig(PretrainedConfig):
    """IXC2-4KHD for vLLM: the official fields, the architecture forced to :data:`ARCHITECTURE`.

    ``rope_scaling`` of the checkpoint (InternLM2 "dynamic" NTK, which changes nothing below
    ``max_position_embeddings``) is kept as ``hd4k_rope_scaling`` and replaced by plain RoPE
    (``rope_parameters``): vLLM's dynamic scaling would rescale *every* position. The model refuses a
    ``max_model_len`` past ``max_position_embeddings``, where the two would differ.
    ``plora_mode`` (one of :data:`PLORA_MODES`, default ``"auto"``) selects the Partial LoRA form; set it
    with ``hf_overrides={"plora_mode": "static"}``.
    """

    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        rope_scaling = kwargs.pop("rope_scaling", None)
        kwargs.pop("rope_parameters", None)
        kwargs.pop("architectures", None)
        kwargs.setdefault("plora_mode", "auto")
        if kwargs["plora_mode"] not in PLORA_MODES:
            raise ValueError(f"plora_mode must be one of {', '.join(PLORA_MODES)}, got {kwargs['plora_mode']!r}")
        super().__init__(**kwargs)
        native = self.native()
        self.architectures = [ARCHITECTURE]
        self.hd4k_rope_scaling = rope_scaling
        self.rope_theta = native.rope_theta
        if native.rope_scaling_type == "linear":
            self.rope_parameters = {
                "rope_type": "linear",
                "rope_theta": native.rope_theta,
                "factor": native.rope_scaling_factor,
            }
        else:
            self.rope_parameters = {"rope_type": "default", "rope_theta": native.rope_theta}
        self.head_dim = native.head_dim

    def native(self) -> XComposer2Config:
        """The native configuration parsed from the same fields (LoRA ranks, vision tower, sizes)."""
        fields = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        if getattr(self, "hd4k_rope_scaling", None) is not None:
            fields["rope_scaling"] = self.hd4k_rope_scaling
        else:
            fields.pop("rope_scaling", None)
        return XComposer2Config.from_dict(fields)
