"""The converter: metadata as llama.cpp writes it, tensor layout and data, safety (atomic
output, refusing to overwrite inputs), the CLI, and fidelity against llama.cpp itself."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qwq_local import constants
from qwq_local.convert.pipeline import convert
from qwq_local.errors import CheckpointError, ModelNotFoundError, UsageError
from qwq_local.synthetic.factory import load_tiny_weights, make_tiny_checkpoint


def _fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def _tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


# --- metadata --------------------------------------------------------------------------------

def test_metadata_matches_llama_cpp_converter(tiny_gguf, tiny_checkpoint):
    f = _fields(tiny_gguf)
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    tok = json.loads((tiny_checkpoint / "tokenizer.json").read_text())
    tok_cfg = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    expected = {
        "general.architecture": "qwen2",
        "general.type": "model",
        "general.file_type": 32,  # MOSTLY_BF16
        "general.quantization_version": 2,
        "qwen2.context_length": 131072,
        "qwen2.embedding_length": 320,
        "qwen2.block_count": 2,
        "qwen2.feed_forward_length": 1024,
        "qwen2.attention.head_count": 10,
        "qwen2.attention.head_count_kv": 2,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.bos_token_id": cfg["bos_token_id"],
        "tokenizer.ggml.eos_token_id": cfg["eos_token_id"],  # <|im_end|>
        "tokenizer.ggml.padding_token_id": cfg["bos_token_id"],  # <|endoftext|>
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
        "general.sampling.top_k": 40,
        constants.GGUF_NORMALIZER_KEY: "NFC",  # tokenizer.json's normalizer, which llama.cpp skips
    }
    for key, value in expected.items():
        assert f[key] == value, key
    assert f["qwen2.rope.freq_base"] == pytest.approx(1e6)
    assert f["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["general.sampling.temp"] == pytest.approx(0.6)
    assert f["general.sampling.top_p"] == pytest.approx(0.95)
    # generation_config.json's `repetition_penalty`, which llama.cpp's converter records too
    assert f["general.sampling.penalty_repeat"] == pytest.approx(1.0)
    assert f["general.name"] and f["general.size_label"]
    assert f["tokenizer.chat_template"] == tok_cfg["chat_template"]  # verbatim
    assert f["tokenizer.chat_template"] == (constants.__file__ and
                                            (constants.DATA_DIR / "chat_template.jinja").read_text())
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in tok["model"]["merges"]]
    assert len(f["tokenizer.ggml.tokens"]) == len(f["tokenizer.ggml.token_type"]) == cfg["vocab_size"]
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert types[tokens.index("<|im_end|>")] == 3 and types[tokens.index("<|fim_prefix|>")] == 3
    assert types[tokens.index("<think>")] == 4 and types[-1] == 5 and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    assert not any(k.startswith("qwen2.rope.scaling") for k in f)


def test_string_merges_format_is_accepted(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ckpt)
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["model"]["merges"] = [" ".join(m) for m in tok["model"]["merges"]]  # pre-4.45 transformers format
    (ckpt / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    out = convert(ckpt, tmp_path / "m.gguf")
    assert _fields(out)["tokenizer.ggml.merges"] == tok["model"]["merges"]


@pytest.mark.parametrize("normalizer, recorded", [
    (None, "none"), ({"type": "Sequence", "normalizers": [{"type": "NFC"}]}, "NFC"),
    ({"type": "NFKC"}, None), ({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}, None),
])
def test_tokenizer_normalizer_is_recorded_or_refused(tmp_path, tiny_checkpoint, normalizer, recorded):
    from qwq_local.errors import UnsupportedModelError

    ckpt = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ckpt)
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["normalizer"] = normalizer
    (ckpt / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    if recorded is None:
        with pytest.raises(UnsupportedModelError, match="reproduces only NFC"):
            convert(ckpt, tmp_path / "m.gguf")
        assert not (tmp_path / "m.gguf").exists()
        return
    out = convert(ckpt, tmp_path / "m.gguf")
    assert _fields(out)[constants.GGUF_NORMALIZER_KEY] == recorded


def test_model_card_front_matter_is_recorded_like_llama_cpp(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "QwQ-32B"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\npipeline_tag: text-generation\n"
                                    "base_model: Qwen/Qwen2.5-32B\ntags:\n- chat\n---\n# QwQ-32B\n")
    f = _fields(convert(ckpt, tmp_path / "m.gguf"))
    assert f["general.name"] == "QwQ 32B" and f["general.license"] == "apache-2.0"
    assert f["general.base_model.0.repo_url"] == "https://huggingface.co/Qwen/Qwen2.5-32B"
    assert f["general.tags"] == ["chat", "text-generation"] and f["general.languages"] == ["en"]
    (ckpt / "README.md").write_text("---\nlicense: [apache-2.0\n---\n")
    with pytest.raises(CheckpointError, match=r"README\.md: unreadable model card front matter"):
        convert(ckpt, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.parametrize("style", ["legacy", "new"])
def test_yarn_keys_written_when_config_has_rope_scaling(tmp_path, style):
    if style == "new":
        yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    else:
        yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    ckpt = make_tiny_checkpoint(tmp_path / "ck", config_style=style, rope_scaling=yarn, num_hidden_layers=1)
    f = _fields(convert(ckpt, tmp_path / "y.gguf"))
    assert f["qwen2.rope.scaling.type"] == "yarn"
    assert f["qwen2.rope.scaling.factor"] == pytest.approx(4.0)
    assert f["qwen2.rope.scaling.original_context_length"] == 32768
    assert f["qwen2.rope.freq_base"] == pytest.approx(1e6)


def test_new_config_spellings_give_the_same_file_content(tmp_path, tiny_gguf):
    ckpt = make_tiny_checkpoint(tmp_path / "new-style", config_style="new")
    out = convert(ckpt, tmp_path / "new.gguf")
    a, b = _fields(tiny_gguf), _fields(out)
    a.pop("general.name"), b.pop("general.name")  # taken from the directory name
    assert a == b
    ta, tb = _tensors(tiny_gguf), _tensors(out)
    assert list(ta) == list(tb)
    for name in ta:
        assert np.array_equal(np.asarray(ta[name].data), np.asarray(tb[name].data)), name


# --- tensors ---------------------------------------------------------------------------------

def _hf_name(gguf_name: str) -> str:
    from qwq_local.convert.pipeline import _gguf_name

    ckpt_names = [f"model.layers.{i}.{s}" for i in range(2) for s in (
        "input_layernorm.weight", "post_attention_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
        "mlp.up_proj.weight", "self_attn.o_proj.weight") + tuple(
        f"self_attn.{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias"))]
    ckpt_names += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    return {_gguf_name(n): n for n in ckpt_names}[gguf_name]


def test_bf16_tensors_are_exact_copies_and_small_ones_f32(tiny_gguf, tiny_checkpoint):
    weights = load_tiny_weights(tiny_checkpoint)
    tensors = _tensors(tiny_gguf)
    assert len(tensors) == len(weights) == 3 + 2 * 12
    assert "output.weight" in tensors and "token_embd.weight" in tensors and "output_norm.weight" in tensors
    for name, t in tensors.items():
        src = weights[_hf_name(name)]
        if src.ndim == 1:
            assert t.tensor_type.name == "F32", name
            assert np.array_equal(np.asarray(t.data), src), name
        else:
            assert t.tensor_type.name == "BF16", name
            bits = np.asarray(t.data).view(np.uint16).reshape(src.shape)
            assert np.array_equal((bits.astype(np.uint32) << 16).view(np.float32), src), name


@pytest.mark.parametrize("outtype,qtype", [("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0")])
def test_other_outtypes(tmp_path, tiny_checkpoint, outtype, qtype):
    import gguf

    out = convert(tiny_checkpoint, tmp_path / f"m-{outtype}.gguf", outtype=outtype)
    weights = load_tiny_weights(tiny_checkpoint)
    file_types = {"f32": 0, "f16": 1, "q8_0": 7}
    assert _fields(out)["general.file_type"] == file_types[outtype]
    for name, t in _tensors(out).items():
        src = weights[_hf_name(name)]
        want = "F32" if src.ndim == 1 else qtype
        assert t.tensor_type.name == want, name
        # bit-identical to what llama.cpp's converter computes (bf16 -> f32, then gguf-py's
        # reference F16 cast / Q8_0 quantizer), and close to the source values
        expected = gguf.quants.quantize(src, t.tensor_type)
        assert np.asarray(t.data).tobytes() == expected.tobytes(), name
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(src.shape)
        tol = {"F32": 0, "F16": 1e-3, "Q8_0": 1e-2}[want]
        assert np.allclose(got, src, rtol=tol, atol=tol * np.abs(src).max()), name


def _rewrite_shards(src: Path, dst: Path, dtype: str) -> Path:
    """A copy of checkpoint `src` whose shards hold F32 or F16 tensors (same values)."""
    import struct

    shutil.copytree(src, dst)
    np_type = {"F32": np.float32, "F16": np.float16}[dtype]
    weights = load_tiny_weights(src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        names = [n for n, s in index.items() if s == shard]
        header, blobs, offset = {}, [], 0
        for n in names:
            blob = weights[n].astype(np_type).tobytes()
            header[n] = {"dtype": dtype, "shape": list(weights[n].shape), "data_offsets": [offset, offset + len(blob)]}
            blobs.append(blob)
            offset += len(blob)
        raw = json.dumps(header).encode()
        (dst / shard).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return dst


def test_f32_and_f16_source_checkpoints(tmp_path, tiny_checkpoint, tiny_gguf):
    f32_ckpt = _rewrite_shards(tiny_checkpoint, tmp_path / "f32", "F32")
    out = convert(f32_ckpt, tmp_path / "from-f32.gguf", outtype="bf16")
    want = _tensors(tiny_gguf)
    for name, t in _tensors(out).items():  # bf16 values survive f32 -> bf16 exactly
        assert t.tensor_type == want[name].tensor_type and np.array_equal(np.asarray(t.data),
                                                                            np.asarray(want[name].data)), name
    f16_ckpt = _rewrite_shards(tiny_checkpoint, tmp_path / "f16", "F16")
    out = convert(f16_ckpt, tmp_path / "from-f16.gguf", outtype="f16")
    weights = load_tiny_weights(tiny_checkpoint)
    for name, t in _tensors(out).items():
        src = weights[_hf_name(name)]
        assert np.array_equal(np.asarray(t.data).reshape(src.shape), src.astype(np.float16).astype(t.data.dtype))


@pytest.mark.parametrize("mode", ["copy_file_range", "sendfile", "rw"])
def test_every_copy_mode_copies_exact_bytes(tmp_path, mode):
    """copy_file_range is used where the kernel has it; sendfile and pread/pwrite are the
    fallbacks. Each copies a span at unaligned offsets into a preallocated file."""
    from qwq_local.convert.checkpoint import TensorEntry
    from qwq_local.convert.tensors import _Copier

    src = tmp_path / "src.bin"
    payload = os.urandom(3 << 20)
    src.write_bytes(payload)
    dst = tmp_path / "dst.bin"
    dst.write_bytes(b"\0" * (4 << 20))
    entry = TensorEntry("t", src, "BF16", (len(payload) // 2,), 0, len(payload))
    copier = _Copier()
    copier.mode = mode
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    try:
        done, count = 0, len(payload) - 13
        while done < count:
            done += copier.copy(sfd, 13 + done, dfd, 1000 + done, min(1 << 20, count - done), entry)
        with pytest.raises(CheckpointError, match="file ended while copying"):
            copier.copy(sfd, len(payload), dfd, 0, 10, entry)  # nothing left to read
    finally:
        os.close(sfd)
        os.close(dfd)
    assert copier.mode == mode
    data = dst.read_bytes()
    assert data[1000:1000 + count] == payload[13:] and data[:1000] == b"\0" * 1000


def test_chunk_conversions_agree_with_numpy_for_every_bf16_value():
    """The bf16 -> f16 lookup table and the bf16 -> bf16/f32 paths, over all 65536 patterns."""
    from qwq_local.convert.tensors import _convert_chunk

    bits = np.arange(1 << 16, dtype=np.uint16)
    as_f32 = (bits.astype(np.uint32) << 16).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        want_f16 = as_f32.astype(np.float16)
    got_f16 = np.asarray(_convert_chunk(bits.tobytes(), "BF16", "F16", 1)).view(np.float16)
    assert np.array_equal(got_f16, want_f16, equal_nan=True)
    got_f32 = np.asarray(_convert_chunk(bits.tobytes(), "BF16", "F32", 1)).view(np.float32)
    assert np.array_equal(got_f32.view(np.uint32), as_f32.view(np.uint32))
    # f32 -> bf16 rounds to nearest even and keeps NaNs NaN
    f32 = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.inf, np.nan, 3.0e38], dtype=np.float32)
    got = np.asarray(_convert_chunk(f32.tobytes(), "F32", "BF16", 1)).view(np.uint16)
    back = (got.astype(np.uint32) << 16).view(np.float32)
    assert back[0] == 1.0 and back[1] == 1.0 and back[2] == 1.015625 and back[3] == -2.5 and back[4] == np.inf
    assert np.isnan(back[5]) and np.isfinite(back[6])


def test_progress_reports_every_byte(tmp_path, tiny_checkpoint):
    calls = []
    out = convert(tiny_checkpoint, tmp_path / "p.gguf", progress=lambda d, t: calls.append((d, t)))
    total = calls[0][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    import gguf

    reader = gguf.GGUFReader(out)
    assert total == out.stat().st_size - reader.data_offset


# --- safety ----------------------------------------------------------------------------------

def test_failure_leaves_no_file_and_keeps_an_existing_one(tmp_path, tiny_checkpoint):
    out = tmp_path / "m.gguf"

    def boom(done, total):
        if done > total // 2:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        convert(tiny_checkpoint, out, progress=boom)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file
    out.write_bytes(b"previous model")
    with pytest.raises(RuntimeError):
        convert(tiny_checkpoint, out, progress=boom)
    assert out.read_bytes() == b"previous model" and list(tmp_path.iterdir()) == [out]


def test_write_failure_mid_file_leaves_nothing(tmp_path, tiny_checkpoint):
    """A real I/O failure while writing (the file size limit, as a full disk would) becomes a
    DiskSpaceError and removes the partial file."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))\n"
        "from qwq_local.convert import convert\n"
        "from qwq_local.errors import DiskSpaceError\n"
        "try:\n    convert(sys.argv[1], sys.argv[2])\n"
        "except DiskSpaceError as e:\n    print('DSE', e)\n"
    )
    out = tmp_path / "out" / "m.gguf"
    res = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint), str(out)], capture_output=True,
                         text=True, timeout=120)
    assert res.stdout.startswith("DSE") and "incomplete file was removed" in res.stdout, res.stderr
    assert list(out.parent.iterdir()) == []


def test_corrupt_shard_fails_before_writing(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ckpt)
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-2])
    out_dir = tmp_path / "out"
    with pytest.raises(CheckpointError, match=shard.name):
        convert(ckpt, out_dir / "m.gguf")
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


@pytest.mark.parametrize("which", ["shard", "config"])
def test_output_equal_to_an_input_is_refused(tmp_path, tiny_checkpoint, which):
    ckpt = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ckpt)
    target = sorted(ckpt.glob("*.safetensors"))[0] if which == "shard" else ckpt / "config.json"
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    with pytest.raises(UsageError, match="same file as input"):
        convert(ckpt, target)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == before
    link = tmp_path / "alias.gguf"
    link.symlink_to(target)
    with pytest.raises(UsageError, match="same file as input"):
        convert(ckpt, link)


def test_missing_tensor_and_bad_outtype(tmp_path, tiny_checkpoint):
    with pytest.raises(UsageError, match="unknown outtype 'q4_0'"):
        convert(tiny_checkpoint, tmp_path / "x.gguf", outtype="q4_0")
    ckpt = make_tiny_checkpoint(tmp_path / "ck", num_hidden_layers=1)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 2  # config promises a layer the shards do not hold
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\..*' is missing"):
        convert(ckpt, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_offline_repo_id_not_cached_says_what_to_run(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = ("from qwq_local.convert import convert\n"
            "from qwq_local.errors import ModelNotFoundError\n"
            "try:\n    convert('Qwen/QwQ-32B', 'x.gguf')\n"
            "except ModelNotFoundError as e:\n    print('MNF', e)\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.stdout.startswith("MNF"), res.stderr
    assert "HF_HUB_OFFLINE" in res.stdout and "qwq-local convert Qwen/QwQ-32B" in res.stdout
    assert not (tmp_path / "x.gguf").exists()


def test_offline_repo_id_served_from_the_cache(tmp_path, tiny_checkpoint):
    snap = tmp_path / "hub" / "models--Qwen--QwQ-32B" / "snapshots" / ("c0" * 20)
    shutil.copytree(tiny_checkpoint, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("c0" * 20)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "QWQ_LOCAL_NO_PROGRESS": "1"}
    out = tmp_path / "out.gguf"
    res = subprocess.run([sys.executable, "-m", "qwq_local.cli", "convert", "Qwen/QwQ-32B", "-o", str(out)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}" in res.stdout and _fields(out)["general.name"] == "QwQ 32B"


def test_hub_cache_snapshot_layout(tmp_path, tiny_checkpoint, tiny_gguf):
    """A Hugging Face cache snapshot: every file a symlink into ../../blobs, the directory named
    by commit hash. It converts, and general.name comes from the repo, not the hash."""
    repo = tmp_path / "hub" / "models--Qwen--QwQ-32B"
    snap, blobs = repo / "snapshots" / ("ab" * 20), repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny_checkpoint.iterdir():
        blob = blobs / hashlib.sha256(f.name.encode()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    out = convert(snap, tmp_path / "snap.gguf")
    f = _fields(out)
    assert f["general.name"] == "QwQ 32B" and f["general.basename"] == "QwQ"
    # llama.cpp's naming heuristic rejects a "32B" label that is far from the real count
    assert f["general.size_label"] == "3.8M"
    a = _tensors(out)
    b = _tensors(tiny_gguf)
    assert all(np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data)) for n in b)
    with pytest.raises(UsageError, match="same file as input"):  # through the symlink, too
        convert(snap, blobs / hashlib.sha256(b"config.json").hexdigest())


def test_nonexistent_local_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no checkpoint directory"):
        convert(tmp_path / "nope", tmp_path / "x.gguf")


# --- CLI -------------------------------------------------------------------------------------

def test_cli_convert(tmp_path, tiny_checkpoint):
    from qwq_local.cli import app

    runner = CliRunner()
    out = tmp_path / "cli.gguf"
    res = runner.invoke(app, ["convert", str(tiny_checkpoint), "-o", str(out), "--outtype", "f16"])
    assert res.exit_code == 0, res.output
    assert str(out) in res.output and "27 tensors" in res.output and "MiB" in res.output
    assert _fields(out)["general.file_type"] == 1

    res = runner.invoke(app, ["convert", str(tiny_checkpoint), "-o", str(tmp_path / "x.gguf"), "--outtype", "q2"])
    assert res.exit_code == UsageError.exit_code and "error: unknown outtype" in res.output
    res = runner.invoke(app, ["convert", str(tmp_path / "missing"), "-o", str(tmp_path / "x.gguf")])
    assert res.exit_code == ModelNotFoundError.exit_code and "error: no checkpoint directory" in res.output
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    (bad / "model-00002-of-00002.safetensors").write_bytes(b"\xff" * 16)
    res = runner.invoke(app, ["convert", str(bad), "-o", str(tmp_path / "x.gguf")])
    assert res.exit_code == CheckpointError.exit_code and "model-00002-of-00002.safetensors" in res.output
    assert not (tmp_path / "x.gguf").exists()


def test_script_is_a_thin_wrapper(tmp_path, tiny_checkpoint):
    script = Path(__file__).parents[2] / "scripts" / "convert_qwq.py"
    out = tmp_path / "s.gguf"
    res = subprocess.run([sys.executable, str(script), str(tiny_checkpoint), "-o", str(out), "--outtype", "f32"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out) and _fields(out)["general.file_type"] == 0


def test_on_tensor_reports_every_tensor_in_file_order(tmp_path, tiny_checkpoint):
    started, ticks = [], []
    out = convert(tiny_checkpoint, tmp_path / "t.gguf", progress=lambda d, t: ticks.append((d, t)),
                  on_tensor=lambda i, n, name: started.append((i, n, name)))
    names = list(_tensors(out))
    assert started == [(i, len(names), name) for i, name in enumerate(names, 1)]
    assert ticks[-1][0] == ticks[-1][1]  # the two-argument progress contract is unchanged


def _run_on_terminal(argv: list[str], *, cols: int = 160, timeout: float = 120) -> tuple[int, str]:
    """Run argv with stdin/stdout/stderr on a pseudo-terminal of `cols` columns; (rc, output)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    # every update drawn, so a sub-second conversion still shows its bar states
    env = {**os.environ, "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}
    env.pop(constants.ENV_NO_PROGRESS, None)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        if not select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0]:
            proc.kill()  # hung: fail below instead of blocking the suite
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", errors="replace")


@pytest.mark.parametrize("how", ["cli", "script"])
def test_terminal_progress_shows_bytes_and_tensors(tmp_path, tiny_checkpoint, how):
    out = tmp_path / "tty.gguf"
    if how == "cli":
        argv = [sys.executable, "-m", "qwq_local.cli", "convert", str(tiny_checkpoint), "-o", str(out)]
    else:
        argv = [sys.executable, str(Path(__file__).parents[2] / "scripts" / "convert_qwq.py"), str(tiny_checkpoint),
                "-o", str(out)]
    rc, text = _run_on_terminal(argv)
    assert rc == 0, text
    states = [s for s in text.replace("\r", "\n").splitlines() if s.startswith("convert:") and "%|" in s]
    n = len(_tensors(out))
    assert any("tensor 1/" in s for s in states) and any(f"tensor {n}/{n}" in s for s in states), text
    assert all(re.search(r"[\d.]+[kMG]?/[\d.]+[kMG] ", s) for s in states), text  # the bar counts bytes


def test_unusable_output_directory_is_a_one_line_error(tmp_path, tiny_checkpoint):
    from qwq_local.cli import app

    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    with pytest.raises(UsageError, match="is not a directory"):
        convert(tiny_checkpoint, blocker / "sub" / "m.gguf")
    res = CliRunner().invoke(app, ["convert", str(tiny_checkpoint), "-o", str(blocker / "m.gguf")])
    assert res.exit_code == UsageError.exit_code and not isinstance(res.exception, OSError)
    assert res.output.startswith("error: cannot write") and len(res.output.strip().splitlines()) == 1
    assert blocker.read_bytes() == b"x" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.fixture(scope="module")
def medium_checkpoint(tmp_path_factory) -> Path:
    """~100 MB of bf16 weights: converting to f32 takes long enough to be interrupted midway."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("medium") / "ck", hidden_size=1024, num_attention_heads=8,
                                num_key_value_heads=2, intermediate_size=4096, num_hidden_layers=3)


@pytest.mark.parametrize("how", ["cli", "script"])
def test_ctrl_c_is_one_line_and_leaves_nothing(tmp_path, medium_checkpoint, how):
    import signal
    import time

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "m.gguf"
    if how == "cli":
        argv = [sys.executable, "-m", "qwq_local.cli", "convert", str(medium_checkpoint), "-o", str(target),
                "--outtype", "f32"]
    else:
        argv = [sys.executable, str(Path(__file__).parents[2] / "scripts" / "convert_qwq.py"),
                str(medium_checkpoint), "-o", str(target), "--outtype", "f32"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(out_dir.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)  # interrupt once the temporary output exists: mid-write
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr and stderr.strip().splitlines() == ["interrupted"], stderr
    assert list(out_dir.iterdir()) == []


def test_outtype_is_case_insensitive_like_quantize_types(tmp_path, tiny_checkpoint):
    from qwq_local.cli import app

    assert _fields(convert(tiny_checkpoint, tmp_path / "a.gguf", outtype="Q8_0"))["general.file_type"] == 7
    res = CliRunner().invoke(app, ["convert", str(tiny_checkpoint), "-o", str(tmp_path / "b.gguf"), "--outtype", "F16"])
    assert res.exit_code == 0, res.output
    assert "f16)" in res.output and _fields(tmp_path / "b.gguf")["general.file_type"] == 1
