"""Importance-matrix files, in both formats llama.cpp's llama-imatrix writes.

- GGUF (current default): `general.type = "imatrix"`, keys `imatrix.datasets`,
  `imatrix.chunk_count`, `imatrix.chunk_size`; per weight tensor X two F32 tensors
  `X.in_sum2` (ne = [ne0, n_mat]: summed squared activations per input column, per expert) and
  `X.counts` (ne = [1, n_mat]: how many activation rows were summed).
- legacy `.dat`: int32 n_entries; per entry int32 name length, name, int32 ncall, int32 nval,
  float32[nval] (sums scaled so that values/ncall is the mean); then optionally int32
  last_chunk, int32 dataset-name length and the dataset name.

`Imatrix.values(name)` normalises exactly as llama-quantize does before it hands the data to
`llama_model_quantize`: in_sum2 / counts per matrix (1 where a count is 0) for GGUF, and
sums / ncall for legacy files.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ImatrixError

GGUF_MAGIC = b"GGUF"
_MAX_NAME = 4096


@dataclass
class ImatrixEntry:
    sums: "object"      # numpy float32, n_mat * ne0 values
    counts: "object"    # numpy float64, n_mat values (legacy: [ncall])

    @property
    def ne0(self) -> int:
        return len(self.sums) // max(1, len(self.counts))


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: Path | None = None

    def values(self, name: str):
        """The importance values llama.cpp's quantizer uses for tensor `name` (float32)."""
        import numpy as np

        e = self.entries[name]
        sums = np.asarray(e.sums, dtype=np.float32)
        if self.legacy:
            ncall = float(e.counts[0]) if len(e.counts) else 0.0
            return (sums / np.float32(ncall)).astype(np.float32) if ncall > 0 else sums.copy()
        n_mat = len(e.counts)
        ne0 = len(sums) // n_mat
        out = np.ones(len(sums), dtype=np.float32)
        for j in range(n_mat):
            c = np.float32(e.counts[j])
            if c > 0:
                out[j * ne0:(j + 1) * ne0] = sums[j * ne0:(j + 1) * ne0] / c
        return out


def read_imatrix(path: Path | str) -> Imatrix:
    """Read a GGUF or legacy .dat importance matrix (the format is detected from the bytes)."""
    path = Path(path)
    if not path.is_file():
        raise ImatrixError(f"no imatrix file at {path}; make one with llama-imatrix or check the path")
    with open(path, "rb") as f:
        magic = f.read(4)
    result = _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)
    result.path = path
    if not result.entries:
        raise ImatrixError(f"imatrix file {path} holds no entries; re-create it with llama-imatrix")
    return result


def _read_legacy(path: Path) -> Imatrix:
    import numpy as np

    data = path.read_bytes()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ImatrixError(f"{path} is truncated or not an imatrix file (legacy .dat format expected at byte {pos})")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    (n_entries,) = struct.unpack("<i", take(4))
    if n_entries < 1 or n_entries > 1_000_000:
        raise ImatrixError(f"{path}: implausible entry count {n_entries}; not an imatrix file")
    entries: dict[str, ImatrixEntry] = {}
    for _ in range(n_entries):
        (length,) = struct.unpack("<i", take(4))
        if not 0 < length <= _MAX_NAME:
            raise ImatrixError(f"{path}: bad tensor-name length {length}; the file is damaged")
        name = take(length).decode("utf-8", errors="replace")
        ncall, nval = struct.unpack("<ii", take(8))
        if nval < 1:
            raise ImatrixError(f"{path}: entry {name} has {nval} values; the file is damaged")
        sums = np.frombuffer(take(4 * nval), dtype="<f4").astype(np.float32)
        entries[name] = ImatrixEntry(sums=sums, counts=np.array([ncall], dtype=np.float64))
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        (chunk_count,) = struct.unpack("<i", take(4))
        if pos + 4 <= len(data):
            (length,) = struct.unpack("<i", take(4))
            if 0 < length <= _MAX_NAME and pos + length <= len(data):
                datasets = [take(length).decode("utf-8", errors="replace")]
    return Imatrix(entries=entries, datasets=datasets, chunk_count=chunk_count, legacy=True)


def _read_gguf(path: Path) -> Imatrix:
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:
        raise ImatrixError(f"{path} is not a readable GGUF imatrix: {exc}") from exc

    def scalar(key: str):
        f = reader.fields.get(key)
        if f is None or not f.data:
            return None
        part = f.parts[f.data[0]]
        return bytes(part).decode("utf-8", errors="replace") if f.types[0] == gguf.GGUFValueType.STRING else part[0]

    if scalar("general.type") != "imatrix":
        raise ImatrixError(f"{path} is a GGUF file but not an imatrix (general.type is {scalar('general.type')!r}); "
                           "pass the importance matrix made by llama-imatrix, not a model")
    datasets: list[str] = []
    f = reader.fields.get("imatrix.datasets")
    if f is not None:
        datasets = [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
    sums: dict[str, object] = {}
    counts: dict[str, object] = {}
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ImatrixError(f"{path}: tensor {t.name} is {t.tensor_type.name}, expected F32")
        values = np.asarray(t.data, dtype=np.float32).reshape(-1)
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = values
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = values.astype(np.float64)
        # other per-tensor statistics (".in_sum" activations) are not used for quantizing
    entries: dict[str, ImatrixEntry] = {}
    for name, s in sums.items():
        c = counts.get(name)
        if c is None or len(c) == 0 or len(s) % len(c) != 0:
            raise ImatrixError(f"{path}: {name}.counts is missing or does not divide {name}.in_sum2; the file is damaged")
        entries[name] = ImatrixEntry(sums=s, counts=c)
    return Imatrix(entries=entries, datasets=datasets, chunk_count=int(scalar("imatrix.chunk_count") or 0),
                   chunk_size=int(scalar("imatrix.chunk_size") or 0), legacy=False)


def write_imatrix_gguf(path: Path | str, imatrix: Imatrix) -> Path:
    """Write `imatrix` as llama-imatrix's GGUF format (sums and counts as stored)."""
    import gguf
    import numpy as np

    from ..fileutil import atomic_output

    path = Path(path)
    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="imatrix")
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", list(imatrix.datasets))
        w.add_uint32("imatrix.chunk_count", int(imatrix.chunk_count))
        w.add_uint32("imatrix.chunk_size", int(imatrix.chunk_size))
        for name, e in imatrix.entries.items():
            n_mat = len(e.counts)
            sums = np.asarray(e.sums, dtype=np.float32).reshape(n_mat, -1)
            w.add_tensor(name + ".in_sum2", sums)
            w.add_tensor(name + ".counts", np.asarray(e.counts, dtype=np.float32).reshape(n_mat, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def write_imatrix_dat(path: Path | str, imatrix: Imatrix) -> Path:
    """Write `imatrix` as the legacy .dat format, scaling like llama-imatrix's legacy writer
    (values = sums / count * ncall, with ncall = ceil(max count / chunk_size))."""
    import numpy as np

    from ..fileutil import atomic_output

    path = Path(path)
    chunk = max(1, int(imatrix.chunk_size) or 1)
    out = [struct.pack("<i", len(imatrix.entries))]
    for name, e in imatrix.entries.items():
        raw = name.encode()
        counts = np.asarray(e.counts, dtype=np.float64)
        if imatrix.legacy:
            ncall, values = int(counts[0]), np.asarray(e.sums, dtype=np.float32)
        else:
            ncall = int(-(-int(counts.max()) // chunk))
            n_mat = len(counts)
            sums = np.asarray(e.sums, dtype=np.float32).reshape(n_mat, -1)
            c = np.where(counts > 0, counts, 1.0).astype(np.float32)[:, None]
            s = np.where(counts[:, None] > 0, sums, 1.0).astype(np.float32)
            values = (s / c * np.float32(ncall)).astype(np.float32).reshape(-1)
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, len(values)), values.astype("<f4").tobytes()]
    out.append(struct.pack("<i", int(imatrix.chunk_count)))
    dataset = (imatrix.datasets[0] if imatrix.datasets else "").encode()
    out += [struct.pack("<i", len(dataset)), dataset]
    with atomic_output(path) as tmp:
        tmp.write_bytes(b"".join(out))
    return path


# --- validation against a model ---------------------------------------------------------------

IMATRIX_TYPES = {"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"}


def tensor_requires_imatrix(name: str, ggml_type: str, qtype_name: str) -> bool:
    """llama.cpp's per-tensor rule (src/llama-quant.cpp tensor_requires_imatrix)."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return ggml_type in IMATRIX_TYPES or (ggml_type == "Q2_K" and qtype_name == "Q2_K_S")


def validate_imatrix(imatrix: Imatrix, shape, qtype, types: dict[str, str]) -> list[str]:
    """Check `imatrix` against the model: raise ImatrixError when it belongs to another model
    (unknown tensor names, wrong row lengths) or lacks a tensor that needs it; return warnings
    for quantized tensors it does not cover (those are quantized without importance data)."""
    import numpy as np

    from .predict import allows_quantization

    by_name = {t.name: t for t in shape.tensors}
    where = f" in {imatrix.path}" if imatrix.path else ""
    unknown = sorted(n for n in imatrix.entries if n not in by_name)
    if unknown:
        raise ImatrixError(f"imatrix{where} has entries for tensors this model does not have "
                           f"({', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}); "
                           "it was made for another model: compute one for this model with llama-imatrix")
    for name, e in imatrix.entries.items():
        t = by_name[name]
        expected = t.ne[0] * (t.ne[2] if len(t.ne) > 2 else 1)
        if len(e.sums) != expected and name not in ("token_embd.weight",):
            raise ImatrixError(f"imatrix{where} entry {name} has {len(e.sums)} values but the tensor's rows "
                               f"have {expected} columns; it was made for a model of another shape")
        if not np.all(np.isfinite(np.asarray(e.sums, dtype=np.float32))):
            raise ImatrixError(f"imatrix{where} entry {name} contains NaN or infinite values; re-create it")
    missing_required, uncovered = [], []
    for t in shape.tensors:
        if not allows_quantization(t) or t.name in imatrix.entries:
            continue
        if tensor_requires_imatrix(t.name, types.get(t.name, t.type), qtype.name):
            missing_required.append(t.name)
        elif types.get(t.name, t.type) != t.type and t.name not in ("token_embd.weight", "output.weight"):
            uncovered.append(t.name)
    if missing_required:
        raise ImatrixError(f"imatrix{where} has no data for {', '.join(missing_required[:3])}"
                           f"{' ...' if len(missing_required) > 3 else ''}, which {qtype.name} quantizes to a type "
                           "that needs it; compute the imatrix on this model")
    if uncovered:
        return [f"imatrix has no data for {len(uncovered)} quantized tensor(s) (e.g. {uncovered[0]}); "
                "they are quantized without it"]
    return []


def imatrix_c_array(imatrix: Imatrix, names: list[str] | None = None):
    """(ctypes array of llama_model_imatrix_data ending in a null entry, keep-alive list).

    llama.cpp copies the data at the start of quantizing, but the buffers must live until the
    call returns: keep the second value referenced for that long."""
    import ctypes

    import numpy as np

    from ..backend import binding as backend

    lib = backend.llama()
    names = list(imatrix.entries) if names is None else names
    arr = (lib.llama_model_imatrix_data * (len(names) + 1))()
    keep = []
    for i, name in enumerate(names):
        values = np.ascontiguousarray(imatrix.values(name), dtype=np.float32)
        raw = name.encode()
        keep += [values, raw]
        arr[i].name = raw
        arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = len(values)
    arr[len(names)].name = None
    return arr, keep
