"""What a structurally valid GGUF holds (`GGUFInfo`, `TensorInfo`) and the fault the validator
raises inside this package (`GGUFFault`, turned into `BadModelFileError` at its edge).

Shared by the header reader (check.py) and the model-level rules (rules.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import constants


class GGUFFault(Exception):
    """A fault at a byte offset of the file."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str  # ggml type, e.g. "Q4_K"
    ggml_type: int
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    offset: int  # relative to the data section
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFInfo:
    """What a valid GGUF holds, from its header alone."""

    path: Path
    version: int
    alignment: int
    metadata: dict[str, Any]
    metadata_types: dict[str, str]  # key -> "UINT32", "STRING", "ARRAY[STRING]", ...
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    warnings: list[str] = field(default_factory=list)
    # Where each key's type field and each tensor's offset field sit, for fault messages.
    field_offsets: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def architecture(self) -> str | None:
        return _str_or_none(self.metadata.get("general.architecture"))

    @property
    def name(self) -> str | None:
        return _str_or_none(self.metadata.get("general.name"))

    @property
    def file_type(self) -> int | None:
        value = self.metadata.get("general.file_type")
        return value if isinstance(value, int) else None

    @property
    def quant(self) -> str:
        """A label like "Q4_K_M": from general.file_type, else the commonest 2-D tensor type."""
        from gguf import LlamaFileType

        ft = self.file_type
        if ft is not None:
            try:
                label = LlamaFileType(ft).name
            except ValueError:
                label = ""
            if label and label != "GUESSED":
                return "F32" if label == "ALL_F32" else label.removeprefix("MOSTLY_")
        counts: dict[str, int] = {}
        for t in self.tensors:
            if len(t.shape) >= 2:
                counts[t.type_name] = counts.get(t.type_name, 0) + t.n_elements
        return max(counts, key=counts.__getitem__) if counts else "unknown"

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def arch_value(self, key: str) -> Any:
        """`<architecture>.<key>`, e.g. arch_value("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}") if self.architecture else None

    @property
    def tokens(self) -> list[str] | None:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        return tokens if isinstance(tokens, list) else None

    @property
    def vocab_size(self) -> int | None:
        tokens = self.tokens
        return len(tokens) if tokens is not None else None

    @property
    def chat_template(self) -> str | None:
        return _str_or_none(self.metadata.get("tokenizer.chat_template"))

    def template_status(self) -> str:
        """"original" (QwQ's released template), "altered" or "missing"."""
        text = self.chat_template
        if text is None:
            return "missing"
        original = (constants.DATA_DIR / "chat_template.jinja").read_text(encoding="utf-8")
        return "original" if text.strip() == original.strip() else "altered"

    def tensor_type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready digest (long arrays summarised) for `qwq-local info --json`."""
        metadata: dict[str, Any] = {}
        for key, value in self.metadata.items():
            if isinstance(value, list) and len(value) > 16:
                metadata[key] = {"type": self.metadata_types[key], "length": len(value)}
            elif key == "tokenizer.chat_template":
                metadata[key] = {"type": "STRING", "length": len(value)}
            else:
                metadata[key] = _json_safe(value)
        return {
            "path": str(self.path), "file_size": self.file_size, "gguf_version": self.version,
            "alignment": self.alignment, "data_offset": self.data_offset,
            "architecture": self.architecture, "name": self.name, "file_type": self.file_type,
            "quant": self.quant, "n_params": self.n_params, "tensor_bytes": self.tensor_bytes,
            "context_length": self.arch_value("context_length"),
            "block_count": self.arch_value("block_count"),
            "embedding_length": self.arch_value("embedding_length"),
            "head_count": self.arch_value("attention.head_count"),
            "head_count_kv": self.arch_value("attention.head_count_kv"),
            "vocab_size": self.vocab_size, "chat_template": self.template_status(),
            "n_tensors": len(self.tensors), "tensor_types": self.tensor_type_counts(),
            "warnings": list(self.warnings), "metadata": metadata,
        }


def _json_safe(value: Any) -> Any:
    """NaN and infinities (a crafted file may hold them) as strings: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
