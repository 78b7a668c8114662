"""The vLLM plugin without vLLM: inert registration, the tokenizer class the checkpoint names (byte fallback,
``<ImageHere>`` as one token), and the shipped chat template against the native prompt."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import jinja2
import pytest
from PIL import Image

from hd4k_tools.models.xcomposer2_4khd.special_tokens import IMAGE_PLACEHOLDER
from hd4k_tools.models.xcomposer2_4khd.tokenizer import InternLM2Tokenizer
from hd4k_tools.models.xcomposer2_4khd.vllm import ARCHITECTURE, CHAT_TEMPLATE_PATH, register
from hd4k_tools.models.xcomposer2_4khd.vllm.plugin import register_transformers_classes
from hd4k_tools.runtime.runner import GenerationRequest, Message

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout


def test_entry_point_names_the_register_function():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (target,) = project["entry-points"]["vllm.general_plugins"].values()
    module, _, name = target.partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is register


def test_register_is_inert_and_vllm_free_without_vllm():
    # A fresh interpreter where vLLM cannot be found: importing the plugin and calling register() imports
    # nothing from vLLM and registers nothing.
    out = _python(
        "import importlib.util as u, sys\n"
        "real = u.find_spec\n"
        "u.find_spec = lambda name, *a, **k: None if name == 'vllm' else real(name, *a, **k)\n"
        "import hd4k_tools.models.xcomposer2_4khd.vllm as p\n"
        "import hd4k_tools.models.xcomposer2_4khd.vllm.config, hd4k_tools.models.xcomposer2_4khd.vllm.tokenizer\n"
        "import hd4k_tools.models.xcomposer2_4khd.vllm.lora\n"
        "print(p.register(), p.register())\n"
        "from transformers import CONFIG_MAPPING\n"
        "print('internlmxcomposer2' in CONFIG_MAPPING, any(m.split('.')[0] == 'vllm' for m in sys.modules))\n"
    )
    assert out.split() == ["None", "None", "False", "False"]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    from transformers import AutoConfig, AutoTokenizer

    register_transformers_classes()
    register_transformers_classes()  # idempotent
    config = AutoConfig.from_pretrained(tiny_checkpoint, trust_remote_code=False)
    assert config.architectures == [ARCHITECTURE]  # never vLLM's InternLM2ForCausalLM
    return AutoTokenizer.from_pretrained(tiny_checkpoint, trust_remote_code=False)


TEXTS = [
    "Hello world",
    "line one\nline two\n\n  indented\ttab",
    "中文和日本語のテキスト",
    "emoji 😀🚀 and accents éàü",
    "[UNUSED_TOKEN_146]user\nHi[UNUSED_TOKEN_145]\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_native_and_round_trips(hf_tokenizer, tiny_checkpoint, text):
    native = InternLM2Tokenizer.from_pretrained(tiny_checkpoint)
    ids = hf_tokenizer.encode(text)
    assert type(hf_tokenizer).__name__ == "InternLMXComposer2Tokenizer"
    assert ids == native.encode(text, add_bos=True)
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_byte_fallback_is_used(hf_tokenizer):
    pieces = hf_tokenizer.tokenize("😀")
    assert pieces and all(p.startswith("<0x") for p in pieces)  # the tiny vocabulary has no emoji piece


def test_image_placeholder_is_one_token_outside_the_model_vocabulary(hf_tokenizer):
    ids = hf_tokenizer.encode(f"a{IMAGE_PLACEHOLDER}b", add_special_tokens=False)
    image_id = hf_tokenizer.image_placeholder_id
    assert image_id == hf_tokenizer.vocab_size and ids.count(image_id) == 1
    assert IMAGE_PLACEHOLDER not in hf_tokenizer.get_vocab()
    assert max(hf_tokenizer.get_vocab().values()) == hf_tokenizer.vocab_size - 1


IMG = Image.new("RGB", (40, 30), "white")


def _template_messages(messages: list[Message]) -> list[dict]:
    out = []
    for m in messages:
        parts = [{"type": "image"} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in m.content]
        out.append({"role": m.role, "content": parts})
    return out


CONVERSATIONS = {
    "image_question": [Message.user(IMG, "What is this?")],
    "text_only": [Message.user("Hello there")],
    "system_and_history": [
        Message("system", ("Be brief.",)),
        Message.user(IMG, "Describe."),
        Message("assistant", ("A white box.",)),
        Message.user("And its size?"),
    ],
    "consecutive_users_and_two_images": [
        Message.user("First:", IMG),
        Message.user(IMG, "second, compare."),
    ],
    "empty_system": [Message("system", ("",)), Message.user("No system turn.")],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_renders_the_native_prompt(hf_tokenizer, hd4k_tiny, name):
    messages = CONVERSATIONS[name]
    images = [p for m in messages for p in m.content if isinstance(p, Image.Image)]
    native = hd4k_tiny.runner.prompt_text(GenerationRequest(messages=tuple(messages), hd_nums=(1,) * len(images)))
    rendered = hf_tokenizer.apply_chat_template(_template_messages(messages), tokenize=False)
    assert rendered == hf_tokenizer.bos_token + native
    assert hf_tokenizer.chat_template == CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": f"text with {IMAGE_PLACEHOLDER} inside"}],
        [{"role": "user", "content": [{"type": "text", "text": f"{IMAGE_PLACEHOLDER}"}]}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ends with the answer"}],
        [
            {"role": "user", "content": "a"},
            {"role": "system", "content": "late system"},
            {"role": "user", "content": "b"},
        ],
    ],
)
def test_chat_template_refuses_what_the_native_runner_refuses(hf_tokenizer, messages):
    with pytest.raises((jinja2.TemplateError, ValueError)):
        hf_tokenizer.apply_chat_template(messages, tokenize=False)
