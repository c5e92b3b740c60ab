"""Our own validation of untrusted GGUF files: the first thing any load does.

`inspect_gguf(path)` reads only the header region (key/values and tensor infos), never the
tensor data, with every count and length bounded by what is left of the file, so any bytes
(truncated, hostile, a 20 GB model) give either a `GGUFInfo` or one `BadModelFileError` naming
the first fault and its byte offset. The structural rules follow llama.cpp's own gguf reader
(ggml/src/gguf.cpp), some stricter (no zero-sized dimensions), so a file that passes here
passes that reader too, unless the gguf package knows a tensor type this llama.cpp build does
not (the child load in safe_load.py catches that). The model-level rules (rules.py:
vocabulary, chat template) catch what would make llama.cpp abort() or silently drop metadata.
`safe_load.ensure_loadable(path)` adds a first real load in a child process.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import Any

from .. import constants
from ..errors import BadModelFileError, ModelNotFoundError
from .info import GGUFFault, GGUFInfo, TensorInfo

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4
MAX_TENSOR_NAME = 63  # ggml's GGML_MAX_NAME (64) holds the terminating NUL
DEFAULT_ALIGNMENT = 32
_INT64_MAX = (1 << 63) - 1
# Smallest possible encodings, used to bound counts by the bytes left in the file.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a one-byte key, type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset

# GGUF value types (the spec's numbering) -> (name, struct code, size); 8 = string, 9 = array.
_STRING, _ARRAY = 8, 9
_SCALARS = {
    0: ("UINT8", "B", 1), 1: ("INT8", "b", 1), 2: ("UINT16", "H", 2), 3: ("INT16", "h", 2),
    4: ("UINT32", "I", 4), 5: ("INT32", "i", 4), 6: ("FLOAT32", "f", 4), 7: ("BOOL", "?", 1),
    10: ("UINT64", "Q", 8), 11: ("INT64", "q", 8), 12: ("FLOAT64", "d", 8),
}
_U64 = struct.Struct("<Q")


class _Reader:
    """Sequential reads through a bounded buffer: memory stays at about one chunk plus the
    largest single item, whatever the file size, and nothing past the header is touched."""

    CHUNK = 1 << 20

    def __init__(self, f, size: int):
        self.f = f
        self.size = size
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # read position inside buf

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def remaining(self) -> int:
        return self.size - self.offset

    def _fill(self, n: int, what: str) -> None:
        if len(self.buf) - self.pos >= n:
            return
        if n > self.remaining():
            raise GGUFFault(f"file ends inside {what}: {n} bytes needed, {self.remaining()} left (truncated file?)",
                         self.offset)
        if self.offset + n > constants.GGUF_MAX_HEADER_BYTES:
            raise GGUFFault(f"the header region grows past {constants.GGUF_MAX_HEADER_BYTES} bytes inside {what}",
                         self.offset)
        end = self.base + len(self.buf)
        self.f.seek(end)
        more = self.f.read(min(max(n, self.CHUNK), self.size - end))
        self.buf = self.buf[self.pos:] + more
        self.base += self.pos
        self.pos = 0
        if len(self.buf) < n:
            raise GGUFFault(f"file ends inside {what} (it shrank while being read)", self.offset)

    def take(self, n: int, what: str) -> bytes:
        self._fill(n, what)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, code: str, size: int, what: str) -> Any:
        self._fill(size, what)
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.unpack("I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("Q", 8, what)

    def string(self, what: str) -> str:
        start = self.offset
        n = self.u64(f"the length of {what}")
        self._check_length(n, what, start)
        raw = self.take(n, what)
        _check_nul(raw, what, start + 8)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFFault(f"{what} is not valid UTF-8 (byte {exc.start} of it)", start + 8 + exc.start) from None

    def _check_length(self, n: int, what: str, start: int) -> None:
        if n > self.remaining():
            raise GGUFFault(f"{what} claims {n} bytes but only {self.remaining()} remain in the file", start)
        if n > constants.GGUF_MAX_STRING_BYTES:
            raise GGUFFault(f"{what} claims {n} bytes, over the {constants.GGUF_MAX_STRING_BYTES}-byte limit", start)

    def string_array(self, count: int, what: str) -> list[str]:
        """The hot loop for vocabularies (150k tokens, as many merges): inlined buffer access."""
        out: list[str] = [""] * count
        unpack_from = _U64.unpack_from
        for i in range(count):
            if len(self.buf) - self.pos < 8:
                self._fill(8, f"{what}[{i}]")
            buf, pos = self.buf, self.pos
            (n,) = unpack_from(buf, pos)
            if len(buf) - pos - 8 < n:
                self._check_length(n, f"{what}[{i}]", self.offset)
                self._fill(8 + n, f"{what}[{i}]")
                buf, pos = self.buf, self.pos
            raw = buf[pos + 8:pos + 8 + n]
            if b"\0" in raw:
                _check_nul(raw, f"{what}[{i}]", self.offset + 8)
            try:
                out[i] = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise GGUFFault(f"{what}[{i}] is not valid UTF-8 (byte {exc.start} of it)",
                             self.offset + 8 + exc.start) from None
            self.pos = pos + 8 + n
        return out

    def scalar_array(self, etype: int, count: int, what: str) -> list:
        _, code, size = _SCALARS[etype]
        raw = self.take(count * size, what)
        return list(struct.unpack(f"<{count}{code}", raw))


def _check_nul(raw: bytes, what: str, start: int) -> None:
    """llama.cpp reads GGUF strings as C strings: a NUL would silently cut a key, tensor name or
    token short (two tokens could become one, and its vocabulary loader aborts on that)."""
    at = raw.find(b"\0")
    if at >= 0:
        raise GGUFFault(f"{what} contains a NUL byte (llama.cpp would cut the string there)", start + at)


def inspect_gguf(path: Path | str) -> GGUFInfo:
    """Validate a GGUF file's header and return what it describes.

    Raises BadModelFileError("<path>: <fault> (at byte offset N)") on the first fault, and
    ModelNotFoundError if the file cannot be opened.
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_dir() and not stat.S_ISREG(path.stat().st_mode):
            # A FIFO or device would block or never end; only regular files are models.
            raise BadModelFileError(f"{path}: not a regular file (at byte offset 0)")
        f = open(path, "rb")
    except FileNotFoundError:
        raise ModelNotFoundError(f"no model file at {path}; check the path") from None
    except IsADirectoryError:
        raise ModelNotFoundError(f"{path} is a directory; pass the .gguf file inside it") from None
    except OSError as exc:
        raise ModelNotFoundError(f"cannot open {path}: {exc.strerror}; check its permissions") from None
    except ValueError:  # a NUL inside the path itself
        raise ModelNotFoundError(f"{str(path)!r} is not a valid file path") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            info = _parse(_Reader(f, size), path, size)
            from .rules import check_model

            check_model(info)
        except GGUFFault as fault:
            raise BadModelFileError(f"{path}: {fault} (at byte offset {fault.offset})") from None
        except OSError as exc:
            raise BadModelFileError(f"{path}: read error: {exc.strerror}; is the file still there?") from None
    return info


def _parse(r: _Reader, path: Path, size: int) -> GGUFInfo:
    if size < 4:
        raise GGUFFault(f"not a GGUF file (only {size} bytes long)", 0)
    magic = r.take(4, "the GGUF magic")
    if magic != GGUF_MAGIC:
        raise GGUFFault(f"not a GGUF file (starts with {magic!r}, expected b'GGUF')", 0)
    version = r.u32("the GGUF version")
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
            raise GGUFFault("big-endian GGUF; this machine needs a little-endian file", 4)
        raise GGUFFault(f"unsupported GGUF version {version} (supported: 2, 3)", 4)
    n_tensors = r.u64("the tensor count")
    if n_tensors * _MIN_TENSOR_INFO_BYTES > r.remaining():
        raise GGUFFault(f"tensor count {n_tensors} is impossible in a file of {size} bytes", 8)
    n_kv = r.u64("the key/value count")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > r.remaining():
        raise GGUFFault(f"key/value count {n_kv} is impossible in a file of {size} bytes", 16)

    metadata: dict[str, Any] = {}
    types: dict[str, str] = {}
    value_offsets: dict[str, int] = {}
    for i in range(n_kv):
        start = r.offset
        key = r.string(f"key #{i}")
        if not key:
            raise GGUFFault(f"key #{i} is empty", start)
        if key in metadata:
            raise GGUFFault(f"duplicate key {key!r}", start)
        type_at = r.offset
        vtype = r.u32(f"the type of {key!r}")
        if vtype in _SCALARS:
            name, code, vsize = _SCALARS[vtype]
            value: Any = r.unpack(code, vsize, f"the value of {key!r}")
            types[key] = name
        elif vtype == _STRING:
            value = r.string(f"the value of {key!r}")
            types[key] = "STRING"
        elif vtype == _ARRAY:
            etype = r.u32(f"the element type of {key!r}")
            if etype not in _SCALARS and etype != _STRING:
                raise GGUFFault(f"array {key!r} has invalid element type {etype}", type_at + 4)
            count_at = r.offset
            count = r.u64(f"the length of {key!r}")
            min_size = 8 if etype == _STRING else _SCALARS[etype][2]
            if count * min_size > r.remaining():
                raise GGUFFault(f"array {key!r} claims {count} elements but only {r.remaining()} bytes remain", count_at)
            if count > constants.GGUF_MAX_ARRAY_LENGTH:
                raise GGUFFault(f"array {key!r} has {count} elements, over the limit of "
                             f"{constants.GGUF_MAX_ARRAY_LENGTH}", count_at)
            if etype == _STRING:
                value = r.string_array(count, key)
                types[key] = "ARRAY[STRING]"
            else:
                value = r.scalar_array(etype, count, key)
                types[key] = f"ARRAY[{_SCALARS[etype][0]}]"
        else:
            raise GGUFFault(f"key {key!r} has unknown value type {vtype}", type_at)
        metadata[key] = value
        value_offsets[key] = type_at

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        at = value_offsets["general.alignment"]
        if types["general.alignment"] != "UINT32":
            raise GGUFFault(f"general.alignment must be UINT32, not {types['general.alignment']}", at)
        alignment = metadata["general.alignment"]
        if alignment == 0 or alignment & (alignment - 1):
            raise GGUFFault(f"general.alignment {alignment} is not a power of two", at)

    tensors, info_offsets = _parse_tensor_infos(r, n_tensors)
    data_offset = -(-r.offset // alignment) * alignment
    if n_tensors and data_offset > size:
        raise GGUFFault(f"file ends before its data section (padding to {alignment} bytes missing)", r.offset)
    _check_layout(tensors, info_offsets, data_offset, alignment, size)
    return GGUFInfo(path=path, version=version, alignment=alignment, metadata=metadata,
                    metadata_types=types, tensors=tensors, data_offset=data_offset, file_size=size,
                    field_offsets={"values": value_offsets, "tensors": info_offsets})


def _parse_tensor_infos(r: _Reader, n_tensors: int) -> tuple[list[TensorInfo], list[int]]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors: list[TensorInfo] = []
    offsets: list[int] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        start = r.offset
        name = r.string(f"the name of tensor #{i}")
        if not name:
            raise GGUFFault(f"tensor #{i} has an empty name", start)
        if len(name.encode()) > MAX_TENSOR_NAME:
            raise GGUFFault(f"tensor name {name[:40]!r}... is longer than ggml's {MAX_TENSOR_NAME} bytes", start)
        if name in seen:
            raise GGUFFault(f"duplicate tensor name {name!r}", start)
        seen.add(name)
        dims_at = r.offset
        n_dims = r.u32(f"the dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFFault(f"tensor {name!r} has {n_dims} dimensions (must be 1 to {MAX_DIMS})", dims_at)
        shape = []
        n_elements = 1
        for j in range(n_dims):
            dim_at = r.offset
            d = r.unpack("q", 8, f"dimension {j} of {name!r}")
            if d <= 0:
                raise GGUFFault(f"tensor {name!r} has dimension {j} = {d} (must be positive)", dim_at)
            n_elements *= d
            if n_elements >= _INT64_MAX:
                raise GGUFFault(f"tensor {name!r} has more elements than int64 can count", dim_at)
            shape.append(d)
        type_at = r.offset
        ggml_type = r.u32(f"the type of {name!r}")
        try:
            qtype = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFFault(f"tensor {name!r} has unknown ggml type {ggml_type}", type_at) from None
        if shape[0] % block:
            raise GGUFFault(f"tensor {name!r} of type {qtype.name} has rows of {shape[0]} elements, "
                         f"not a multiple of its block size {block}", dims_at)
        offset_at = r.offset
        offset = r.u64(f"the data offset of {name!r}")
        tensors.append(TensorInfo(name=name, type_name=qtype.name, ggml_type=ggml_type, shape=tuple(shape),
                                  offset=offset, nbytes=n_elements // block * type_size))
        offsets.append(offset_at)
    return tensors, offsets


def _check_layout(tensors: list[TensorInfo], offsets: list[int], data_offset: int, alignment: int,
                  size: int) -> None:
    """llama.cpp requires the tensors packed in order, each at an aligned offset; every byte
    of each must lie inside the file (no reading past the end of a mapping)."""
    expected = 0
    for t, at in zip(tensors, offsets):
        if t.offset % alignment:
            raise GGUFFault(f"tensor {t.name!r} starts at data offset {t.offset}, not a multiple of the "
                         f"alignment {alignment}", at)
        if t.offset < expected:
            raise GGUFFault(f"tensor {t.name!r} at data offset {t.offset} overlaps the previous tensor "
                         f"(which ends at {expected})", at)
        if t.offset > expected:
            raise GGUFFault(f"tensor {t.name!r} at data offset {t.offset} leaves a gap after the previous "
                         f"tensor (expected {expected}; llama.cpp requires tensors packed in order)", at)
        end = data_offset + t.offset + t.nbytes
        if end > size:
            raise GGUFFault(f"tensor {t.name!r} needs bytes up to {end} but the file has {size}: "
                         "the data is missing (truncated download?)", at)
        expected += -(-t.nbytes // alignment) * alignment

