"""Crafted GGUF files for the untrusted-file tests: a tiny valid qwen2 model written with the
gguf package's own writer, and a raw byte-level builder that can express every fault in
llama.cpp's tests/test-gguf.cpp (which no well-behaved writer would produce)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from qwq_local.synthetic import factory as testing

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
# ggml types
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0, GGML_I64 = 0, 1, 2, 8, 27


# --- a real (tiny) qwen2 model --------------------------------------------------------------

def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """tokens, token types and merges of the project's tiny byte-level BPE plus QwQ's added
    tokens, padded with [PAD<i>] entries as the real QwQ vocabulary is."""
    tok = json.loads((testing.DATA_DIR / "tiny_tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [1] * len(tokens)
    for added in testing.added_tokens():
        tokens.append(added["content"])
        types.append(3 if added["special"] else 4)
    while len(tokens) % 64:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(4)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return tokens, types, merges


def write_tiny_qwen2(path: Path, *, tokens: list[str] | None = None, template: str | None = "original",
                     drop: tuple[str, ...] = (), reshape: dict | None = None, n_embd: int = 64,
                     n_head: int = 4, n_head_kv: int = 2, n_ff: int = 128, n_layer: int = 1,
                     extra: dict | None = None, embedding_rows: int | None = None,
                     qtype: str | None = None, seed: int = 0, output_scale: float = 1.0,
                     token_types: dict[str, int] | None = None) -> Path:
    """A loadable qwen2 GGUF of about 1 MB (f32 weights). `drop` leaves tensors out and
    `reshape` gives tensors other shapes (numpy order), to make files llama.cpp rejects.
    output_scale multiplies the output matrix: sharper logits, wider top-1/top-2 margins.
    token_types: {token text: GGUF token type} overrides (3 CONTROL, 4 USER_DEFINED)."""
    import gguf

    vocab, types, merges = tiny_vocab()
    tokens = vocab if tokens is None else tokens
    types = (types + [1] * len(tokens))[:len(tokens)]
    for text, kind in (token_types or {}).items():
        types[tokens.index(text)] = kind
    n_vocab = len(tokens) if embedding_rows is None else embedding_rows
    rng = np.random.default_rng(seed)
    reshape = reshape or {}

    def metadata(w) -> None:
        w.add_name("tiny qwq-shaped test model")
        w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"] if qtype else gguf.LlamaFileType.ALL_F32)
        ids = {t: i for i, t in enumerate(tokens)}
        w.add_bos_token_id(ids.get("<|endoftext|>", 0))
        w.add_eos_token_id(ids.get("<|im_end|>", 0))
        w.add_add_bos_token(False)
        if template == "original":
            w.add_chat_template(testing.chat_template())
        elif template is not None:
            w.add_chat_template(template)
        for key, value in (extra or {}).items():
            w.add_key_value(key, value[0], value[1])

    def tensor(name, shape):
        if name in drop:
            return None
        shape = reshape.get(name, shape)
        data = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])
        if name.endswith("norm.weight"):
            data += 1.0
        if name == "output.weight":
            data *= output_scale
        if qtype and len(shape) == 2:
            q = gguf.GGMLQuantizationType[qtype]
            return gguf.quants.quantize(data.astype(np.float32), q), q
        return data.astype(np.float32)

    return testing.write_qwen2_gguf(path, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                                    n_ff=n_ff, n_vocab=n_vocab, tensor=tensor, tokens=tokens,
                                    token_types=types, merges=merges, metadata=metadata)


# --- raw bytes -------------------------------------------------------------------------------

def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def i64(v: int) -> bytes:
    return struct.pack("<q", v)


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def kv_str(key: str | bytes, value: str | bytes) -> bytes:
    return kv(key, STRING, gstr(value))


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, U32, u32(value))


def kv_str_array(key: str, items: list) -> bytes:
    return kv(key, ARRAY, u32(STRING) + u64(len(items)) + b"".join(gstr(s) for s in items))


def kv_i32_array(key: str, items: list[int]) -> bytes:
    return kv(key, ARRAY, u32(I32) + u64(len(items)) + struct.pack(f"<{len(items)}i", *items))


def tensor_info(name: str | bytes, dims: list[int], ggml_type: int = GGML_F32, offset: int = 0,
                n_dims: int | None = None) -> bytes:
    return (gstr(name) + u32(len(dims) if n_dims is None else n_dims) + b"".join(i64(d) for d in dims)
            + u32(ggml_type) + u64(offset))


def build(kvs: list[bytes], infos: list[bytes], data: bytes = b"", *, magic: bytes = b"GGUF",
          version: int = 3, n_tensors: int | None = None, n_kv: int | None = None,
          alignment: int = 32) -> bytes:
    head = (magic + u32(version) + u64(len(infos) if n_tensors is None else n_tensors)
            + u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos))
    head += b"\0" * (-len(head) % alignment)
    return head + data


TOKENS = ["a", "b", "c", "ab", "<|endoftext|>", "<|im_end|>"]


def base_kvs(tokens: list | None = None) -> list[bytes]:
    tokens = TOKENS if tokens is None else tokens
    return [
        kv_str("general.architecture", "llama"),
        kv_str("general.name", "crafted"),
        kv_str("tokenizer.ggml.model", "gpt2"),
        kv_str_array("tokenizer.ggml.tokens", tokens),
        kv_i32_array("tokenizer.ggml.token_type", [1] * len(tokens)),
        kv_u32("tokenizer.ggml.bos_token_id", 4),
        kv_u32("tokenizer.ggml.eos_token_id", 5),
        kv_str("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}"),
    ]


def base_tensors() -> tuple[list[bytes], bytes]:
    """Two f32 tensors (32 and 8x2 elements) packed at 32-byte alignment, and their data."""
    infos = [tensor_info("t0", [32], GGML_F32, 0), tensor_info("t1", [8, 2], GGML_F32, 128)]
    data = bytes(range(128)) + bytes(range(64))
    return infos, data


def valid_raw(**build_kw) -> bytes:
    infos, data = base_tensors()
    return build(base_kvs(), infos, data, **build_kw)


def write_sparse_gguf(path: Path, shape) -> Path:
    """A GGUF with `shape`'s header and a hole where the tensor data would be: llama.cpp's dry
    run reads only the header, so QwQ-32B's real tensor list costs no disk space."""
    import gguf
    import numpy as np

    from qwq_local.quantize.types import ggml_row_bytes

    by_name = {t.name: t for t in shape.tensors}
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(shape.n_layer)
    w.add_context_length(4096)
    w.add_embedding_length(by_name["token_embd.weight"].ne[0])
    w.add_feed_forward_length(by_name["blk.0.ffn_up.weight"].ne[1])
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    data = 0
    for t in shape.tensors:
        nbytes = int(np.prod(t.ne[1:])) * ggml_row_bytes(t.type, t.ne[0])
        w.add_tensor_info(t.name, tuple(reversed(t.ne)), np.float32 if t.type == "F32" else np.float16, nbytes,
                          raw_dtype=gguf.GGMLQuantizationType[t.type])
        data += -(-nbytes // 32) * 32
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        f.truncate(end + (-end % 32) + data)
    return path


def sparse_files_work(directory: Path) -> bool:
    probe = directory / "sparse-probe"
    with open(probe, "wb") as f:
        f.truncate(256 << 20)
    sparse = os.stat(probe).st_blocks * 512 < (1 << 20)
    probe.unlink()
    return sparse
