"""Quantizer: type table, refusals, byte-equality with the bare llama.cpp call, size
predictions (tiny files exactly, QwQ-32B against published sizes), CLI, release pipeline."""

from __future__ import annotations

import ctypes
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gguf_craft import sparse_files_work, write_sparse_gguf

from qwq_local.backend import binding as backend
from qwq_local.cli import app
from qwq_local.errors import QuantizeError, QwQLocalError, UsageError
from qwq_local.gguf.check import inspect_gguf
from qwq_local.quantize.predict import predict_size, predict_sizes, qwen2_shape, read_shape, tensor_types
from qwq_local.quantize.types import QUANT_TYPES, resolve_type, type_names
from qwq_local.quantize.quantizer import quantize

runner = CliRunner()


def _direct(src: Path, dst: Path, ftype: int, **fields) -> int:
    """llama_model_quantize called by hand, with llama.cpp's default params."""
    lib = backend.llama()
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    for key, value in fields.items():
        setattr(params, key, value)
    return lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))


# --- type table -------------------------------------------------------------------------------

def test_type_table_matches_llama_cpp_constants():
    lib = backend.llama()
    for qt in QUANT_TYPES:
        const = "LLAMA_FTYPE_ALL_F32" if qt.name == "F32" else f"LLAMA_FTYPE_MOSTLY_{qt.name}"
        assert getattr(lib, const) == qt.ftype, qt.name
    for name in ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "IQ4_XS",
                 "IQ4_NL", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S",
                 "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ1_0", "TQ2_0", "BF16", "F16", "F32"):
        assert name in type_names()
    assert resolve_type("Q8_0").bpw == pytest.approx(8.5)
    assert resolve_type("Q4_K_M").bpw == pytest.approx(4.5)


def test_type_names_are_case_insensitive_with_aliases():
    assert resolve_type("q4_k_m") is resolve_type("Q4_K_M")
    assert resolve_type(" iq2_xxs ") is resolve_type("IQ2_XXS")
    assert resolve_type("q4_k").name == "Q4_K_M"
    assert resolve_type("bf16").ftype == 32


def test_unknown_type_lists_the_valid_ones():
    with pytest.raises(QuantizeError) as err:
        resolve_type("Q4_K_XL")
    message = str(err.value)
    assert "Q4_K_XL" in message and "Q4_K_M" in message and "IQ2_XXS" in message and "BF16" in message


def test_imatrix_flags_agree_with_llama_cpp(k_gguf, tmp_path):
    """Every type we refuse without an imatrix is refused by llama.cpp itself, and every other
    type quantizes without one."""
    for qt in QUANT_TYPES:
        rc = _direct(k_gguf, tmp_path / f"{qt.name}.gguf", qt.ftype)
        assert (rc != 0) == qt.requires_imatrix, qt.name


@pytest.mark.parametrize("name", ["IQ2_XXS", "iq1_s", "Q2_K_S", "IQ3_XXS"])
def test_refuses_imatrix_types_without_one(k_gguf, tmp_path, name):
    out = tmp_path / "out.gguf"
    with pytest.raises(QuantizeError, match="importance matrix"):
        quantize(k_gguf, out, qtype=name)
    assert not out.exists()


# --- the quantization itself ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Q4_K_M", "Q8_0", "IQ4_XS"])
def test_byte_identical_to_direct_llama_call(k_gguf, tmp_path, name):
    ours = quantize(k_gguf, tmp_path / "ours.gguf", qtype=name.lower(), threads=2)
    assert _direct(k_gguf, tmp_path / "direct.gguf", resolve_type(name).ftype) == 0
    assert ours.output.read_bytes() == (tmp_path / "direct.gguf").read_bytes()
    assert ours.bytes == ours.output.stat().st_size
    assert ours.command.endswith(f"{name} 2")


def test_output_options_are_passed_through(k_gguf, tmp_path):
    r = quantize(k_gguf, tmp_path / "o.gguf", qtype="Q4_K_M", output_tensor_type="q8_0",
                 token_embedding_type="Q6_K", threads=2)
    lib_types = {t.name: t.type_name for t in inspect_gguf(r.output).tensors}
    assert lib_types["output.weight"] == "Q8_0" and lib_types["token_embd.weight"] == "Q6_K"
    pure = quantize(k_gguf, tmp_path / "p.gguf", qtype="Q4_K_M", pure=True, threads=2)
    pure_types = {t.type_name for t in inspect_gguf(pure.output).tensors if len(t.shape) > 1}
    assert pure_types == {"Q4_K"}
    assert _direct(k_gguf, tmp_path / "pd.gguf", 15, pure=True) == 0
    assert pure.output.read_bytes() == (tmp_path / "pd.gguf").read_bytes()
    with pytest.raises(QuantizeError, match="unknown tensor type"):
        quantize(k_gguf, tmp_path / "x.gguf", qtype="Q4_K_M", output_tensor_type="q9_z")


def test_progress_counts_tensors(tiny_gguf, tmp_path):
    seen = []
    quantize(tiny_gguf, tmp_path / "q.gguf", qtype="Q8_0", progress=lambda done, total: seen.append((done, total)))
    n = len(inspect_gguf(tiny_gguf).tensors)
    assert seen and seen[-1] == (n, n)
    assert all(0 < d <= t == n for d, t in seen)


def test_output_equal_to_input_is_refused(tiny_gguf, tmp_path):
    before = tiny_gguf.read_bytes()
    with pytest.raises(UsageError, match="same file"):
        quantize(tiny_gguf, tiny_gguf, qtype="Q8_0")
    link = tmp_path / "link.gguf"
    os.symlink(tiny_gguf, link)
    with pytest.raises(UsageError):
        quantize(tiny_gguf, link, qtype="Q8_0")
    assert tiny_gguf.read_bytes() == before


def test_llama_cpp_failure_is_a_clear_error_and_leaves_nothing(tiny_gguf_q4km, tmp_path):
    # llama.cpp refuses to requantize an already-quantized model (without allow_requantize)
    out = tmp_path / "requant.gguf"
    with pytest.raises(QuantizeError) as err:
        quantize(tiny_gguf_q4km, out, qtype="Q8_0")
    assert "code 1" in str(err.value) and "requantiz" in str(err.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_input(tmp_path):
    with pytest.raises(QwQLocalError, match="no GGUF file"):
        quantize(tmp_path / "nope.gguf", tmp_path / "out.gguf", qtype="Q8_0")


# --- size predictions -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_NL", "Q3_K_M", "Q2_K",
                                  "IQ3_S", "BF16", "F32"])
def test_dry_run_predicts_types_and_size_exactly(k_gguf, tiny_gguf, tmp_path, name):
    for src in (k_gguf, tiny_gguf):  # 256-wide (no fallbacks) and 320-wide (llama.cpp's fallbacks)
        shape = read_shape(src)
        predicted = tensor_types(shape, name)
        out = quantize(src, tmp_path / f"{src.stem}-{name}.gguf", qtype=name)
        actual = {t.name: t.type_name for t in inspect_gguf(out.output).tensors}
        assert predicted == actual
        assert abs(out.predicted_bytes - out.bytes) <= 64, (out.predicted_bytes, out.bytes)


def test_qwq_32b_predictions_match_published_sizes():
    # QwQ-32B's shapes (config.json): built here, no big file involved
    shape = qwen2_shape(n_layer=64, hidden=5120, ffn=27648, vocab=152064, n_head=40, n_head_kv=8)
    assert shape.n_params == pytest.approx(32.76e9, rel=0.01)
    published_gb = {  # Qwen/QwQ-32B-GGUF and community imatrix quants
        "Q4_K_M": 19.9, "Q5_0": 22.6, "Q5_K_M": 23.3, "Q6_K": 26.9, "Q8_0": 34.8, "IQ2_XXS": 9.1, "IQ2_M": 11.4,
        "Q2_K": 12.4, "IQ3_XXS": 12.9, "Q3_K_M": 16.0, "IQ4_XS": 17.8, "Q4_K_S": 18.9,
    }
    by_type = {p.type: p for p in predict_sizes(shape)}
    for name, gb in published_gb.items():
        assert by_type[name].bytes / 1e9 == pytest.approx(gb, rel=0.03), name
    # Q4_K_M's mix: Q6_K for output and half the attn_v / ffn_down, Q4_K elsewhere
    types = tensor_types(shape, "Q4_K_M")
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_v.weight"] == "Q6_K"
    assert types["blk.8.attn_v.weight"] == "Q4_K" and types["blk.0.attn_q.weight"] == "Q4_K"
    assert sum(types[f"blk.{i}.ffn_down.weight"] == "Q6_K" for i in range(64)) == 32
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert predict_size(shape, "Q4_K_M") == by_type["Q4_K_M"].bytes


# --- CLI --------------------------------------------------------------------------------------

def test_cli_list_without_input_shows_qwq_sizes():
    r = runner.invoke(app, ["quantize", "--list"])
    assert r.exit_code == 0, r.output
    assert "QwQ-32B" in r.output and "Q4_K_M" in r.output and "IQ1_S" in r.output and "required" in r.output


def test_cli_dry_run_writes_nothing(k_gguf, tmp_path):
    out = tmp_path / "q.gguf"
    r = runner.invoke(app, ["quantize", str(k_gguf), str(out), "--type", "q4_k_m", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "* Q4_K_M" in r.output and "Q6_K x" in r.output and "nothing written" in r.output
    assert not out.exists()


def test_cli_quantize_and_errors(k_gguf, tmp_path):
    out = tmp_path / "q.gguf"
    r = runner.invoke(app, ["quantize", str(k_gguf), str(out), "--type", "Q5_K_M", "--threads", "2"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "Q5_K_M" in r.output
    r = runner.invoke(app, ["quantize", str(k_gguf), str(tmp_path / "x.gguf"), "--type", "Q9_Q"])
    assert r.exit_code == QuantizeError.exit_code and "valid types" in r.output
    r = runner.invoke(app, ["quantize", str(k_gguf), str(tmp_path / "x.gguf"), "--type", "IQ2_XS"])
    assert r.exit_code == QuantizeError.exit_code and "importance matrix" in r.output
    r = runner.invoke(app, ["quantize", str(k_gguf), str(k_gguf), "--type", "Q8_0"])
    assert r.exit_code == UsageError.exit_code
    assert not (tmp_path / "x.gguf").exists()


# --- release pipeline -------------------------------------------------------------------------

def test_build_release_end_to_end(tiny_checkpoint, tmp_path):
    from qwq_local.quantize.release import build_release, sha256_file

    steps = []
    manifest = build_release(tiny_checkpoint, tmp_path / "rel", quants=["Q8_0", "q4_k_m"], name="tiny-qwq",
                             on_step=steps.append)
    on_disk = json.loads((tmp_path / "rel" / "manifest.json").read_text())
    assert on_disk == manifest
    assert [f["type"] for f in manifest["files"]] == ["BF16", "Q8_0", "Q4_K_M"]
    assert manifest["llama_cpp_python"] == backend.llama_cpp_version()
    assert manifest["llama_cpp"] == backend.llama().llama_version().decode()
    for f in manifest["files"]:
        path = tmp_path / "rel" / f["file"]
        assert f["bytes"] == path.stat().st_size and f["sha256"] == sha256_file(path)
        assert f["commands"] and f["file"].startswith("tiny-qwq-")
    q4 = manifest["files"][2]
    assert any(c.startswith("llama-quantize ") and c.endswith("Q4_K_M") for c in q4["commands"])
    assert q4["predicted_bytes"] == pytest.approx(q4["bytes"], abs=64)
    assert inspect_gguf(tmp_path / "rel" / q4["file"]).quant == "Q4_K_M"
    assert len(steps) == 4


# --- llama.cpp's own dry run and interruption --------------------------------------------------

_DRY_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =\s*[\d.]+ MiB"
                       r"(?: ->\s*[\d.]+ MiB \((\S+)\))?")


def test_predicted_types_match_llama_cpp_dry_run_for_every_type(k_gguf, tiny_gguf, tmp_path):
    """llama.cpp's dry run (no imatrix needed) reports each tensor's target type: our port must
    agree for every type, including the imatrix-only ones, or fail where llama.cpp fails."""
    lib = backend.llama()
    for src in (k_gguf, tiny_gguf):
        shape = read_shape(src)
        for qt in QUANT_TYPES:
            params = lib.llama_model_quantize_default_params()
            params.ftype = qt.ftype
            params.dry_run = True
            with backend.capture_log() as log:
                rc = lib.llama_model_quantize(str(src).encode(), str(tmp_path / "none.gguf").encode(),
                                              ctypes.byref(params))
            try:
                predicted = tensor_types(shape, qt)
            except QuantizeError:
                assert rc != 0, (src.name, qt.name)
                continue
            assert rc == 0, (src.name, qt.name)
            reported = {m.group(1): (m.group(3) or m.group(2)).upper() for m in _DRY_LINE.finditer("".join(log))}
            assert reported == predicted, (src.name, qt.name)
    assert not (tmp_path / "none.gguf").exists()


def test_interrupted_run_leaves_nothing(k_gguf, tmp_path, monkeypatch):
    from qwq_local import constants

    monkeypatch.setattr(constants, "QUANTIZE_POLL_S", 0.001)  # interrupt at the first tensor
    out = tmp_path / "q.gguf"

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(k_gguf, out, qtype="Q4_K_M", progress=stop)
    assert not out.exists()
    # llama.cpp cannot be stopped: it finishes in the background, then its partial file goes
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(
            t.name in ("llama-quantize", "quantize-reaper") for t in threading.enumerate()):
        time.sleep(0.05)
    assert list(tmp_path.iterdir()) == []


def test_qwq_32b_types_match_llama_cpp_dry_run(tmp_path):
    """QwQ-32B's exact tensor list (64 layers: the layer-position rules of the k-quant mixes)
    through llama.cpp's own dry run, for every type."""
    if sparse_files_work(tmp_path):
        shape = qwen2_shape(n_layer=64, hidden=5120, ffn=27648, vocab=152064, n_head=40, n_head_kv=8)
    else:  # same layer count and head ratio, tiny widths (a real 65 GB file is out of the question)
        shape = qwen2_shape(n_layer=64, hidden=256, ffn=512, vocab=512, n_head=8, n_head_kv=2)
    src = write_sparse_gguf(tmp_path / "qwq-shape.gguf", shape)
    shape = read_shape(src)
    assert shape.n_layer == 64 and shape.n_gqa in (5, 4)
    lib = backend.llama()
    for qt in QUANT_TYPES:
        params = lib.llama_model_quantize_default_params()
        params.ftype = qt.ftype
        params.dry_run = True
        with backend.capture_log() as log:
            rc = lib.llama_model_quantize(str(src).encode(), str(tmp_path / "none.gguf").encode(), ctypes.byref(params))
        text = "".join(log)
        assert rc == 0, qt.name
        reported = {m.group(1): (m.group(3) or m.group(2)).upper() for m in _DRY_LINE.finditer(text)}
        assert reported == tensor_types(shape, qt), qt.name
        total_mib = float(re.search(r"quant size\s*=\s*([\d.]+) MiB", text).group(1))
        data = predict_size(shape, qt) - -(-shape.header_bytes // 32) * 32
        assert data / 2**20 == pytest.approx(total_mib, abs=0.01), qt.name


def test_free_space_is_checked_before_writing(k_gguf, tmp_path, monkeypatch):
    from qwq_local import constants
    from qwq_local.errors import DiskSpaceError

    monkeypatch.setattr(constants, "DISK_SPACE_MARGIN_BYTES", 1 << 60)  # no disk has this much room
    out = tmp_path / "q.gguf"
    with pytest.raises(DiskSpaceError, match="Q4_K_M"):
        quantize(k_gguf, out, qtype="Q4_K_M")
    r = runner.invoke(app, ["quantize", str(k_gguf), str(out), "--type", "Q4_K_M", "--dry-run"])
    assert r.exit_code == DiskSpaceError.exit_code and "free" in r.output
    r = runner.invoke(app, ["quantize", str(k_gguf), str(k_gguf), "--type", "Q4_K_M", "--dry-run"])
    assert r.exit_code == UsageError.exit_code
    assert list(tmp_path.iterdir()) == []


def test_unusable_output_directory_is_a_one_line_error(k_gguf, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    with pytest.raises(UsageError, match="is not a directory"):
        quantize(k_gguf, blocker / "q.gguf", qtype="Q8_0")
    with pytest.raises(UsageError, match="is a directory"):  # checked before quantizing, not at the rename
        quantize(k_gguf, tmp_path, qtype="Q8_0")
    for extra in ([], ["--dry-run"]):
        r = runner.invoke(app, ["quantize", str(k_gguf), str(blocker / "q.gguf"), "--type", "Q8_0", *extra])
        assert r.exit_code == UsageError.exit_code and not isinstance(r.exception, OSError)
        assert r.output.startswith("error: cannot write") and len(r.output.strip().splitlines()) == 1


def test_release_checks_names_and_output_before_creating_anything(tiny_checkpoint, tmp_path):
    from qwq_local.quantize.release import build_release

    with pytest.raises(QuantizeError, match="unknown quantization type"):
        build_release(tiny_checkpoint, tmp_path / "rel", quants=["Q9"])
    assert not (tmp_path / "rel").exists()
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    for out in (blocker, blocker / "rel"):
        with pytest.raises(UsageError):
            build_release(tiny_checkpoint, out, quants=["Q8_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
