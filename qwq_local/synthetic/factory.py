"""Tiny QwQ-shaped checkpoints for tests, the demo and benchmarks.

`make_tiny_checkpoint(dir)` writes what a Hugging Face QwQ-32B snapshot holds (config.json with
the same keys, sharded bf16 safetensors with an index, tokenizer.json, tokenizer_config.json
with the original chat template, generation_config.json), scaled down: random weights, a small
byte-level BPE vocabulary, the 26 QwQ added tokens after it and padding rows in the embedding.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import constants
from ..dtypes import bf16_bits_to_f32, f32_to_bf16_bits  # noqa: F401  (part of this module's API)

DATA_DIR = constants.DATA_DIR


@dataclass(frozen=True)
class TinySpec:
    """The shape of a tiny checkpoint. Defaults keep QwQ's 5:1 grouped-query attention."""

    hidden_size: int = 320
    num_hidden_layers: int = 2
    num_attention_heads: int = 10
    num_key_value_heads: int = 2
    intermediate_size: int = 1024
    pad_vocab_to: int = 128
    num_shards: int = 2
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-5
    rope_scaling: dict | None = None
    # "legacy" writes torch_dtype/rope_theta as QwQ's release does; "new" writes the newer
    # transformers spellings dtype/rope_parameters.
    config_style: str = "legacy"
    seed: int = 0


def added_tokens() -> list[dict]:
    """QwQ's added tokens in release order: [{content, special}]."""
    data = json.loads((DATA_DIR / "added_tokens.json").read_text())
    return [{"content": t["content"], "special": t["special"]} for t in data["added_tokens"]]


def chat_template() -> str:
    return (DATA_DIR / "chat_template.jinja").read_text()


def _base_tokenizer() -> dict:
    return json.loads((DATA_DIR / "tiny_tokenizer.json").read_text())


def tensor_shapes(spec: TinySpec, vocab_rows: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF Qwen2 tensor names and shapes (out, in) in the order transformers saves them."""
    h, kv = spec.hidden_size, spec.num_key_value_heads * (spec.hidden_size // spec.num_attention_heads)
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab_rows, h))]
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, spec.intermediate_size)),
            (p + "mlp.gate_proj.weight", (spec.intermediate_size, h)),
            (p + "mlp.up_proj.weight", (spec.intermediate_size, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)),
        ]
    shapes.append(("model.norm.weight", (h,)))
    if not spec.tie_word_embeddings:
        shapes.append(("lm_head.weight", (vocab_rows, h)))
    return shapes


def _random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name.endswith("norm.weight"):
        # Norm gains near one, as trained models have; zero gains would hide mistakes.
        return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    if name.endswith(".bias"):
        return 0.5 * rng.standard_normal(shape, dtype=np.float32)
    if name == "model.embed_tokens.weight":
        return rng.standard_normal(shape, dtype=np.float32)
    # Scaled so activations keep unit size through the layers whatever the width.
    return rng.standard_normal(shape, dtype=np.float32) / math.sqrt(shape[-1])


def _safetensors_header(entries: list[tuple[str, tuple[int, ...]]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def _split_shards(entries: list[tuple[str, tuple[int, ...]]], n: int) -> Iterator[list]:
    total = sum(2 * int(np.prod(s)) for _, s in entries)
    target = total / max(n, 1)
    shard: list = []
    size = 0
    made = 0
    for i, (name, shape) in enumerate(entries):
        shard.append((name, shape))
        size += 2 * int(np.prod(shape))
        remaining = len(entries) - i - 1
        if made < n - 1 and remaining >= (n - 1 - made) and size >= target:
            yield shard
            made += 1
            shard, size = [], 0
    if shard:
        yield shard


def _config(spec: TinySpec, vocab_rows: int, bos: int, eos: int) -> dict:
    cfg: dict = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "max_window_layers": spec.num_hidden_layers,
        "model_type": "qwen2",
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "sliding_window": 32768,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_rows,
    }
    if spec.config_style == "new":
        params = {"rope_type": "default", "rope_theta": spec.rope_theta}
        if spec.rope_scaling:
            params.update(spec.rope_scaling)
        cfg["rope_parameters"] = params
        cfg["dtype"] = "bfloat16"
    else:
        cfg["rope_theta"] = spec.rope_theta
        cfg["rope_scaling"] = spec.rope_scaling
        cfg["torch_dtype"] = "bfloat16"
    return dict(sorted(cfg.items()))


def make_tiny_checkpoint(path: Path | str, spec: TinySpec | None = None, **overrides) -> Path:
    """Write a tiny QwQ-shaped checkpoint into directory `path` and return it.

    Keyword overrides are TinySpec fields, e.g. `make_tiny_checkpoint(d, num_shards=3)`.
    Deterministic for a given spec (seeded).
    """
    spec = spec or TinySpec()
    if overrides:
        spec = TinySpec(**{**spec.__dict__, **overrides})
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tok = _base_tokenizer()
    base = len(tok["model"]["vocab"])
    added = []
    for i, t in enumerate(added_tokens()):
        added.append({"id": base + i, "content": t["content"], "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": False, "special": t["special"]})
    tok["added_tokens"] = added
    n_tokens = base + len(added)
    vocab_rows = -(-n_tokens // spec.pad_vocab_to) * spec.pad_vocab_to
    ids = {t["content"]: t["id"] for t in added}
    bos, eos = ids[constants.ENDOFTEXT], ids[constants.IM_END]
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False, indent=2))

    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")} for t in added},
        "additional_special_tokens": [t["content"] for t in added if t["special"]][1:],
        "bos_token": None,
        "chat_template": chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": constants.IM_END,
        "errors": "replace",
        "model_max_length": spec.max_position_embeddings,
        "pad_token": constants.ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }, ensure_ascii=False, indent=2))
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": bos,
        "do_sample": True,
        "eos_token_id": [eos, bos],
        "pad_token_id": bos,
        "repetition_penalty": 1.0,
        "temperature": constants.DEFAULT_TEMPERATURE,
        "top_k": constants.DEFAULT_TOP_K,
        "top_p": constants.DEFAULT_TOP_P,
    }, indent=2))
    (out / "config.json").write_text(json.dumps(_config(spec, vocab_rows, bos, eos), indent=2))

    rng = np.random.default_rng(spec.seed)
    entries = tensor_shapes(spec, vocab_rows)
    shards = list(_split_shards(entries, spec.num_shards))
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        with open(out / fname, "wb") as f:
            f.write(_safetensors_header(shard))
            for name, shape in shard:
                bits = f32_to_bf16_bits(_random_tensor(rng, name, shape))
                f.write(bits.tobytes())
                weight_map[name] = fname
                total += bits.nbytes
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def load_tiny_weights(path: Path | str) -> dict[str, np.ndarray]:
    """Read every tensor of a checkpoint written by make_tiny_checkpoint as float32 (tests only:
    this holds the whole model in memory)."""
    src = Path(path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    out: dict[str, np.ndarray] = {}
    for fname in sorted(set(index["weight_map"].values())):
        raw = (src / fname).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        for name, info in header.items():
            b, e = info["data_offsets"]
            bits = np.frombuffer(raw, dtype=np.uint16, count=(e - b) // 2, offset=8 + n + b)
            out[name] = bf16_bits_to_f32(bits).reshape(info["shape"])
    return out


def qwen2_gguf_shapes(*, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, n_ff: int,
                      n_vocab: int) -> dict[str, tuple[int, ...]]:
    """GGUF tensor names of a qwen2 model and their shapes in numpy order (rows, columns)."""
    kv = n_head_kv * (n_embd // n_head)
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_vocab, n_embd)}
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (n_embd,), p + "ffn_norm.weight": (n_embd,),
            p + "attn_q.weight": (n_embd, n_embd), p + "attn_q.bias": (n_embd,),
            p + "attn_k.weight": (kv, n_embd), p + "attn_k.bias": (kv,),
            p + "attn_v.weight": (kv, n_embd), p + "attn_v.bias": (kv,),
            p + "attn_output.weight": (n_embd, n_embd),
            p + "ffn_gate.weight": (n_ff, n_embd), p + "ffn_up.weight": (n_ff, n_embd),
            p + "ffn_down.weight": (n_embd, n_ff),
        })
    shapes["output_norm.weight"] = (n_embd,)
    shapes["output.weight"] = (n_vocab, n_embd)
    return shapes


def write_qwen2_gguf(path: Path | str, *, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, n_ff: int,
                     n_vocab: int, tensor, context_length: int = 4096, tokens: list[str] | None = None,
                     token_types: list[int] | None = None, merges: list[str] | None = None,
                     metadata=None, writer_options: dict | None = None) -> Path:
    """Write a qwen2 GGUF straight from tensors (no checkpoint, no converter).

    `tensor(name, shape)` returns the data to store (a float array, or (bytes array, ggml
    type) for pre-quantized data), or None to leave the tensor out. Without `tokens`, the
    vocabulary is the 256 byte-level tokens plus filler names (llama.cpp needs one merge).
    `metadata(writer)` may add keys. Used for probe models, benchmarks and crafted test files.
    """
    import gguf
    from gguf.vocab import bytes_to_unicode  # type: ignore[attr-defined]

    if tokens is None:
        byte_tokens = [bytes_to_unicode()[b] for b in range(256)]
        tokens = byte_tokens + [f"<t{i}>" for i in range(n_vocab - 256)]
        merges = ["a b"] if merges is None else merges
    w = gguf.GGUFWriter(str(path), "qwen2", **(writer_options or {}))
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(constants.GGUF_TOKENIZER_MODEL)
    w.add_tokenizer_pre(constants.GGUF_TOKENIZER_PRE)
    w.add_token_list(tokens)
    w.add_token_types(token_types if token_types is not None else [1] * len(tokens))
    w.add_token_merges(merges or ["a b"])
    if metadata is None:
        w.add_eos_token_id(0)
    else:
        metadata(w)
    shapes = qwen2_gguf_shapes(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                               n_ff=n_ff, n_vocab=n_vocab)
    for name, shape in shapes.items():
        data = tensor(name, shape)
        if data is None:
            continue
        if isinstance(data, tuple):
            w.add_tensor(name, data[0], raw_dtype=data[1])
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
