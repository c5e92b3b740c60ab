"""Hugging Face Qwen2/QwQ checkpoint -> GGUF, streamed and atomic.

Metadata matches what llama.cpp's convert_hf_to_gguf.py writes for a Qwen2 model (gguf-py's
own Metadata and SpecialVocab readers are reused for the model card, sampling defaults,
merges, special ids and chat template). Tensor data is never held in memory: a tensor whose
type does not change is copied shard -> output inside the kernel (copy_file_range), others are
converted a few MiB of rows at a time. The file is written beside OUTPUT, re-validated, and only
then renamed, so a failed or interrupted run leaves nothing under the final name.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Callable

from .. import constants, fileutil
from .checkpoint import Checkpoint, open_checkpoint, read_normalizer, read_vocab
from .tensors import pad as _pad
from .tensors import PlannedTensor, write_all_data
from ..errors import CheckpointError, DiskSpaceError, HubError, ModelNotFoundError, QwQLocalError, UsageError

Progress = Callable[[int, int], None]

# outtype -> (GGML type name of 2-D weights, llama.cpp file type name)
_OUTTYPES = {
    "bf16": ("BF16", "MOSTLY_BF16"),
    "f16": ("F16", "MOSTLY_F16"),
    "f32": ("F32", "ALL_F32"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}
_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


# ---------------------------------------------------------------------------------------------
# Source resolution
# ---------------------------------------------------------------------------------------------

def _resolve_source(src: str | os.PathLike | None, *, repo_id: str | None = None,
                    revision: str | None = None) -> tuple[Path, str | None]:
    """A local checkpoint directory for SRC: the path itself, or a Hub snapshot of a repo id
    (downloaded once, then served from the Hugging Face cache; HF_HUB_OFFLINE=1 never connects)."""
    if src is not None:
        path = Path(src).expanduser()
        if path.exists():
            return path, None
        if not _REPO_ID_RE.match(str(src)):
            raise ModelNotFoundError(f"no checkpoint directory at {path}; pass a local checkpoint directory "
                                     f"or a Hugging Face repo id such as {constants.QWQ_REPO_ID}")
        repo_id = str(src)
    repo_id = repo_id or constants.QWQ_REPO_ID
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    from ..hub.cache import offline_mode

    offline = offline_mode()
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(constants.HF_ALLOW_PATTERNS),
                                   local_files_only=offline)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise ModelNotFoundError(f"{repo_id}{'@' + revision if revision else ''} is not available on the Hugging "
                                 f"Face Hub ({type(exc).__name__}); check the name, or log in with `hf auth login` "
                                 "for gated repos") from None
    except LocalEntryNotFoundError:
        if offline:
            raise ModelNotFoundError(
                f"{repo_id} is not in the local Hugging Face cache and {constants.ENV_HF_OFFLINE} is set; run "
                f"`qwq-local convert {repo_id} -o OUT.gguf` once with network access "
                f"({constants.ENV_HF_OFFLINE} unset), "
                "or pass a local checkpoint directory") from None
        raise HubError(f"could not reach the Hugging Face Hub to download {repo_id} and it is not cached; "
                       "check the network, or pass a local checkpoint directory") from None
    except (HfHubHTTPError, OSError) as exc:
        raise HubError(f"downloading {repo_id} failed: {exc}; re-run to resume the download") from None
    return Path(folder), repo_id


def _model_name(directory: Path, repo_id: str | None) -> str | None:
    """The repo's name for general.name when the directory name is a Hub cache hash."""
    name = repo_id
    parts = directory.resolve().parts
    if name is None and len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        name = parts[-3][len("models--"):].replace("--", "/")
    if name is None:
        return None
    import gguf

    return gguf.Metadata.id_to_title(name.split("/")[-1])


# ---------------------------------------------------------------------------------------------
# Planning: map names, check shapes, choose types
# ---------------------------------------------------------------------------------------------

def _gguf_name(hf_name: str) -> str | None:
    if hf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"blk.{int(m.group(1))}.{_LAYER_MAP[m.group(2)]}"
    return None


def _expected_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    c = ckpt.config
    head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
    h, q, kv, ff, v = c.hidden_size, c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim, \
        c.intermediate_size, c.vocab_size
    layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (ff, h), "mlp.up_proj.weight": (ff, h), "mlp.down_proj.weight": (h, ff),
    }
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings or "lm_head.weight" in ckpt.tensors:
        shapes["lm_head.weight"] = (v, h)
    for i in range(c.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    return shapes


def _out_type(gguf_name: str, shape: tuple[int, ...], outtype: str) -> str:
    # llama.cpp's converter keeps 1-D tensors and norms in F32 and falls back to F16 when a row
    # does not split into whole Q8_0 blocks.
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return "F32"
    qtype = _OUTTYPES[outtype][0]
    if qtype == "Q8_0" and shape[-1] % 32:
        return "F16"
    return qtype


def _nbytes(qtype: str, shape: tuple[int, ...]) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    numel = 1
    for d in shape:
        numel *= d
    return numel // block * size


def plan_tensors(ckpt: Checkpoint, outtype: str) -> list[PlannedTensor]:
    """Output tensors in source file order; every expected tensor present with its shape."""
    expected = _expected_shapes(ckpt)
    for name, shape in expected.items():
        entry = ckpt.tensors.get(name)
        if entry is None:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} is missing from the checkpoint "
                                  "(incomplete download, or not a Qwen2 model)")
        if entry.shape != shape:
            raise CheckpointError(f"{entry.shard}: tensor {name!r} has shape {list(entry.shape)}, but config.json "
                                  f"implies {list(shape)}")
        if entry.dtype not in constants.CONVERT_SOURCE_DTYPES:
            raise CheckpointError(f"{entry.shard}: tensor {name!r} is {entry.dtype}; the converter reads "
                                  f"{', '.join(constants.CONVERT_SOURCE_DTYPES)} checkpoints")
    plans = []
    for name, entry in sorted(ckpt.tensors.items(), key=lambda kv: (kv[1].shard, kv[1].offset)):
        if name.endswith(".rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp, as its converter drops it
        if name not in expected:
            raise CheckpointError(f"{entry.shard}: unexpected tensor {name!r} for a Qwen2ForCausalLM model")
        gname = _gguf_name(name)
        assert gname is not None, name
        qtype = _out_type(gname, entry.shape, outtype)
        plans.append(PlannedTensor(entry, gname, qtype, _nbytes(qtype, entry.shape)))
    return plans


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------

def _add_metadata(writer, ckpt: Checkpoint, plans: list[PlannedTensor], outtype: str, name: str | None) -> None:
    import gguf

    c = ckpt.config
    total = sum(p.src.numel for p in plans)
    writer.add_type(gguf.GGUFType.MODEL)
    import yaml

    try:
        meta = gguf.Metadata.load(None, ckpt.path, name, total)
    except (yaml.YAMLError, OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        # the model card's front matter is YAML written by people: report it, don't crash
        raise CheckpointError(f"{ckpt.path / 'README.md'}: unreadable model card front matter "
                              f"({' '.join(str(exc).split())}); fix or remove its YAML header") from None
    if meta.sampling_penalty_repeat is None:
        # gguf-py 0.19 reads only `penalty_repeat`; llama.cpp's converter (the one bundled with
        # llama-cpp-python) also reads transformers' spelling, which QwQ's generation_config uses
        penalty = gguf.Metadata.load_generation_config(ckpt.path).get("repetition_penalty")
        if isinstance(penalty, (int, float)) and not isinstance(penalty, bool):
            meta.sampling_penalty_repeat = float(penalty)
    if name is not None:
        parts = gguf.Metadata.get_model_id_components(name.replace(" ", "-"), total)
        meta.basename = meta.basename or parts[2]
        meta.size_label = meta.size_label or parts[5]
    meta.name = meta.name or ckpt.path.name
    meta.size_label = meta.size_label or gguf.size_label(total, total, 0, 0)
    meta.set_gguf_meta_model(writer)

    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    rope = c.rope_scaling or {}
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        optional = {"extrapolation_factor": writer.add_rope_scaling_yarn_ext_factor,
                    "attention_factor": writer.add_rope_scaling_yarn_attn_factor,
                    "beta_fast": writer.add_rope_scaling_yarn_beta_fast,
                    "beta_slow": writer.add_rope_scaling_yarn_beta_slow}
        for key, add in optional.items():
            if rope.get(key) is not None:
                add(rope[key])
    elif rope:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: rope scaling type {rope.get('rope_type')!r} is not "
                              "supported for Qwen2 (yarn or linear)")
    if c.rope_theta is not None:
        writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if c.head_dim is not None:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_file_type(gguf.LlamaFileType[_OUTTYPES[outtype][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types = read_vocab(ckpt)
    writer.add_tokenizer_model(constants.GGUF_TOKENIZER_MODEL)
    writer.add_tokenizer_pre(constants.GGUF_TOKENIZER_PRE)
    # llama.cpp skips tokenizer.json normalizers; the runtime applies the recorded one.
    writer.add_string(constants.GGUF_NORMALIZER_KEY, read_normalizer(ckpt))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    del tokens, types
    try:
        special = gguf.SpecialVocab(ckpt.path, load_merges=True, n_vocab=c.vocab_size)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{ckpt.path}: tokenizer files are inconsistent ({exc})") from None
    if not special.merges:
        raise CheckpointError(f"{ckpt.tokenizer_json}: no BPE merges; the tokenizer file is incomplete")
    # QwQ's tokenizer_config.json sets add_bos_token=false only; llama.cpp already defaults to
    # not appending EOS for this vocab, and stating it makes the file self-describing.
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------------------------------------
# Re-validation of the written file
# ---------------------------------------------------------------------------------------------

def _verify_output(path: Path, plans: list[PlannedTensor], n_kv: int) -> None:
    """Read the file back with the project's untrusted-GGUF validator and compare it with the
    plan: same keys count, tensors, types, shapes, offsets, and an exact file size."""
    from ..errors import BadModelFileError
    from ..gguf.check import inspect_gguf

    def fail(what: str):
        raise CheckpointError(f"{path}: the written GGUF failed re-validation ({what}); nothing was saved under "
                              "the output name. This is a bug in qwq-local; please report it")

    try:
        info = inspect_gguf(path)
    except BadModelFileError as exc:
        fail(str(exc))
    if len(info.metadata) != n_kv or info.metadata.get("general.architecture") != constants.GGUF_ARCH:
        fail("metadata")
    if len(info.tensors) != len(plans):
        fail(f"{len(info.tensors)} tensors instead of {len(plans)}")
    expected_offset = 0
    for got, plan in zip(info.tensors, plans):
        if (got.name, got.type_name, tuple(reversed(got.shape)), got.offset, got.nbytes) != \
                (plan.name, plan.qtype, plan.src.shape, expected_offset, plan.nbytes):
            fail(f"tensor info of {plan.name}")
        expected_offset += _pad(plan.nbytes)
    if info.file_size != info.data_offset + expected_offset:
        fail(f"file size {info.file_size} != {info.data_offset + expected_offset}")


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

def convert(src: str | os.PathLike | None, output: str | os.PathLike, *, outtype: str = constants.DEFAULT_OUTTYPE,
            progress: Progress | None = None, repo_id: str | None = None, revision: str | None = None,
            name: str | None = None, on_tensor: Callable[[int, int, str], None] | None = None) -> Path:
    """Convert a Qwen2/QwQ checkpoint to a GGUF file at `output` and return its path.

    src: a local checkpoint directory or a Hugging Face repo id (None: `repo_id`, default
    Qwen/QwQ-32B); downloads honour HF_HUB_OFFLINE. outtype: bf16 (lossless for QwQ), f16,
    f32 or q8_0. progress(done_bytes, total_bytes) is called as tensor data is written, and
    on_tensor(i, n, gguf_name) as tensor i of n (1-based, in file order) starts.
    """
    outtype = str(outtype).strip().lower()  # Q8_0 as quantize spells it, or q8_0
    if outtype not in _OUTTYPES:
        raise UsageError(f"unknown outtype {outtype!r}; choose one of {', '.join(constants.OUTTYPES)}")
    output = Path(output).expanduser()
    if output.is_dir():
        raise UsageError(f"output {output} is a directory; give a file name such as {output / 'model.gguf'}")
    fileutil.check_output_dir(output)  # before a download that can take hours
    directory, repo = _resolve_source(src, repo_id=repo_id, revision=revision)
    ckpt = open_checkpoint(directory)
    read_normalizer(ckpt)  # an unsupported tokenizer normalizer is refused before any work
    fileutil.refuse_same_file(output, *ckpt.files)
    plans = plan_tensors(ckpt, outtype)
    data_bytes = sum(_pad(p.nbytes) for p in plans)
    fileutil.check_free_space(output.parent, data_bytes + ckpt.tokenizer_json.stat().st_size,
                              what=f"converting to {output.name}")

    import gguf

    with fileutil.atomic_output(output) as tmp:
        writer = gguf.GGUFWriter(None, constants.GGUF_ARCH)
        _add_metadata(writer, ckpt, plans, outtype, name or _model_name(directory, repo))
        for plan in plans:
            writer.add_tensor_info(plan.name, plan.src.shape, _np_dtype(plan.qtype), plan.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[plan.qtype])
        n_kv = len(writer.kv_data[0])
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            writer.close()
            del writer
            write_all_data(tmp, plans, data_bytes, progress, on_tensor)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise DiskSpaceError(f"writing {output} failed: {exc.strerror}; the incomplete file was removed. "
                                     "Free some space (or raise the file size limit) or choose another "
                                     "output directory") from None
            where = f" ({exc.filename})" if exc.filename else ""
            raise QwQLocalError(f"converting to {output} failed: {exc.strerror or exc}{where}; the incomplete file "
                                "was removed") from None
        _verify_output(tmp, plans, n_kv)
    return output


def _np_dtype(qtype: str):
    import numpy as np

    # Only consulted by GGUFWriter when raw_dtype is absent; uint8 would make it reinterpret the
    # shape as bytes, so anything else works for block-quantised types.
    return {"F32": np.float32, "F16": np.float16}.get(qtype, np.float32)
