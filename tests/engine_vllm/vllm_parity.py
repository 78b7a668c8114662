"""Reference results of the native runner and the same request through vLLM, compared."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from hd4k_tools.models.xcomposer2_4khd.prompt_embeds import assemble_inputs
from hd4k_tools.models.xcomposer2_4khd.tiling import to_model_inputs
from hd4k_tools.runtime.generation import generate, stop_ids_for
from hd4k_tools.runtime.generation_config import GenerationConfig
from hd4k_tools.runtime.runner import GenerationRequest, Message

STEPS = 24
LOGPROB_TOL = 1e-4
#: The engine's hd_num budget and the chunk size of chunked prefill (an hd_num-4 image is ~750-1600 tokens,
#: so every image prompt is prefilled over several steps, images split between them).
ENGINE_HD_NUM = 4
MAX_BATCHED_TOKENS = 256
MAX_MODEL_LEN = 4096


@dataclass
class Result:
    prompt_ids: list[int]
    tokens: list[int]
    first_logprobs: torch.Tensor  # [vocab] float64
    num_cached_tokens: int = 0


def request(images: Sequence[Image.Image], question: str, hd_nums: Sequence[int]) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message.user(*images, question),),
        hd_nums=tuple(hd_nums),
        generation=GenerationConfig(max_new_tokens=STEPS, do_sample=False),
    )


def native(runner, req: GenerationRequest) -> Result:
    model, tok = runner.model, runner.tokenizer
    prompt = runner.prompt_text(req)
    with torch.inference_mode():
        embeds = [model.encode_image(to_model_inputs(img, p)) for img, p in zip(req.images, req.plans(), strict=True)]
        inputs = assemble_inputs(model, tok, prompt, embeds, max_length=runner.context_length)
        logits = model(inputs.inputs_embeds, inputs.im_mask, logits_to_keep=1)[0, -1]  # [V]
        out = generate(model, inputs, req.generation, stop_ids=stop_ids_for(tok))
    ids = [tok.unk_id if t < 0 else int(t) for t in inputs.input_ids[0].tolist()]
    return Result(ids, list(out.token_ids), torch.log_softmax(logits.double(), -1))


def vllm_prompt(runner, req: GenerationRequest, **mm_kwargs) -> dict:
    prompt: dict = {"prompt": runner.prompt_text(req)}
    if req.images:
        prompt["multi_modal_data"] = {"image": list(req.images)}
    if mm_kwargs:
        prompt["mm_processor_kwargs"] = mm_kwargs
    return prompt


def sampling(runner):
    from vllm import SamplingParams

    tok = runner.tokenizer
    return SamplingParams(temperature=0.0, max_tokens=STEPS, logprobs=tok.vocab_size, stop_token_ids=[tok.im_end_id])


def run_vllm(llm, runner, prompts: Sequence[dict]) -> list[Result]:
    outs = llm.generate(list(prompts), sampling(runner), use_tqdm=False)
    stops = stop_ids_for(runner.tokenizer)
    results = []
    for o in outs:
        comp = o.outputs[0]
        tokens = [t for t in comp.token_ids if t not in stops]
        first = torch.full((runner.tokenizer.vocab_size,), float("-inf"), dtype=torch.float64)
        for tid, lp in comp.logprobs[0].items():
            first[tid] = lp.logprob
        results.append(Result(list(o.prompt_token_ids), tokens, first, int(o.num_cached_tokens or 0)))
    return results


def max_logprob_diff(a: Result, b: Result) -> float:
    return float((a.first_logprobs - b.first_logprobs).abs().max())


def assert_parity(ref: Result, got: Result) -> None:
    assert got.prompt_ids == ref.prompt_ids, "prompt ids differ"
    assert len(ref.tokens) == STEPS, f"the native run stopped after {len(ref.tokens)} tokens"
    assert got.tokens == ref.tokens, (
        f"greedy tokens differ: {sum(a == b for a, b in zip(got.tokens, ref.tokens, strict=False))} of {STEPS} equal"
    )
    assert max_logprob_diff(ref, got) <= LOGPROB_TOL
