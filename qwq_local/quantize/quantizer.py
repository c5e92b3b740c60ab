"""GGUF -> GGUF quantization with llama.cpp's own quantizer (`llama_model_quantize`).

No llama-quantize binary is involved: the same library function runs in-process, with the
parameters llama-quantize would pass for the same options (imatrix values normalised the same
way, the same `quantize.imatrix.*` metadata), so the output is byte-identical. What this module
adds: type names, refusal of types that need an importance matrix, imatrix validation, a
free-space check from the predicted size, temp file + rename, progress, clear errors.
"""

from __future__ import annotations

import ctypes
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .. import constants
from ..errors import ModelNotFoundError, QuantizeError
from .imatrix import Imatrix, imatrix_c_array, read_imatrix, validate_imatrix
from .predict import Prediction, predict_size, predict_sizes, shape_from_info, tensor_types
from .types import IMATRIX_REASON, QUANT_TYPES, QuantType, ggml_type_id, resolve_type, type_names

__all__ = ["quantize", "plan_quantize", "QuantizePlan", "QuantizeResult", "predict_sizes", "Prediction",
           "QUANT_TYPES", "resolve_type", "type_names", "quantize_params"]

_TENSOR_LINE = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")

# llama-quantize's metadata keys for the imatrix it used (tools/quantize/quantize.cpp)
KV_IMATRIX_FILE = "quantize.imatrix.file"
KV_IMATRIX_DATASET = "quantize.imatrix.dataset"
KV_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KV_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"


@dataclass
class QuantizeResult:
    input: Path
    output: Path
    qtype: str
    ftype: int
    bytes: int
    predicted_bytes: int
    seconds: float
    imatrix: Optional[Path] = None
    command: str = ""                     # the equivalent llama-quantize command line
    warnings: list[str] = field(default_factory=list)


def quantize(input: Path | str, output: Path | str, *, qtype: str, imatrix: Path | str | None = None,
             output_tensor_type: str | None = None, token_embedding_type: str | None = None,
             pure: bool = False, threads: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> QuantizeResult:
    """Quantize GGUF `input` to `output` as `qtype` (a llama-quantize type name, any case).

    progress(done, total) is called with tensors written so far. Raises QuantizeError
    (bad type, missing imatrix, llama.cpp failure), ImatrixError, UsageError (output is the
    input), DiskSpaceError, ModelNotFoundError.
    """
    from ..fileutil import atomic_output

    src, dst = Path(input), Path(output)
    plan = plan_quantize(src, output=dst, qtype=qtype, imatrix=imatrix, output_tensor_type=output_tensor_type,
                         token_embedding_type=token_embedding_type, pure=pure)
    qt, im, predicted = plan.qtype, plan.imatrix, plan.predicted_bytes
    ott, tet = plan.output_tensor_type, plan.token_embedding_type
    ott_id = ggml_type_id(ott) if ott else None
    tet_id = ggml_type_id(tet) if tet else None
    warnings = plan.warnings

    params, keep = quantize_params(qt, imatrix=im, imatrix_label=str(imatrix) if imatrix is not None else None,
                                   output_tensor_type=ott_id, token_embedding_type=tet_id, pure=pure, threads=threads)
    start = time.perf_counter()
    with atomic_output(dst) as tmp:
        _run(src, tmp, params, progress=progress, qtype=qt.name)
        del keep  # the imatrix buffers had to outlive the call; now they may go
    elapsed = time.perf_counter() - start
    return QuantizeResult(input=src, output=dst, qtype=qt.name, ftype=qt.ftype, bytes=dst.stat().st_size,
                          predicted_bytes=predicted, seconds=elapsed, imatrix=Path(imatrix) if imatrix else None,
                          command=_command_line(src, dst, qt, imatrix, ott, tet, pure, threads), warnings=warnings)


@dataclass
class QuantizePlan:
    """What a quantization will do, worked out without writing anything (--dry-run)."""

    input: Path
    qtype: QuantType
    tensor_types: dict[str, str]          # tensor name -> ggml type it will get
    predicted_bytes: int
    n_params: int
    imatrix: Optional[Imatrix] = None
    output_tensor_type: Optional[str] = None
    token_embedding_type: Optional[str] = None
    pure: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensor_types.values():
            counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    @property
    def bpw(self) -> float:
        return self.predicted_bytes * 8 / max(1, self.n_params)


def plan_quantize(input: Path | str, *, qtype: str, output: Path | str | None = None,
                  imatrix: Path | str | None = None, output_tensor_type: str | None = None,
                  token_embedding_type: str | None = None, pure: bool = False) -> QuantizePlan:
    """Validate everything a quantization needs (type name, input file, imatrix; with
    `output`: not the input, enough free space) and predict the per-tensor types and the
    output size, writing nothing. Raises the same errors quantize() would."""
    from ..fileutil import check_free_space, check_output_dir, refuse_same_file

    src = Path(input)
    qt = resolve_type(qtype)
    if output is not None:
        refuse_same_file(Path(output), src)
        check_output_dir(Path(output))
    if not src.is_file():
        raise ModelNotFoundError(f"no GGUF file at {src}; convert a checkpoint first (qwq-local convert)")
    ott = output_tensor_type.upper() if output_tensor_type else None
    tet = token_embedding_type.upper() if token_embedding_type else None
    for name in (ott, tet):
        if name:
            ggml_type_id(name)
    im: Imatrix | None = read_imatrix(imatrix) if imatrix is not None else None
    if qt.requires_imatrix and im is None:
        raise QuantizeError(IMATRIX_REASON.format(name=qt.name))
    shape = shape_from_info(_validate_input(src))
    options = dict(has_imatrix=im is not None, output_tensor_type=ott, token_embedding_type=tet, pure=pure)
    types = tensor_types(shape, qt, **options)
    warnings = validate_imatrix(im, shape, qt, types) if im is not None else []
    predicted = predict_size(shape, qt, **options)
    if output is not None:
        check_free_space(Path(output).parent, predicted, what=f"the {qt.name} file")
    return QuantizePlan(input=src, qtype=qt, tensor_types=types, predicted_bytes=predicted,
                        n_params=shape.n_params, imatrix=im, output_tensor_type=ott, token_embedding_type=tet,
                        pure=pure, warnings=warnings)


def quantize_params(qt: QuantType, *, imatrix: Imatrix | None = None, imatrix_label: str | None = None,
                    output_tensor_type: int | None = None, token_embedding_type: int | None = None,
                    pure: bool = False, threads: int | None = None):
    """(llama_model_quantize_params, keep-alive list) as llama-quantize builds them."""
    from ..backend import binding as backend

    lib = backend.llama()
    params = lib.llama_model_quantize_default_params()
    params.ftype = qt.ftype
    params.nthread = int(threads) if threads else backend.default_threads()
    if output_tensor_type is not None:
        params.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        params.token_embedding_type = token_embedding_type
    params.pure = bool(pure)
    keep: list = []
    if imatrix is not None:
        arr, buffers = imatrix_c_array(imatrix)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(lib.llama_model_imatrix_data))
        keep += [arr, buffers]
        overrides = _imatrix_overrides(lib, imatrix, imatrix_label or str(imatrix.path or ""))
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(lib.llama_model_kv_override))
        keep.append(overrides)
    return params, keep


def _imatrix_overrides(lib, imatrix: Imatrix, label: str):
    """The metadata llama-quantize records about the imatrix, in its order."""
    items: list[tuple[str, object]] = [(KV_IMATRIX_FILE, label)]
    if imatrix.datasets:
        items.append((KV_IMATRIX_DATASET, imatrix.datasets[0]))
    items.append((KV_IMATRIX_N_ENTRIES, len(imatrix.entries)))
    if imatrix.chunk_count > 0:
        items.append((KV_IMATRIX_N_CHUNKS, int(imatrix.chunk_count)))
    arr = (lib.llama_model_kv_override * (len(items) + 1))()
    for i, (key, value) in enumerate(items):
        arr[i].key = key.encode()
        if isinstance(value, str):
            arr[i].tag = lib.LLAMA_KV_OVERRIDE_TYPE_STR
            arr[i].value.val_str = value.encode("utf-8")[:127]
        else:
            arr[i].tag = lib.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = int(value)
    arr[len(items)].key = b""
    return arr


def _validate_input(path: Path):
    """Our GGUF checks (and a first load in a child process) before llama.cpp parses the file
    in this process: an abort() inside llama.cpp would take the caller down with it."""
    from ..gguf.safe_load import ensure_loadable

    return ensure_loadable(path)


def _run(src: Path, dst: Path, params, *, progress, qtype: str) -> None:
    """Call llama_model_quantize in a worker thread; report progress from its log lines."""
    from ..backend import binding as backend

    lib = backend.llama()
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["rc"] = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        except BaseException as exc:  # pragma: no cover - ctypes errors only
            outcome["exc"] = exc

    with backend.capture_log() as log:
        # daemon: an interrupted CLI must be able to exit while llama.cpp is still busy
        worker = threading.Thread(target=work, name="llama-quantize", daemon=True)
        worker.start()
        seen = 0
        last = (0, 0)
        try:
            while worker.is_alive():
                worker.join(constants.QUANTIZE_POLL_S)
                if progress is not None:
                    seen, last = _scan_progress(log, seen, last, progress)
            if progress is not None:
                _scan_progress(log, seen, last, progress)
        except BaseException:
            # Interrupted (Ctrl-C, or the progress callback raised): llama.cpp cannot be
            # stopped, and may not have created its output yet when the caller removes it, so
            # remove the partial file again once llama.cpp is done with it.
            threading.Thread(target=_reap, args=(worker, dst), name="quantize-reaper", daemon=True).start()
            raise
        lines = list(log)
    if "exc" in outcome:
        raise QuantizeError(f"llama_model_quantize could not be called: {outcome['exc']}")
    rc = outcome.get("rc", -1)
    if rc != 0 or not dst.is_file():
        raise QuantizeError(f"llama.cpp's quantizer failed (code {rc}) quantizing {src} to {qtype}: "
                            f"{_error_tail(lines)}")


def _reap(worker: threading.Thread, partial: Path) -> None:
    worker.join()
    partial.unlink(missing_ok=True)


def _scan_progress(log: list[str], seen: int, last: tuple[int, int], progress) -> tuple[int, tuple[int, int]]:
    for line in log[seen:]:
        m = _TENSOR_LINE.search(line)
        if m:
            last = (int(m.group(1)), int(m.group(2)))
    if last[1]:
        progress(*last)
    return len(log), last


def _error_tail(lines: list[str]) -> str:
    text = "".join(lines)
    errors = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
    chosen = errors[-3:] or [ln.strip() for ln in text.strip().splitlines()[-3:]]
    return " | ".join(chosen) or "no log output (set QWQ_LOCAL_DEBUG=1 to see llama.cpp's log)"


def _command_line(src, dst, qt, imatrix, ott, tet, pure, threads) -> str:
    parts = ["llama-quantize"]
    if imatrix:
        parts += ["--imatrix", str(imatrix)]
    if ott:
        parts += ["--output-tensor-type", ott.lower()]
    if tet:
        parts += ["--token-embedding-type", tet.lower()]
    if pure:
        parts.append("--pure")
    parts += [str(src), str(dst), qt.name]
    if threads:
        parts.append(str(threads))
    return " ".join(parts)
