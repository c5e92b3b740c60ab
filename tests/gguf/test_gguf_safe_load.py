"""The child-process load check (a llama.cpp abort() must not kill us), its cache, and the
`qwq-local info` command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gguf_craft as gc
from qwq_local import constants
from qwq_local.gguf import safe_load
from qwq_local.cli import app
from qwq_local.errors import BadModelFileError


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(constants.ENV_CACHE_DIR, str(cache))
    return cache


@pytest.fixture(scope="session")
def good_model(tmp_path_factory) -> Path:
    return gc.write_tiny_qwen2(tmp_path_factory.mktemp("safe") / "good.gguf")


@pytest.fixture(scope="session")
def no_output_norm(tmp_path_factory) -> Path:
    """Passes our checks (structure, vocabulary, template) but is no complete qwen2 model."""
    return gc.write_tiny_qwen2(tmp_path_factory.mktemp("safe") / "no-norm.gguf", drop=("output_norm.weight",))


def test_good_file_loads_once_then_comes_from_the_cache(good_model, fresh_cache):
    before = safe_load.child_loads
    info = safe_load.ensure_loadable(good_model)
    assert info.architecture == "qwen2"
    assert safe_load.child_loads == before + 1
    records = json.loads((fresh_cache / constants.VALIDATED_RECORD_FILE).read_text())["records"]
    assert [r["path"] for r in records.values()] == [str(good_model.resolve())]
    assert safe_load.is_validated(good_model)

    safe_load.ensure_loadable(good_model)
    assert safe_load.child_loads == before + 1  # no second child

    # A touched file (new mtime) is checked again: it may have been rewritten in place.
    st = good_model.stat()
    os.utime(good_model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert not safe_load.is_validated(good_model)
    safe_load.ensure_loadable(good_model)
    assert safe_load.child_loads == before + 2


def test_quantized_file_passes_the_child_load(tmp_path):
    # Quantized weights are what trips llama.cpp's AMX kernel; the check never runs a kernel.
    path = gc.write_tiny_qwen2(tmp_path / "q4.gguf", qtype="Q4_0")
    assert safe_load.ensure_loadable(path).quant == "Q4_0"
    assert safe_load.is_validated(path)


def test_missing_tensor_is_caught_by_the_child(no_output_norm, fresh_cache):
    with pytest.raises(BadModelFileError) as exc:
        safe_load.ensure_loadable(no_output_norm)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{no_output_norm.resolve()}: llama.cpp cannot load this file")
    assert "output_norm.weight" in message and "child process exited with code" in message
    assert not safe_load.is_validated(no_output_norm)
    assert not (fresh_cache / constants.VALIDATED_RECORD_FILE).exists()


def test_wrong_tensor_shape_is_caught_by_the_child(tmp_path):
    bad = gc.write_tiny_qwen2(tmp_path / "shape.gguf", reshape={"blk.0.attn_q.weight": (32, 64)})
    with pytest.raises(BadModelFileError, match="'blk.0.attn_q.weight' has wrong shape"):
        safe_load.ensure_loadable(bad)


def test_llama_cpp_abort_in_the_child_leaves_us_alive(tmp_path):
    """Duplicate tokens make llama.cpp's vocabulary loader abort(). Our own check stops such a
    file first; here the child is run on it directly, as if it had slipped through."""
    tokens, _, _ = gc.tiny_vocab()
    bad = gc.write_tiny_qwen2(tmp_path / "dup.gguf", tokens=tokens[:100] + [tokens[7]] + tokens[101:])
    with pytest.raises(BadModelFileError) as exc:
        safe_load.load_in_child(bad)
    message = str(exc.value)
    assert "killed by SIGABRT" in message and "GGML_ASSERT" in message
    assert "\n" not in message
    assert "GGML_ASSERT" in exc.value.log

    before = safe_load.child_loads
    with pytest.raises(BadModelFileError, match="duplicate token"):
        safe_load.ensure_loadable(bad)
    assert safe_load.child_loads == before  # our check answered; no child needed


def test_graph_build_abort_is_caught_and_qwq_load_survives(tmp_path, fresh_cache):
    """A key_length that disagrees with n_embd / n_head passes llama.cpp's model loader and
    abort()s only when a context builds its first graph (qwen2.cpp's GGML_ASSERT). QwQ.load
    must raise BadModelFileError, not die: run it in a child so a failure cannot kill pytest."""
    import subprocess
    import sys

    import gguf

    bad = gc.write_tiny_qwen2(tmp_path / "keylen.gguf",
                              extra={"qwen2.attention.key_length": (8, gguf.GGUFValueType.UINT32)})
    code = ("import sys, warnings; warnings.simplefilter('ignore')\n"
            "from qwq_local import QwQ\n"
            "try:\n    QwQ.load(sys.argv[1], n_ctx=256, gpu_layers=0)\n"
            "except Exception as e:\n    print('raised', type(e).__name__, e)\nelse:\n    print('loaded')\n")
    env = {**os.environ, constants.ENV_CACHE_DIR: str(fresh_cache), "GGML_NO_BACKTRACE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("raised BadModelFileError"), proc.stdout
    assert "GGML_ASSERT" in proc.stdout and "killed by SIGABRT" in proc.stdout


def test_child_timeout_is_a_runtime_error_not_a_bad_file(good_model):
    from qwq_local.errors import RuntimeLoadError

    with pytest.raises(RuntimeLoadError, match="did not finish in 0s"):
        safe_load.ensure_loadable(good_model, timeout_s=0.01)
    assert not safe_load.is_validated(good_model)


def test_backend_load_goes_through_the_check(no_output_norm, good_model):
    from qwq_local.gguf import load_model

    with pytest.raises(BadModelFileError, match="output_norm.weight"):
        load_model(no_output_norm, extra_bufts=False)
    with load_model(good_model, extra_bufts=False) as model:
        assert model.n_vocab == 2048
    assert safe_load.is_validated(good_model)


# --- qwq-local info ----------------------------------------------------------------------------

runner = CliRunner()


def test_info_json(good_model):
    result = runner.invoke(app, ["info", str(good_model), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("path", "architecture", "name", "quant", "file_type", "n_params", "file_size", "context_length",
                "block_count", "head_count", "head_count_kv", "vocab_size", "chat_template", "tensor_types",
                "warnings", "metadata", "load_checked"):
        assert key in data
    assert data["architecture"] == "qwen2" and data["vocab_size"] == 2048
    assert data["chat_template"] == "original"
    assert data["tensor_types"] == {"F32": 15}
    assert data["metadata"]["tokenizer.ggml.tokens"] == {"type": "ARRAY[STRING]", "length": 2048}
    assert data["load_checked"] is False


def test_info_json_is_strict_json_for_nan_and_infinity(tmp_path):
    import gguf

    path = gc.write_tiny_qwen2(tmp_path / "nan.gguf", extra={
        "general.sampling.temp": (float("nan"), gguf.GGUFValueType.FLOAT32),
        "x.limits": ([1.5, float("-inf")], gguf.GGUFValueType.ARRAY)})
    result = runner.invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    metadata = json.loads(result.stdout, parse_constant=refuse)["metadata"]
    assert metadata["general.sampling.temp"] == "nan"
    assert metadata["x.limits"] == [1.5, "-inf"]


def test_info_table_escapes_control_characters_from_the_file(tmp_path):
    import gguf

    key = "tokenizer.ggml.\x1b[2Jfake\nrow_token_id"  # an escape sequence and a line break
    path = gc.write_tiny_qwen2(tmp_path / "ctl.gguf", extra={key: (99999, gguf.GGUFValueType.UINT32)})
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout
    [warning] = [ln for ln in result.stdout.splitlines() if ln.startswith("warning:")]
    assert "\\x1b[2Jfake\\nrow_token_id = 99999 is outside the vocabulary" in warning


def test_info_table_and_load_check(good_model):
    result = runner.invoke(app, ["info", str(good_model), "--load-check"])
    assert result.exit_code == 0, result.output
    assert "architecture    qwen2" in result.stdout
    assert "chat template   original" in result.stdout
    assert "load check      passed" in result.stdout


def test_info_on_a_bad_file_is_one_line_and_exit_4(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(gc.valid_raw()[:300])
    result = runner.invoke(app, ["info", str(bad)])
    assert result.exit_code == 4
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: ")
    assert "(at byte offset " in lines[0]
    assert "Traceback" not in result.output


def test_info_load_check_failure_is_exit_4(no_output_norm):
    result = runner.invoke(app, ["info", str(no_output_norm), "--load-check"])
    assert result.exit_code == 4
    assert result.stderr.startswith("error: ") and "output_norm.weight" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_info_on_a_missing_file(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nope.gguf")])
    assert result.exit_code == 5
    assert "no such file" in result.stderr and "nope.gguf" in result.stderr


def test_cli_error_line_escapes_control_characters(tmp_path):
    """Error text can quote names the user did not choose (a crafted file name): the CLI
    prints control characters escaped, so the error stays one harmless line."""
    missing = tmp_path / "evil\x1b[2J\nname.gguf"
    result = runner.invoke(app, ["info", str(missing)])
    assert result.exit_code == 5
    assert "\x1b" not in result.stderr and result.stderr.count("\n") == 1, repr(result.stderr)
    assert "evil\\x1b[2J\\nname.gguf" in result.stderr
