"""Reading a Hugging Face Qwen2/QwQ checkpoint directory without trusting it.

Every safetensors header is validated before a single tensor byte is read: a damaged or
hostile file gets a CheckpointError naming the file and the fault, never a crash or a wrong
conversion. Pickled `.bin` checkpoints are refused (unpickling runs arbitrary code).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .. import constants
from ..errors import CheckpointError, UnsupportedModelError

# safetensors dtype -> bytes per element (4-bit and 6-bit float packs are not whole bytes and
# never occur in Qwen2 checkpoints, so they are reported as unknown).
SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: `nbytes` bytes at absolute `offset` in `shard`."""

    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelConfig:
    """The parts of config.json the converter needs, with old and new key spellings merged."""

    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float | None
    # Normalised rope scaling: {"rope_type": "yarn"|"linear"|..., "factor": ..., ...}; None when
    # the config uses plain RoPE (legacy null, or new-style rope_type "default").
    rope_scaling: dict[str, Any] | None
    torch_dtype: str | None
    head_dim: int | None
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)


@dataclass
class Checkpoint:
    """A validated checkpoint directory: config, tensors (in file order) and tokenizer files."""

    path: Path
    config: ModelConfig
    tensors: dict[str, TensorEntry]
    shards: list[Path]
    tokenizer_json: Path
    tokenizer_config: Path | None
    generation_config: Path | None

    @property
    def files(self) -> list[Path]:
        """Every file the conversion reads (an output must never overwrite one)."""
        extra = [p for p in (self.tokenizer_config, self.generation_config) if p is not None]
        return [self.path / "config.json", self.tokenizer_json, *extra, *self.shards]

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ---------------------------------------------------------------------------------------------
# JSON helpers
# ---------------------------------------------------------------------------------------------

def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _read_json(path: Path, *, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what}); re-download the checkpoint") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); re-download the checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

def _int_field(cfg: dict, key: str, path: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{path}: `{key}` must be a positive integer, found {value!r}")
    return value


def _rope(cfg: dict, path: Path) -> tuple[float | None, dict[str, Any] | None]:
    params = cfg.get("rope_parameters")
    legacy = cfg.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise CheckpointError(f"{path}: `rope_parameters` must be an object, found {params!r}")
    if legacy is not None and not isinstance(legacy, dict):
        raise CheckpointError(f"{path}: `rope_scaling` must be an object or null, found {legacy!r}")
    source = dict(params if params is not None else (legacy or {}))
    theta = cfg.get("rope_theta", source.get("rope_theta"))
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0):
        raise CheckpointError(f"{path}: rope_theta must be a positive number, found {theta!r}")
    rope_type = source.get("rope_type", source.get("type"))
    if rope_type in (None, "default"):
        return (float(theta) if theta is not None else None), None
    scaling = {k: v for k, v in source.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    if rope_type in ("yarn", "linear"):
        factor = scaling.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
            raise CheckpointError(f"{path}: {rope_type} rope scaling needs a positive `factor`, found {factor!r}")
    if rope_type == "yarn" and not isinstance(scaling.get("original_max_position_embeddings"), int):
        raise CheckpointError(f"{path}: yarn rope scaling needs `original_max_position_embeddings`")
    return (float(theta) if theta is not None else None), scaling


def read_config(directory: Path) -> ModelConfig:
    """Parse config.json; refuse architectures other than Qwen2ForCausalLM."""
    path = Path(directory) / "config.json"
    cfg = _read_json(path, what="the model's config.json")
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise UnsupportedModelError(
            f"{path}: no `architectures` list; qwq-local converts "
            f"{', '.join(constants.SUPPORTED_ARCHITECTURES)} checkpoints (QwQ-32B, Qwen2.5)")
    supported = [a for a in archs if a in constants.SUPPORTED_ARCHITECTURES]
    if not supported:
        raise UnsupportedModelError(
            f"{path}: architecture {', '.join(map(str, archs))} is not supported; qwq-local converts "
            f"{', '.join(constants.SUPPORTED_ARCHITECTURES)} checkpoints (QwQ-32B, Qwen2.5); use "
            "llama.cpp's convert_hf_to_gguf.py for other models")
    heads = _int_field(cfg, "num_attention_heads", path)
    hidden = _int_field(cfg, "hidden_size", path)
    kv_heads = cfg.get("num_key_value_heads", heads)
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise CheckpointError(f"{path}: num_key_value_heads {kv_heads!r} must divide num_attention_heads {heads}")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0):
        raise CheckpointError(f"{path}: head_dim must be a positive integer, found {head_dim!r}")
    if head_dim is None and hidden % heads:
        raise CheckpointError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    eps = cfg.get("rms_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise CheckpointError(f"{path}: rms_norm_eps must be a positive number, found {eps!r}")
    theta, scaling = _rope(cfg, path)
    dtype = cfg.get("dtype", cfg.get("torch_dtype"))
    return ModelConfig(
        architecture=supported[0],
        hidden_size=hidden,
        num_hidden_layers=_int_field(cfg, "num_hidden_layers", path),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=_int_field(cfg, "intermediate_size", path),
        max_position_embeddings=_int_field(cfg, "max_position_embeddings", path),
        rms_norm_eps=float(eps),
        vocab_size=_int_field(cfg, "vocab_size", path),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        torch_dtype=str(dtype) if dtype is not None else None,
        head_dim=head_dim,
        raw=cfg,
    )


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------

def read_safetensors_header(path: Path) -> list[TensorEntry]:
    """Validate one safetensors file's header against the file and return its tensors in
    offset order. Reads only the header; raises CheckpointError naming the file and fault."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: only {size} bytes, too short for a safetensors header "
                                      "(truncated download?); re-download this shard")
            (hlen,) = struct.unpack("<Q", prefix)
            if hlen == 0 or hlen > constants.MAX_SAFETENSORS_HEADER:
                raise CheckpointError(
                    f"{path}: header length {hlen} is outside 1..{constants.MAX_SAFETENSORS_HEADER} bytes "
                    "(corrupt or not a safetensors file)")
            if 8 + hlen > size:
                raise CheckpointError(f"{path}: header length {hlen} runs past the end of the {size}-byte file "
                                      "(truncated download?); re-download this shard")
            raw = f.read(hlen)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard file is missing; re-download the checkpoint") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: header is not valid UTF-8 (byte {exc.start}); the file is corrupt") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except ValueError as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is JSON but not an object; the file is corrupt")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")

    data_start = 8 + hlen
    data_len = size - data_start
    entries: list[tuple[int, int, TensorEntry]] = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not name:
            raise CheckpointError(f"{path}: a tensor has an empty name")
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} must be two non-negative integers [begin, end]")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * SAFETENSORS_ITEMSIZE[dtype]
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: byte span {end - begin} does not match dtype {dtype} x shape {shape} = {expected} bytes")
        if end > data_len:
            raise CheckpointError(
                f"{where}: data_offsets [{begin}, {end}] point past the end of the file's {data_len} data bytes "
                "(truncated download?); re-download this shard")
        entries.append((begin, end, TensorEntry(name, path, dtype, tuple(shape), data_start + begin, end - begin)))

    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    for begin, end, entry in entries:
        if begin < position:
            raise CheckpointError(f"{path}: tensor {entry.name!r} at [{begin}, {end}] overlaps the previous tensor "
                                  f"(which ends at {position}); the file is corrupt")
        if begin > position:
            raise CheckpointError(f"{path}: {begin - position} unaccounted bytes before tensor {entry.name!r} "
                                  f"(data must be contiguous from offset 0); the file is corrupt")
        position = end
    if position != data_len:
        raise CheckpointError(f"{path}: tensors end at data byte {position} but the file holds {data_len} "
                              "(truncated or trailing garbage); re-download this shard")
    return [e for _, _, e in entries]


def _shard_path(directory: Path, name: object, index_path: Path) -> Path:
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        raise CheckpointError(f"{index_path}: shard name {name!r} is not a .safetensors file")
    # Judged by the name, not the resolved path: Hugging Face cache snapshots are symlinks into
    # ../../blobs, which is fine; a name that climbs out of the directory is not.
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts or Path(name).is_absolute():
        raise CheckpointError(f"{index_path}: shard name {name!r} points outside the checkpoint directory")
    return directory / name


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir()
                     if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl") and p.is_file())
    detail = f" (found {', '.join(pickles[:3])})" if pickles else ""
    raise CheckpointError(
        f"{directory}: no model.safetensors or {INDEX_FILE}{detail}; pickled PyTorch checkpoints (.bin) are "
        "refused because loading them can run arbitrary code: download the safetensors version of the model")


def read_tensors(directory: Path) -> tuple[dict[str, TensorEntry], list[Path]]:
    """All tensors of a checkpoint (validated headers, index consistent with shards)."""
    directory = Path(directory)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path, what="the shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: `weight_map` must be a non-empty object of tensor -> shard")
        shards = list(dict.fromkeys(_shard_path(directory, v, index_path) for v in weight_map.values()))
    elif (directory / SINGLE_FILE).is_file():
        weight_map = None
        shards = [directory / SINGLE_FILE]
    else:
        _refuse_pickles(directory)
        raise AssertionError("unreachable")

    tensors: dict[str, TensorEntry] = {}
    for shard in sorted(shards):
        for entry in read_safetensors_header(shard):
            if entry.name in tensors:
                raise CheckpointError(f"{shard}: tensor {entry.name!r} also appears in {tensors[entry.name].shard.name}; "
                                      "the checkpoint is inconsistent")
            if weight_map is not None and weight_map.get(entry.name) != shard.name:
                listed = weight_map.get(entry.name)
                raise CheckpointError(
                    f"{shard}: holds tensor {entry.name!r} which {INDEX_FILE} "
                    + (f"maps to {listed}" if listed else "does not list") + "; the checkpoint is inconsistent")
            tensors[entry.name] = entry
    if weight_map is not None:
        for name, shard_name in weight_map.items():
            if name not in tensors:
                raise CheckpointError(f"{directory / shard_name}: missing tensor {name!r} that {INDEX_FILE} maps to it "
                                      "(incomplete download?); re-download this shard")
    return tensors, sorted(shards)


# ---------------------------------------------------------------------------------------------
# The whole checkpoint
# ---------------------------------------------------------------------------------------------

def open_checkpoint(path: Path | str) -> Checkpoint:
    """Validate a checkpoint directory: config, tokenizer files, every shard header, the index."""
    directory = Path(path)
    if directory.is_file():
        if directory.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
            raise CheckpointError(f"{directory}: pickled PyTorch checkpoints are refused (loading them can run "
                                  "arbitrary code); download the safetensors version of the model")
        raise CheckpointError(f"{directory} is a file; pass the checkpoint directory (with config.json, "
                              "tokenizer.json and the .safetensors shards)")
    if not directory.is_dir():
        from ..errors import ModelNotFoundError

        raise ModelNotFoundError(f"no checkpoint directory at {directory}")
    config = read_config(directory)
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise CheckpointError(f"{tokenizer_json}: missing; the converter needs the Hugging Face fast tokenizer file")
    tensors, shards = read_tensors(directory)
    optional = [directory / n for n in ("tokenizer_config.json", "generation_config.json")]
    return Checkpoint(
        path=directory,
        config=config,
        tensors=tensors,
        shards=shards,
        tokenizer_json=tokenizer_json,
        tokenizer_config=optional[0] if optional[0].is_file() else None,
        generation_config=optional[1] if optional[1].is_file() else None,
    )


def read_vocab(checkpoint: Checkpoint) -> tuple[list[str], list[int]]:
    """Token strings and GGUF token types, classified as llama.cpp's converter does.

    Ids without a token (embedding rows past the tokenizer) become `[PAD{id}]` UNUSED; added
    tokens are CONTROL when marked special or shaped like `<|...|>`, else USER_DEFINED.
    """
    from gguf import TokenType

    path = checkpoint.tokenizer_json
    tok = _read_json(path, what="tokenizer.json")
    model = tok.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UnsupportedModelError(f"{path}: not a byte-level BPE tokenizer; Qwen2 models use one")
    regexes = [p.get("pattern", {}).get("Regex") for p in (tok.get("pre_tokenizer") or {}).get("pretokenizers", [])
               if isinstance(p, dict) and p.get("type") == "Split"]
    if regexes != [constants.QWEN2_PRETOKENIZER_REGEX]:
        raise UnsupportedModelError(f"{path}: the pre-tokenizer is not Qwen2's, so llama.cpp's `qwen2` "
                                    "pre-tokenizer would split text differently; this tokenizer is not supported")
    reverse: dict[int, str] = {}
    for text, tid in model["vocab"].items():
        if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
            raise CheckpointError(f"{path}: token {text!r} has invalid id {tid!r}")
        reverse[tid] = text
    added: dict[int, dict] = {}
    for item in tok.get("added_tokens") or []:
        tid, text = item.get("id") if isinstance(item, dict) else None, (item or {}).get("content")
        if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0 or not isinstance(text, str):
            raise CheckpointError(f"{path}: malformed added token {item!r}")
        added[tid] = item
        reverse[tid] = text
    n_vocab = checkpoint.config.vocab_size
    if reverse and max(reverse) >= n_vocab:
        raise CheckpointError(f"{path}: token id {max(reverse)} does not fit vocab_size {n_vocab} of config.json")

    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            if added[i].get("special") or _looks_special(text):
                types.append(TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")  # llama.cpp pre-normalises user-defined spaces
                types.append(TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(TokenType.NORMAL)
    return tokens, types


def _looks_special(text: str) -> bool:
    # The same shapes llama.cpp's converter promotes to CONTROL even when not marked special.
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))



def read_normalizer(checkpoint: Checkpoint) -> str:
    """The Unicode normalizer the checkpoint's tokenizer.json declares, as qwq-local records it
    (constants.NORMALIZERS): "NFC" (QwQ's), or "none" for no normalizer. Hugging Face applies
    it to the text between added tokens before the BPE; llama.cpp applies none, so qwq-local
    records it in the GGUF and applies it at run time. Any other normalizer (NFKC, lowercase,
    replacements, ...) is refused: ids would silently differ from the reference tokenizer."""
    path = checkpoint.tokenizer_json
    spec = _read_json(path, what="tokenizer.json").get("normalizer")
    steps = spec.get("normalizers") if isinstance(spec, dict) and spec.get("type") == "Sequence" else [spec]
    kinds = [step.get("type") if isinstance(step, dict) else step for step in steps or [] if step is not None]
    if not kinds:
        return "none"
    if kinds == ["NFC"]:
        return "NFC"
    raise UnsupportedModelError(
        f"{path}: the tokenizer's normalizer is {' + '.join(map(str, kinds))}; qwq-local reproduces only NFC "
        "(QwQ's) or none, so this model's tokens would differ from its reference tokenizer")
