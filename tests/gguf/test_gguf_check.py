"""Our GGUF validator against valid files, llama.cpp's test-gguf.cpp fault classes, invalid
UTF-8, vocabulary faults, truncation at many points and random corruption: every bad file gives
one BadModelFileError line, never another exception."""

from __future__ import annotations

import os
import random
import struct
import time
from pathlib import Path

import pytest

import gguf_craft as gc
from qwq_local import inspect_gguf
from qwq_local.errors import BadModelFileError, ModelNotFoundError
from qwq_local.gguf.check import GGUFInfo


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return gc.write_tiny_qwen2(tmp_path_factory.mktemp("craft") / "tiny-qwen2.gguf")


def write(tmp_path: Path, data: bytes, name: str = "x.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def fault(tmp_path: Path, data: bytes) -> str:
    path = write(tmp_path, data)
    with pytest.raises(BadModelFileError) as exc:
        inspect_gguf(path)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def offset_of(message: str) -> int:
    assert message.endswith(")")
    return int(message.rsplit("(at byte offset ", 1)[1][:-1])


# --- valid files ----------------------------------------------------------------------------

def test_tiny_model_matches_the_gguf_packages_reader(tiny_model):
    import gguf

    info = inspect_gguf(tiny_model)
    ref = gguf.GGUFReader(str(tiny_model))
    assert isinstance(info, GGUFInfo)
    assert (info.version, info.alignment, info.architecture, info.quant) == (3, 32, "qwen2", "F32")
    assert info.name == "tiny qwq-shaped test model"
    assert info.file_size == tiny_model.stat().st_size
    assert info.data_offset % 32 == 0
    assert [t.name for t in info.tensors] == [t.name for t in ref.tensors]
    for ours, theirs in zip(info.tensors, ref.tensors):
        assert ours.shape == tuple(int(d) for d in theirs.shape)
        assert info.data_offset + ours.offset == theirs.data_offset
        assert ours.nbytes == theirs.n_bytes
        assert ours.type_name == theirs.tensor_type.name
    assert info.n_params == sum(int(t.n_elements) for t in ref.tensors)
    assert info.tensor_bytes == sum(int(t.n_bytes) for t in ref.tensors)
    assert info.arch_value("block_count") == ref.fields["qwen2.block_count"].contents() == 1
    assert info.tokens == ref.fields["tokenizer.ggml.tokens"].contents()
    assert info.vocab_size == 2048 == info.tensor("token_embd.weight").shape[1]
    assert info.template_status() == "original"
    assert info.warnings == []


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_model(tmp_path, qtype):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    info = inspect_gguf(gc.write_tiny_qwen2(tmp_path / "q.gguf", qtype=qtype))
    assert info.quant == qtype
    assert info.tensor_type_counts() == {qtype: 9, "F32": 6}  # matrices quantized, norms/biases not
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    q = info.tensor("blk.0.attn_q.weight")
    assert q.nbytes == 64 * 64 // block * size


def test_converter_output_passes(tiny_gguf):
    info = inspect_gguf(tiny_gguf)
    assert info.architecture == "qwen2"
    assert info.template_status() == "original"
    assert info.vocab_size == info.tensor("token_embd.weight").shape[1]
    assert info.tensor_type_counts()


def test_template_status_altered_and_missing(tmp_path):
    altered = gc.write_tiny_qwen2(tmp_path / "a.gguf", template="{{ messages[0].content }}")
    assert inspect_gguf(altered).template_status() == "altered"
    missing = inspect_gguf(gc.write_tiny_qwen2(tmp_path / "m.gguf", template=None))
    assert missing.template_status() == "missing"
    assert any("chat_template" in w for w in missing.warnings)


def test_valid_raw_baseline(tmp_path):
    # Every fault below is this file with one thing changed, so it must itself be valid.
    info = inspect_gguf(write(tmp_path, gc.valid_raw()))
    assert [t.name for t in info.tensors] == ["t0", "t1"]
    assert info.tokens == gc.TOKENS
    assert info.warnings == []


def test_header_only_file_is_valid_with_warnings(tmp_path):
    # test-gguf.cpp's HEADER_EMPTY: llama.cpp's reader accepts it; it is no model, so we warn.
    info = inspect_gguf(write(tmp_path, gc.build([], [])))
    assert info.tensors == [] and info.metadata == {}
    assert any("general.architecture" in w for w in info.warnings)


def test_custom_alignment_one_is_valid(tmp_path):
    # TENSORS_CUSTOM_ALIGN / DATA_CUSTOM_ALIGN: general.alignment = 1 packs tensors tightly.
    kvs = gc.base_kvs() + [gc.kv_u32("general.alignment", 1)]
    infos = [gc.tensor_info("t0", [3], gc.GGML_F32, 0), gc.tensor_info("t1", [5], gc.GGML_F32, 12)]
    info = inspect_gguf(write(tmp_path, gc.build(kvs, infos, bytes(32), alignment=1)))
    assert info.alignment == 1
    assert [t.offset for t in info.tensors] == [0, 12]


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(BadModelFileError, match="not a regular file"):
        inspect_gguf(fifo)


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError):
        inspect_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError):
        inspect_gguf(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not a valid file path"):
        inspect_gguf(str(tmp_path / "a\0b.gguf"))


def test_qwq_sized_header_of_a_huge_sparse_file_is_read_quickly(tmp_path):
    """152064 tokens, as many merges and a 40 GB (sparse) data section: only the header is read."""
    n = 152064
    tokens = [f"tok{i}\u00e9" for i in range(n)]
    kvs = gc.base_kvs(tokens)[:3] + [
        gc.kv_str_array("tokenizer.ggml.tokens", tokens),
        gc.kv_i32_array("tokenizer.ggml.token_type", [1] * n),
        gc.kv_str_array("tokenizer.ggml.merges", [f"t{i} k{i}" for i in range(n)]),
    ]
    infos, offset = [], 0
    for i in range(771):
        dims = [5120, 5120] if i % 2 else [5120]
        infos.append(gc.tensor_info(f"blk.{i}.w", dims, gc.GGML_F32, offset))
        offset += 4 * dims[0] * (dims[1] if len(dims) > 1 else 1)
    head = gc.build(kvs, infos)
    path = tmp_path / "big.gguf"
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + offset)
    start = time.perf_counter()
    info = inspect_gguf(path)
    elapsed = time.perf_counter() - start
    assert info.vocab_size == n and len(info.tensors) == 771
    assert info.file_size > 40 * 10**9
    assert elapsed < 10, f"header parse took {elapsed:.1f}s"


# --- llama.cpp's test-gguf.cpp fault classes -------------------------------------------------

def _two_tensors(*infos: bytes, data: bytes | None = None, kvs: list | None = None, **kw) -> bytes:
    base_infos, base_data = gc.base_tensors()
    return gc.build(gc.base_kvs() if kvs is None else kvs, list(infos) or base_infos,
                    base_data if data is None else data, **kw)


HEADER_CASES = {
    "bad_magic": (gc.valid_raw(magic=b"FUGG"), "not a GGUF file", 0),
    "version_0": (gc.valid_raw(version=0), "unsupported GGUF version 0", 4),
    "version_1": (gc.valid_raw(version=1), "unsupported GGUF version 1", 4),
    "version_future": (gc.valid_raw(version=4), "unsupported GGUF version 4", 4),
    "big_endian": (gc.valid_raw(version=3 << 24), "big-endian", 4),
    "huge_n_tensors": (gc.valid_raw(n_tensors=2**64 - 1), "tensor count", 8),
    "huge_n_kv": (gc.valid_raw(n_kv=2**64 - 1), "key/value count", 16),
    "n_kv_one_too_many": (gc.valid_raw(n_kv=len(gc.base_kvs()) + 1), "", None),
    "empty_file": (b"", "not a GGUF file", 0),
    "three_bytes": (b"GGU", "not a GGUF file", 0),
}


@pytest.mark.parametrize("case", HEADER_CASES, ids=list(HEADER_CASES))
def test_header_faults(tmp_path, case):
    data, expected, offset = HEADER_CASES[case]
    message = fault(tmp_path, data)
    assert expected in message
    if offset is not None:
        assert offset_of(message) == offset


PREFIX = 4 + 4 + 8 + 8  # magic, version, n_tensors, n_kv


def test_kv_bad_key_size(tmp_path):
    bad = gc.u64(2**64 - 1) + b"general.name" + gc.u32(gc.STRING) + gc.gstr("x")
    message = fault(tmp_path, _two_tensors(kvs=[bad] + gc.base_kvs()))
    assert "key #0" in message and "remain in the file" in message
    assert offset_of(message) == PREFIX


def test_kv_huge_but_present_key_is_bounded(tmp_path):
    kvs = [gc.kv_str("k" * 100, "v")]
    data = gc.build(kvs, [])
    big_len = struct.pack("<Q", 2**40)
    message = fault(tmp_path, data[:PREFIX] + big_len + data[PREFIX + 8:])
    assert "claims 1099511627776 bytes" in message


def test_kv_empty_key(tmp_path):
    message = fault(tmp_path, _two_tensors(kvs=[gc.kv_str("", "x")] + gc.base_kvs()))
    assert "key #0 is empty" in message


@pytest.mark.parametrize("vtype", [13, 2**31, 2**32 - 1])
def test_kv_bad_type(tmp_path, vtype):
    message = fault(tmp_path, _two_tensors(kvs=gc.base_kvs() + [gc.kv("my_key", vtype, b"\1")]))
    assert f"'my_key' has unknown value type {vtype}" in message


def test_kv_array_of_arrays_is_refused(tmp_path):
    nested = gc.kv("my_key", gc.ARRAY, gc.u32(gc.ARRAY) + gc.u64(1) + gc.u32(gc.U8) + gc.u64(1) + b"\1")
    message = fault(tmp_path, _two_tensors(kvs=gc.base_kvs() + [nested]))
    assert "invalid element type 9" in message


def test_kv_huge_array_count(tmp_path):
    huge = gc.kv("my_key", gc.ARRAY, gc.u32(gc.U32) + gc.u64(2**62))
    message = fault(tmp_path, _two_tensors(kvs=gc.base_kvs() + [huge]))
    assert "claims 4611686018427387904 elements" in message


def test_kv_array_count_bounded_even_when_the_bytes_exist(tmp_path):
    # Five million one-byte elements fit the file, but would become five million objects.
    n = 5 * 1024 * 1024
    big = gc.kv("my_key", gc.ARRAY, gc.u32(gc.U8) + gc.u64(n) + bytes(n))
    message = fault(tmp_path, _two_tensors(kvs=gc.base_kvs() + [big]))
    assert f"array 'my_key' has {n} elements, over the limit" in message


def test_kv_duplicate_key(tmp_path):
    kvs = gc.base_kvs() + [gc.kv_str("general.name", "again")]
    message = fault(tmp_path, _two_tensors(kvs=kvs))
    assert "duplicate key 'general.name'" in message
    assert offset_of(message) == PREFIX + sum(len(k) for k in gc.base_kvs())


@pytest.mark.parametrize("alignment", [0, 13, 48, 2**31 + 1])
def test_kv_bad_alignment(tmp_path, alignment):
    kvs = gc.base_kvs() + [gc.kv_u32("general.alignment", alignment)]
    message = fault(tmp_path, _two_tensors(kvs=kvs))
    assert f"general.alignment {alignment} is not a power of two" in message


def test_kv_wrong_type_alignment(tmp_path):
    kvs = gc.base_kvs() + [gc.kv("general.alignment", gc.I32, struct.pack("<i", 32))]
    message = fault(tmp_path, _two_tensors(kvs=kvs))
    assert "general.alignment must be UINT32, not INT32" in message


TENSOR_CASES = {
    "name_too_long": ([gc.tensor_info("t" * 64, [32])], "longer than ggml's 63 bytes"),
    "empty_name": ([gc.tensor_info("", [32])], "empty name"),
    "n_dims_5": ([gc.tensor_info("t0", [32, 1, 1, 1, 1])], "has 5 dimensions"),
    "n_dims_0": ([gc.tensor_info("t0", [])], "has 0 dimensions"),
    "n_dims_huge": ([gc.tensor_info("t0", [32], n_dims=2**32 - 1)], "has 4294967295 dimensions"),
    "negative_dim": ([gc.tensor_info("t0", [-1])], "dimension 0 = -1"),
    "zero_dim": ([gc.tensor_info("t0", [32, 0])], "dimension 1 = 0"),
    "ne_too_big": ([gc.tensor_info("t0", [4 * (2**31 - 1)] * 2)], "more elements than int64"),
    "ne_overflow_4d": ([gc.tensor_info("t0", [2**20, 2**20, 2**20, 2**20])], "more elements than int64"),
    "nbytes_too_big": ([gc.tensor_info("t0", [2**31, 2**31], gc.GGML_I64)], "data is missing"),
    "bad_type_count": ([gc.tensor_info("t0", [32], 42)], "unknown ggml type 42"),
    "bad_type_removed": ([gc.tensor_info("t0", [32], 4)], "unknown ggml type 4"),
    "bad_type_negative": ([gc.tensor_info("t0", [32], 2**32 - 1)], "unknown ggml type 4294967295"),
    "row_not_block_multiple": ([gc.tensor_info("t0", [33], gc.GGML_Q4_0)], "not a multiple of its block size 32"),
    "offset_max": ([gc.tensor_info("t0", [32], offset=2**64 - 1)], "not a multiple of the alignment"),
    "offset_unaligned": ([gc.tensor_info("t0", [32]), gc.tensor_info("t1", [8, 2], offset=130)],
                         "not a multiple of the alignment 32"),
    "offset_overlap": ([gc.tensor_info("t0", [32]), gc.tensor_info("t1", [8, 2], offset=96)], "overlaps"),
    "offset_gap": ([gc.tensor_info("t0", [32]), gc.tensor_info("t1", [8, 2], offset=160)], "leaves a gap"),
    "offset_beyond_file": ([gc.tensor_info("t0", [32], offset=2**40)], "leaves a gap"),
    "duplicate_name": ([gc.tensor_info("t0", [32]), gc.tensor_info("t0", [8, 2], offset=128)],
                       "duplicate tensor name 't0'"),
    "mem_size_overflow": ([gc.tensor_info("t0", [0x7FFFFFFFFFFFFFC0], 24),
                           gc.tensor_info("t1", [0x7FFFFFFFFFFFFFC0], 24, 0x7FFFFFFFFFFFFFC0)], "data is missing"),
}


@pytest.mark.parametrize("case", TENSOR_CASES, ids=list(TENSOR_CASES))
def test_tensor_faults(tmp_path, case):
    infos, expected = TENSOR_CASES[case]
    assert expected in fault(tmp_path, _two_tensors(*infos))


def test_tensor_fault_offset_points_at_the_tensor_info(tmp_path):
    infos = [gc.tensor_info("t0", [32]), gc.tensor_info("t1", [8, 2], offset=96)]
    message = fault(tmp_path, _two_tensors(*infos))
    raw = (tmp_path / "x.gguf").read_bytes()
    at = offset_of(message)
    assert struct.unpack_from("<Q", raw, at)[0] == 96  # the offending offset field itself


def test_data_not_enough(tmp_path):
    _, data = gc.base_tensors()
    message = fault(tmp_path, _two_tensors(data=data[:-1]))
    assert "'t1' needs bytes up to" in message and "data is missing" in message


def test_data_inconsistent_alignment(tmp_path):
    # DATA_INCONSISTENT_ALIGN: offsets laid out for alignment 1 in a file that declares 32.
    infos = [gc.tensor_info("t0", [3]), gc.tensor_info("t1", [5], offset=12)]
    assert "not a multiple of the alignment 32" in fault(tmp_path, _two_tensors(*infos, data=bytes(64)))


# --- strings, vocabulary, template -----------------------------------------------------------

def test_invalid_utf8_in_key(tmp_path):
    kvs = gc.base_kvs() + [gc.kv_str(b"general.\xffname", "x")]
    message = fault(tmp_path, _two_tensors(kvs=kvs))
    assert "is not valid UTF-8" in message
    raw = (tmp_path / "x.gguf").read_bytes()
    assert raw[offset_of(message)] == 0xFF


def test_invalid_utf8_in_string_value(tmp_path):
    kvs = gc.base_kvs()
    kvs[1] = gc.kv_str("general.name", b"caf\xc3\x28")
    message = fault(tmp_path, _two_tensors(kvs=kvs))
    assert "the value of 'general.name' is not valid UTF-8" in message
    raw = (tmp_path / "x.gguf").read_bytes()
    assert raw[offset_of(message)] == 0xC3


def test_invalid_utf8_in_token(tmp_path):
    kvs = gc.base_kvs([b"a", b"b", b"\xed\xa0\x80", b"ab", b"<|endoftext|>", b"<|im_end|>"])  # a surrogate
    message = fault(tmp_path, _two_tensors(kvs=kvs))
    assert "tokenizer.ggml.tokens[2] is not valid UTF-8" in message


def test_invalid_utf8_in_tensor_name(tmp_path):
    infos = [gc.tensor_info(b"t\x80", [32]), gc.tensor_info("t1", [8, 2], offset=128)]
    assert "the name of tensor #0 is not valid UTF-8" in fault(tmp_path, _two_tensors(*infos))


def test_duplicate_vocabulary_tokens(tmp_path):
    tokens = ["a", "b", "c", "b", "<|endoftext|>", "<|im_end|>"]
    message = fault(tmp_path, _two_tensors(kvs=gc.base_kvs(tokens)))
    assert "duplicate token 'b' at ids 1 and 3" in message
    raw = (tmp_path / "x.gguf").read_bytes()
    at = offset_of(message)
    assert raw[at:at + 9] == gc.gstr("b")  # offset of the second 'b' element


def test_duplicate_tokens_in_a_real_vocabulary(tmp_path):
    tokens, _, _ = gc.tiny_vocab()
    path = gc.write_tiny_qwen2(tmp_path / "dup.gguf", tokens=tokens[:100] + [tokens[7]] + tokens[101:])
    with pytest.raises(BadModelFileError, match="duplicate token .* at ids 7 and 100"):
        inspect_gguf(path)


@pytest.mark.parametrize("where", ["token", "key", "value", "tensor"])
def test_nul_bytes_are_refused(tmp_path, where):
    # llama.cpp would read "b\0x" as "b": a duplicate token (abort), key or tensor name.
    kvs, infos = gc.base_kvs(), []
    if where == "token":
        kvs = gc.base_kvs(["a", "b", "b\0x", "ab", "<|endoftext|>", "<|im_end|>"])
    elif where == "key":
        kvs.append(gc.kv_str("general.name\0x", "y"))
    elif where == "value":
        kvs[1] = gc.kv_str("general.name", "na\0me")
    else:
        infos = [gc.tensor_info("t0", [32]), gc.tensor_info("t0\0x", [8, 2], offset=128)]
    message = fault(tmp_path, _two_tensors(*infos, kvs=kvs))
    assert "contains a NUL byte" in message
    assert (tmp_path / "x.gguf").read_bytes()[offset_of(message)] == 0


def test_token_type_length_mismatch(tmp_path):
    kvs = gc.base_kvs()
    kvs[4] = gc.kv_i32_array("tokenizer.ggml.token_type", [1] * 5)
    assert "token_type has 5 entries but the vocabulary has 6" in fault(tmp_path, _two_tensors(kvs=kvs))


def test_tokens_missing_for_a_tokenizer(tmp_path):
    kvs = [k for i, k in enumerate(gc.base_kvs()) if i not in (3, 4, 5, 6)]
    assert "tokenizer.ggml.tokens is missing" in fault(tmp_path, _two_tensors(kvs=kvs))


def test_tokens_of_the_wrong_type(tmp_path):
    kvs = gc.base_kvs()
    kvs[3] = gc.kv_i32_array("tokenizer.ggml.tokens", [1, 2, 3])
    assert "must be ARRAY[STRING], not ARRAY[INT32]" in fault(tmp_path, _two_tensors(kvs=kvs))


@pytest.mark.parametrize("key", ["bos", "eos"])
def test_special_token_id_out_of_range(tmp_path, key):
    kvs = gc.base_kvs() + [gc.kv_u32(f"tokenizer.ggml.{key}_token_id", 6)]
    kvs = [k for k in kvs[:-1] if f"{key}_token_id".encode() not in k] + kvs[-1:]
    assert f"tokenizer.ggml.{key}_token_id = 6 is outside the vocabulary (0..5)" in fault(tmp_path, _two_tensors(kvs=kvs))


def test_other_special_id_out_of_range_only_warns(tmp_path):
    kvs = gc.base_kvs() + [gc.kv_u32("tokenizer.ggml.padding_token_id", 99)]
    info = inspect_gguf(write(tmp_path, _two_tensors(kvs=kvs)))
    assert any("padding_token_id = 99" in w for w in info.warnings)


@pytest.mark.parametrize("value,problem", [
    (gc.kv_u32("llama.block_count", 0), "= 0 is outside 1..512"),
    (gc.kv_u32("llama.block_count", 513), "= 513 is outside 1..512"),
    (gc.kv_u32("llama.block_count", 4_000_000_000), "= 4000000000 is outside 1..512"),
    (gc.kv_str("llama.block_count", "two"), "must be UINT32 (llama.cpp refuses other types), not STRING"),
])
def test_block_count_out_of_llama_cpps_range(tmp_path, value, problem):
    # llama.cpp aborts on these; a huge count would also make every per-layer loop run forever.
    message = fault(tmp_path, _two_tensors(kvs=gc.base_kvs() + [value]))
    assert f"llama.block_count {problem}" in message


def test_block_count_in_range_is_valid(tmp_path):
    info = inspect_gguf(write(tmp_path, _two_tensors(kvs=gc.base_kvs() + [gc.kv_u32("llama.block_count", 512)])))
    assert info.arch_value("block_count") == 512


@pytest.mark.parametrize("eps", [-1e-6, -7e-45, float("nan"), float("inf")])
def test_norm_epsilon_that_makes_ggml_abort_on_the_first_token(tmp_path, eps):
    # ggml's rms_norm asserts eps >= 0 at compute time: no load check sees it, the first decode dies.
    value = gc.kv("llama.attention.layer_norm_rms_epsilon", gc.F32, struct.pack("<f", eps))
    message = fault(tmp_path, _two_tensors(kvs=gc.base_kvs() + [value]))
    assert "llama.attention.layer_norm_rms_epsilon = " in message and "not a finite non-negative" in message


def test_zero_norm_epsilon_is_valid(tmp_path):
    value = gc.kv("llama.attention.layer_norm_epsilon", gc.F32, struct.pack("<f", 0.0))
    inspect_gguf(write(tmp_path, _two_tensors(kvs=gc.base_kvs() + [value])))


def test_embedding_rows_must_match_the_vocabulary(tmp_path):
    tokens, _, _ = gc.tiny_vocab()
    path = gc.write_tiny_qwen2(tmp_path / "v.gguf", tokens=tokens[:-1], embedding_rows=len(tokens))
    with pytest.raises(BadModelFileError, match="2047 tokens but token_embd.weight has 2048 rows"):
        inspect_gguf(path)


@pytest.mark.parametrize("template", ["{% for %}", "{{ messages[0] }", "{% if x %}" * 3000])
def test_chat_template_that_does_not_compile(tmp_path, template):
    kvs = gc.base_kvs()
    kvs[7] = gc.kv_str("tokenizer.chat_template", template)
    assert "tokenizer.chat_template does not compile" in fault(tmp_path, _two_tensors(kvs=kvs))


# --- truncation and corruption -----------------------------------------------------------------

def test_truncated_raw_file_at_every_byte(tmp_path):
    data = gc.valid_raw()
    for cut in range(len(data)):
        message = fault(tmp_path, data[:cut])
        assert message


def test_truncated_model_at_many_points(tmp_path, tiny_model):
    data = tiny_model.read_bytes()
    info = inspect_gguf(tiny_model)
    # Every 7th byte where the fixed keys and the tensor infos are, sparser through the
    # vocabulary arrays in between, plus both sides of every field boundary.
    head = info.data_offset
    cuts = set(range(0, 8192, 7)) | set(range(head - 4096, head, 7)) | set(range(8192, head, 499))
    for at in [*info.field_offsets["values"].values(), *info.field_offsets["tensors"]]:
        cuts |= {at - 1, at, at + 1, at + 5}
    data_len = len(data) - info.data_offset
    cuts |= {info.data_offset + data_len * k // 13 for k in range(13)} | {len(data) - 1}
    for cut in sorted(cuts):
        fault(tmp_path, data[:cut])


def test_random_corruption_never_raises_anything_else(tmp_path):
    data = gc.valid_raw()
    rng = random.Random(1234)
    outcomes = {"ok": 0, "bad": 0}
    for _ in range(400):
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        path = write(tmp_path, bytes(corrupt))
        try:
            inspect_gguf(path)
            outcomes["ok"] += 1
        except BadModelFileError as exc:
            assert "\n" not in str(exc)
            outcomes["bad"] += 1
    assert outcomes["bad"] > 100  # most corruptions of the header region are caught

