"""Reading HF checkpoints: config spellings, strict safetensors validation, index consistency,
pickle refusal, vocabulary classification."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from qwq_local import constants
from qwq_local.convert.checkpoint import open_checkpoint, read_config, read_safetensors_header, read_tensors, read_vocab
from qwq_local.errors import CheckpointError, UnsupportedModelError
from qwq_local.synthetic.factory import load_tiny_weights, make_tiny_checkpoint


def _safetensors(path: Path, header: object, data: bytes = b"", *, raw_header: bytes | None = None,
                 declared_len: int | None = None) -> Path:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    n = len(raw) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.fixture()
def ckpt_copy(tmp_path, tiny_checkpoint) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


# --- a healthy checkpoint --------------------------------------------------------------------

def test_tensor_entries_point_at_the_right_bytes(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint)
    weights = load_tiny_weights(tiny_checkpoint)
    assert set(ckpt.tensors) == set(weights)
    assert len(ckpt.shards) == 2
    for name, entry in ckpt.tensors.items():
        assert entry.dtype == "BF16" and entry.shape == weights[name].shape
        assert entry.nbytes == 2 * weights[name].size
        with open(entry.shard, "rb") as f:
            f.seek(entry.offset)
            bits = np.frombuffer(f.read(entry.nbytes), dtype=np.uint16)
        got = (bits.astype(np.uint32) << 16).view(np.float32).reshape(entry.shape)
        assert np.array_equal(got, weights[name]), name
    assert ckpt.tensor_bytes == sum(2 * w.size for w in weights.values())
    assert ckpt.tokenizer_config is not None and ckpt.generation_config is not None


def test_single_file_checkpoint_without_index(ckpt_copy):
    # merge both shards into one model.safetensors the way safetensors would write it
    tensors, _ = read_tensors(ckpt_copy)
    header, blobs, offset = {}, [], 0
    for name, e in tensors.items():
        with open(e.shard, "rb") as f:
            f.seek(e.offset)
            blobs.append(f.read(e.nbytes))
        header[name] = _entry(e.dtype, e.shape, (offset, offset + e.nbytes))
        offset += e.nbytes
    for p in ckpt_copy.glob("model-*.safetensors"):
        p.unlink()
    (ckpt_copy / "model.safetensors.index.json").unlink()
    _safetensors(ckpt_copy / "model.safetensors", header, b"".join(blobs))
    ckpt = open_checkpoint(ckpt_copy)
    assert ckpt.shards == [ckpt_copy / "model.safetensors"] and set(ckpt.tensors) == set(tensors)


# --- config.json -----------------------------------------------------------------------------

def test_legacy_and_new_config_spellings_agree(tmp_path):
    old = read_config(make_tiny_checkpoint(tmp_path / "old"))
    new = read_config(make_tiny_checkpoint(tmp_path / "new", config_style="new"))
    assert "rope_parameters" in new.raw and "dtype" in new.raw and "torch_dtype" in old.raw
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "max_position_embeddings", "rms_norm_eps", "vocab_size",
                  "tie_word_embeddings", "rope_theta", "rope_scaling", "torch_dtype"):
        assert getattr(old, field) == getattr(new, field), field
    assert old.rope_theta == 1_000_000.0 and old.rope_scaling is None and old.torch_dtype == "bfloat16"


@pytest.mark.parametrize("style", ["legacy", "new"])
def test_yarn_rope_scaling_is_normalised(tmp_path, style):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    if style == "new":
        yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    cfg = read_config(make_tiny_checkpoint(tmp_path, config_style=style, rope_scaling=yarn))
    assert cfg.rope_scaling["rope_type"] == "yarn"
    assert cfg.rope_scaling["factor"] == 4.0 and cfg.rope_scaling["original_max_position_embeddings"] == 32768
    assert cfg.rope_theta == 1_000_000.0


def test_other_architectures_are_refused_naming_what_is_supported(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM is not supported.*Qwen2ForCausalLM"):
        open_checkpoint(ckpt_copy)


def test_bad_config_values_name_the_file(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["num_key_value_heads"] = 3  # does not divide 10 heads
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: num_key_value_heads 3"):
        open_checkpoint(ckpt_copy)
    (ckpt_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        open_checkpoint(ckpt_copy)


# --- safetensors headers ---------------------------------------------------------------------

CORRUPTIONS = {
    "too short": lambda p: p.write_bytes(b"\x01\x02"),
    "header length .* is outside": lambda p: _safetensors(p, {}, declared_len=constants.MAX_SAFETENSORS_HEADER + 1),
    "header length 4096 runs past the end": lambda p: _safetensors(p, {"a": _entry()}, b"\0" * 8, declared_len=4096),
    "not valid UTF-8": lambda p: _safetensors(p, None, raw_header=b'{"\xff\xfe": 1}'),
    "not valid JSON": lambda p: _safetensors(p, None, raw_header=b'{"a": {"dtype": '),
    "not an object": lambda p: _safetensors(p, [1, 2]),
    "duplicate key": lambda p: _safetensors(p, None, b"\0" * 16, raw_header=(
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
        b' "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}')),
    "unknown dtype 'F12'": lambda p: _safetensors(p, {"w": _entry(dtype="F12")}, b"\0" * 8),
    "shape .* is not a list of non-negative integers": lambda p: _safetensors(p, {"w": _entry(shape=(-2,))}, b"\0" * 8),
    "byte span 8 does not match dtype F32 x shape \\[3\\]": lambda p: _safetensors(p, {"w": _entry(shape=(3,))},
                                                                                   b"\0" * 8),
    "overlaps the previous tensor": lambda p: _safetensors(
        p, {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}, b"\0" * 12),
    "unaccounted bytes before tensor": lambda p: _safetensors(
        p, {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(12, 20))}, b"\0" * 20),
    "data_offsets \\[8, 16\\] point past the end of the file": lambda p: _safetensors(
        p, {"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(8, 16))}, b"\0" * 8),
    "trailing garbage": lambda p: _safetensors(p, {"a": _entry()}, b"\0" * 12),
    "must have exactly dtype, shape and data_offsets": lambda p: _safetensors(p, {"a": {"dtype": "F32"}}),
    "data_offsets .* must be two non-negative integers": lambda p: _safetensors(
        p, {"a": _entry(offsets=(8, 0))}, b"\0" * 8),
}


@pytest.mark.parametrize("fault", list(CORRUPTIONS))
def test_corrupt_safetensors_header_names_file_and_fault(tmp_path, fault):
    path = tmp_path / "model-00001-of-00001.safetensors"
    CORRUPTIONS[fault](path)
    with pytest.raises(CheckpointError, match=fault) as info:
        read_safetensors_header(path)
    assert str(path) in str(info.value)


def test_valid_crafted_header_passes(tmp_path):
    path = _safetensors(tmp_path / "ok.safetensors",
                        {"__metadata__": {"format": "pt"}, "b": _entry(offsets=(8, 16)), "a": _entry()},
                        np.arange(4, dtype=np.float32).tobytes())
    entries = read_safetensors_header(path)
    assert [e.name for e in entries] == ["a", "b"]
    assert entries[1].offset == path.stat().st_size - 8 and entries[1].nbytes == 8


def test_truncated_shard_of_real_checkpoint(ckpt_copy):
    shard = sorted(ckpt_copy.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated") as info:
        open_checkpoint(ckpt_copy)
    assert shard.name in str(info.value)


# --- the index and the shards ----------------------------------------------------------------

def _rewrite_index(ckpt: Path, change) -> None:
    path = ckpt / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index["weight_map"])
    path.write_text(json.dumps(index))


def test_index_pointing_to_a_missing_tensor(ckpt_copy):
    _rewrite_index(ckpt_copy, lambda wm: wm.__setitem__("model.layers.9.mlp.up_proj.weight",
                                                        "model-00001-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: missing tensor "
                                              r"'model\.layers\.9\.mlp\.up_proj\.weight'"):
        open_checkpoint(ckpt_copy)


def test_tensor_not_listed_in_index(ckpt_copy):
    _rewrite_index(ckpt_copy, lambda wm: wm.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"safetensors: holds tensor 'model\.norm\.weight' which "
                                              r"model\.safetensors\.index\.json does not list"):
        open_checkpoint(ckpt_copy)


def test_index_naming_the_wrong_shard(ckpt_copy):
    _rewrite_index(ckpt_copy, lambda wm: wm.__setitem__("model.norm.weight", "model-00001-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="maps to model-00001-of-00002.safetensors"):
        open_checkpoint(ckpt_copy)


def test_tensor_duplicated_across_shards(ckpt_copy):
    first, second = sorted(ckpt_copy.glob("model-*.safetensors"))
    name = read_safetensors_header(first)[0].name
    _safetensors(ckpt_copy / "model-00003-of-00003.safetensors", {name: _entry()}, b"\0" * 8)
    _rewrite_index(ckpt_copy, lambda wm: wm.__setitem__("extra.weight", "model-00003-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' also appears in {first.name}"):
        open_checkpoint(ckpt_copy)


def test_index_naming_a_missing_shard_or_escaping_the_directory(ckpt_copy):
    _rewrite_index(ckpt_copy, lambda wm: wm.__setitem__("x.weight", "model-00009-of-00009.safetensors"))
    with pytest.raises(CheckpointError, match=r"model-00009-of-00009\.safetensors: shard file is missing"):
        open_checkpoint(ckpt_copy)
    _rewrite_index(ckpt_copy, lambda wm: wm.__setitem__("x.weight", "../evil.safetensors"))
    with pytest.raises(CheckpointError, match="points outside the checkpoint directory"):
        open_checkpoint(ckpt_copy)


# --- pickles ---------------------------------------------------------------------------------

def test_bin_checkpoints_are_refused_without_unpickling(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "pt"
    ckpt.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_checkpoint / name, ckpt / name)
    marker = tmp_path / "unpickled"
    # a pickle that would create `marker` if anything unpickled it
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (ckpt / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickled PyTorch checkpoints \(\.bin\) are refused"):
        open_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="pickled PyTorch checkpoints are refused"):
        open_checkpoint(ckpt / "pytorch_model.bin")
    assert not marker.exists()


# --- vocabulary ------------------------------------------------------------------------------

def test_vocab_types_follow_llama_cpp_rules(tiny_checkpoint):
    from gguf import TokenType

    ckpt = open_checkpoint(tiny_checkpoint)
    tokens, types = read_vocab(ckpt)
    tok = json.loads(ckpt.tokenizer_json.read_text())
    assert len(tokens) == len(types) == ckpt.config.vocab_size
    by_text = dict(zip(tokens, types))
    for text in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"):
        assert by_text[text] == TokenType.CONTROL, text  # marked special
    for text in ("<|fim_prefix|>", "<|repo_name|>", "<|file_sep|>"):
        assert by_text[text] == TokenType.CONTROL, text  # not special, but shaped <|...|>
    for text in ("<think>", "</think>", "<tool_call>", "</tool_response>"):
        assert by_text[text] == TokenType.USER_DEFINED, text
    n_real = len(tok["model"]["vocab"]) + len(tok["added_tokens"])
    assert n_real < len(tokens)  # the tiny model has padding rows, like QwQ's 152064
    for i in range(n_real, len(tokens)):
        assert tokens[i] == f"[PAD{i}]" and types[i] == TokenType.UNUSED
    for text, tid in tok["model"]["vocab"].items():
        assert tokens[tid] == text and types[tid] == TokenType.NORMAL


def test_foreign_pretokenizer_is_refused(ckpt_copy):
    path = ckpt_copy / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\w+"
    path.write_text(json.dumps(tok))
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer is not Qwen2's"):
        read_vocab(open_checkpoint(ckpt_copy))
