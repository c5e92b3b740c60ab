"""Importance matrices: both llama.cpp file formats (written here), validation against the
model, and that the data reaches llama_model_quantize exactly as llama-quantize passes it."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import numpy as np
import pytest

from qwq_local.backend import binding as backend
from qwq_local.errors import ImatrixError
from qwq_local.gguf.check import inspect_gguf
from qwq_local.quantize.imatrix import (Imatrix, ImatrixEntry, read_imatrix, write_imatrix_dat, write_imatrix_gguf)
from qwq_local.quantize.predict import allows_quantization, read_shape
from qwq_local.quantize.quantizer import quantize


def make_imatrix(gguf_path: Path, *, seed: int = 0, chunk_size: int = 512) -> Imatrix:
    """What llama-imatrix would collect: per weight matrix fed by activations (not the token
    embedding, not the output unless asked), summed squares per input column and a count."""
    rng = np.random.default_rng(seed)
    entries = {}
    for t in read_shape(gguf_path).tensors:
        if not allows_quantization(t) or t.name in ("token_embd.weight", "output.weight"):
            continue
        count = 4 * chunk_size
        sums = (rng.gamma(2.0, 1.0, size=t.ne[0]) * count).astype(np.float32)
        entries[t.name] = ImatrixEntry(sums=sums, counts=np.array([count], dtype=np.float64))
    return Imatrix(entries=entries, datasets=["tests/imatrix-text.txt"], chunk_count=4, chunk_size=chunk_size)


def test_gguf_format_round_trip(k_gguf, tmp_path):
    im = make_imatrix(k_gguf)
    path = write_imatrix_gguf(tmp_path / "imatrix.gguf", im)
    back = read_imatrix(path)
    assert not back.legacy and back.datasets == im.datasets and back.chunk_count == 4 and back.chunk_size == 512
    assert set(back.entries) == set(im.entries)
    name = "blk.1.ffn_down.weight"
    np.testing.assert_array_equal(back.entries[name].sums, im.entries[name].sums)
    # normalised as llama-quantize does: in_sum2 / counts
    np.testing.assert_allclose(back.values(name), im.entries[name].sums / im.entries[name].counts[0], rtol=1e-6)
    # the file is what llama.cpp writes: general.type=imatrix, <name>.in_sum2 and <name>.counts
    info = inspect_gguf(path)
    assert info.metadata["general.type"] == "imatrix"
    names = {t.name for t in info.tensors}
    assert f"{name}.in_sum2" in names and f"{name}.counts" in names


def test_legacy_dat_round_trip(k_gguf, tmp_path):
    im = make_imatrix(k_gguf)
    path = write_imatrix_dat(tmp_path / "imatrix.dat", im)
    raw = path.read_bytes()
    assert struct.unpack("<i", raw[:4])[0] == len(im.entries)
    back = read_imatrix(path)
    assert back.legacy and back.chunk_count == 4 and back.datasets == ["tests/imatrix-text.txt"]
    name = "blk.0.attn_q.weight"
    assert back.entries[name].counts[0] == 4  # ncall = ceil(count / chunk_size)
    np.testing.assert_allclose(back.values(name), im.entries[name].sums / im.entries[name].counts[0], rtol=1e-5)


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_imatrix_types_quantize_with_either_format(k_gguf, tmp_path, fmt):
    im = make_imatrix(k_gguf)
    writer = write_imatrix_gguf if fmt == "gguf" else write_imatrix_dat
    path = writer(tmp_path / f"imatrix.{fmt}", im)
    r = quantize(k_gguf, tmp_path / "iq2.gguf", qtype="IQ2_XXS", imatrix=path)
    info = inspect_gguf(r.output)
    assert info.quant == "IQ2_XXS"
    assert "IQ2_XXS" in {t.type_name for t in info.tensors}
    # recorded as llama-quantize records it
    assert info.metadata["quantize.imatrix.file"] == str(path)
    assert info.metadata["quantize.imatrix.entries_count"] == len(im.entries)
    assert info.metadata["quantize.imatrix.chunks_count"] == 4
    assert info.metadata["quantize.imatrix.dataset"] == "tests/imatrix-text.txt"


def test_imatrix_output_is_byte_identical_to_direct_call(k_gguf, tmp_path):
    im = make_imatrix(k_gguf, seed=3)
    path = write_imatrix_gguf(tmp_path / "im.gguf", im)
    ours = quantize(k_gguf, tmp_path / "ours.gguf", qtype="Q4_K_M", imatrix=path, threads=2)
    plain = quantize(k_gguf, tmp_path / "plain.gguf", qtype="Q4_K_M", threads=2)
    assert ours.output.read_bytes() != plain.output.read_bytes()  # the imatrix did reach llama.cpp

    # the same call built by hand, the way tools/quantize/quantize.cpp builds it
    lib = backend.llama()
    names = list(im.entries)
    values = [np.ascontiguousarray(im.entries[n].sums / np.float32(im.entries[n].counts[0]), dtype=np.float32)
              for n in names]
    arr = (lib.llama_model_imatrix_data * (len(names) + 1))()
    for i, (n, v) in enumerate(zip(names, values)):
        arr[i].name = n.encode()
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = len(v)
    kv = (lib.llama_model_kv_override * 5)()
    items = [("quantize.imatrix.file", str(path)), ("quantize.imatrix.dataset", "tests/imatrix-text.txt"),
             ("quantize.imatrix.entries_count", len(names)), ("quantize.imatrix.chunks_count", 4)]
    for i, (key, value) in enumerate(items):
        kv[i].key = key.encode()
        if isinstance(value, str):
            kv[i].tag = lib.LLAMA_KV_OVERRIDE_TYPE_STR
            kv[i].value.val_str = value.encode()
        else:
            kv[i].tag = lib.LLAMA_KV_OVERRIDE_TYPE_INT
            kv[i].value.val_i64 = value
    params = lib.llama_model_quantize_default_params()
    params.ftype = lib.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    params.imatrix = ctypes.cast(arr, ctypes.POINTER(lib.llama_model_imatrix_data))
    params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(lib.llama_model_kv_override))
    direct = tmp_path / "direct.gguf"
    assert lib.llama_model_quantize(str(k_gguf).encode(), str(direct).encode(), ctypes.byref(params)) == 0
    assert ours.output.read_bytes() == direct.read_bytes()


def test_imatrix_for_another_model_is_rejected(k_gguf, tiny_gguf, tmp_path):
    # made for the 320-wide model: same names, other row lengths
    other = write_imatrix_gguf(tmp_path / "other.gguf", make_imatrix(tiny_gguf))
    with pytest.raises(ImatrixError, match="another shape"):
        quantize(k_gguf, tmp_path / "a.gguf", qtype="Q4_K_M", imatrix=other)
    # names this model does not have
    im = make_imatrix(k_gguf)
    im.entries["blk.7.attn_q.weight"] = im.entries.pop("blk.0.attn_q.weight")
    bad = write_imatrix_dat(tmp_path / "names.dat", im)
    with pytest.raises(ImatrixError, match="another model"):
        quantize(k_gguf, tmp_path / "b.gguf", qtype="Q4_K_M", imatrix=bad)
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()


def test_imatrix_missing_a_required_tensor_is_rejected(k_gguf, tmp_path):
    im = make_imatrix(k_gguf)
    del im.entries["blk.1.ffn_up.weight"]
    path = write_imatrix_gguf(tmp_path / "partial.gguf", im)
    with pytest.raises(ImatrixError, match="blk.1.ffn_up.weight"):
        quantize(k_gguf, tmp_path / "c.gguf", qtype="IQ2_XXS", imatrix=path)
    # for a type that does not need it, a partial imatrix is used with a warning
    r = quantize(k_gguf, tmp_path / "d.gguf", qtype="Q4_K_M", imatrix=path)
    assert r.warnings and "without it" in r.warnings[0]


def test_unreadable_imatrix_files(k_gguf, tmp_path):
    with pytest.raises(ImatrixError, match="not an imatrix"):
        read_imatrix(k_gguf)  # a model, not an imatrix
    good = write_imatrix_dat(tmp_path / "good.dat", make_imatrix(k_gguf))
    (tmp_path / "cut.dat").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ImatrixError, match="truncated"):
        read_imatrix(tmp_path / "cut.dat")
    with pytest.raises(ImatrixError, match="no imatrix file"):
        read_imatrix(tmp_path / "missing.dat")
    im = make_imatrix(k_gguf)
    im.entries["blk.0.attn_k.weight"].sums[3] = np.nan
    nan = write_imatrix_gguf(tmp_path / "nan.gguf", im)
    with pytest.raises(ImatrixError, match="NaN"):
        quantize(k_gguf, tmp_path / "e.gguf", qtype="Q4_K_M", imatrix=nan)
