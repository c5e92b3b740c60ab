"""Streaming tensor data from safetensors shards into a GGUF file (used by convert.py).

Nothing here holds more than one chunk (constants.COPY_CHUNK_BYTES of source rows) in memory:
same-type tensors are copied inside the kernel, the rest are converted row chunk by row chunk.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from .. import constants
from .checkpoint import TensorEntry
from ..dtypes import bf16_bits_to_f32, f32_to_bf16_bits
from ..errors import CheckpointError


Progress = Callable[[int, int], None]
TensorStart = Callable[[int, int, str], None]


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its source, GGUF name and type, and its byte size in the output."""

    src: TensorEntry
    name: str
    qtype: str
    nbytes: int


def pad(n: int, align: int = constants.GGUF_ALIGNMENT) -> int:
    return (n + align - 1) // align * align


class _Copier:
    """Kernel-side byte copies with fallbacks: copy_file_range -> sendfile -> pread/pwrite."""

    def __init__(self) -> None:
        self.mode = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"

    def copy(self, src_fd: int, src_off: int, dst_fd: int, dst_off: int, count: int, entry: TensorEntry) -> int:
        while True:
            try:
                if self.mode == "copy_file_range":
                    n = os.copy_file_range(src_fd, dst_fd, count, src_off, dst_off)
                elif self.mode == "sendfile":
                    os.lseek(dst_fd, dst_off, os.SEEK_SET)
                    n = os.sendfile(dst_fd, src_fd, src_off, count)
                else:
                    data = os.pread(src_fd, count, src_off)
                    n = os.pwrite(dst_fd, data, dst_off) if data else 0
            except OSError as exc:
                if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP) \
                        and self.mode != "rw":
                    self.mode = "sendfile" if self.mode == "copy_file_range" else "rw"
                    continue
                raise
            if n <= 0:
                raise CheckpointError(f"{entry.shard}: file ended while copying tensor {entry.name!r}; "
                                      "was it modified during conversion?")
            return n


def _to_f32(raw: bytes, dtype: str):
    import numpy as np

    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32)
        bits <<= 16  # in place: one chunk-sized temporary, not two
        return bits.view(np.float32)
    if dtype == "F16":
        return np.frombuffer(raw, dtype=np.float16).astype(np.float32)
    return np.frombuffer(raw, dtype=np.float32)


def _from_f32(values, qtype: str, cols: int):
    """`values` (float32) encoded as `qtype`, as an array whose buffer is written as is."""
    import numpy as np

    if qtype == "F32":
        return values
    if qtype == "F16":
        return values.astype(np.float16)
    if qtype == "BF16":
        return f32_to_bf16_bits(values)
    import gguf

    return gguf.quants.quantize(values.reshape(-1, cols), gguf.GGMLQuantizationType[qtype])



_LUT: dict[str, object] = {}


def _bf16_to_f16_table():
    """float16 bits of every bfloat16 bit pattern (what numpy's rounding cast gives), so a
    bf16 -> f16 chunk is one table lookup instead of a slow float32 -> float16 cast."""
    table = _LUT.get("bf16->f16")
    if table is None:
        import numpy as np

        every = bf16_bits_to_f32(np.arange(1 << 16, dtype=np.uint32))
        with np.errstate(over="ignore"):
            table = _LUT["bf16->f16"] = every.astype(np.float16).view(np.uint16)
    return table


def _convert_chunk(raw: bytes, dtype: str, qtype: str, cols: int):
    if dtype == "BF16" and qtype == "F16":
        import numpy as np

        return _bf16_to_f16_table()[np.frombuffer(raw, dtype=np.uint16)]
    return _from_f32(_to_f32(raw, dtype), qtype, cols)


def _write_tensor(plan: PlannedTensor, src_fd: int, dst_fd: int, dst_off: int, copier: _Copier,
                  pool: Executor, tick: Callable[[int], None]) -> None:
    entry = plan.src
    if entry.dtype == plan.qtype:
        done = 0
        while done < entry.nbytes:
            n = copier.copy(src_fd, entry.offset + done, dst_fd, dst_off + done,
                            min(constants.COPY_CHUNK_BYTES, entry.nbytes - done), entry)
            done += n
            tick(n)
        return
    cols = entry.shape[-1] if entry.shape else 1
    itemsize = entry.nbytes // max(entry.numel, 1)
    rows = entry.numel // cols if cols else 0
    row_bytes = cols * itemsize
    out_row_bytes = plan.nbytes // max(rows, 1)
    step = max(1, constants.CONVERT_CHUNK_BYTES // max(row_bytes, 1))

    def chunk(r: int) -> int:
        # positional reads and writes: chunks are independent, so workers need no ordering
        n_rows = min(step, rows - r)
        raw = os.pread(src_fd, n_rows * row_bytes, entry.offset + r * row_bytes)
        if len(raw) != n_rows * row_bytes:
            raise CheckpointError(f"{entry.shard}: file ended while reading tensor {entry.name!r}; "
                                  "was it modified during conversion?")
        data = _convert_chunk(raw, entry.dtype, plan.qtype, cols)
        del raw
        if data.nbytes != n_rows * out_row_bytes:
            raise AssertionError(f"{plan.name}: chunk converted to {data.nbytes} bytes, planned {n_rows * out_row_bytes}")
        _pwrite_all(dst_fd, data, dst_off + r * out_row_bytes)
        return data.nbytes

    for n in pool.map(chunk, range(0, rows, step)):
        tick(n)  # in the calling thread, in order


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def write_all_data(tmp: Path, plans: list[PlannedTensor], total: int, progress: Progress | None,
                   on_tensor: TensorStart | None = None) -> None:
    """Write every planned tensor at its aligned offset after the header already in `tmp`;
    on_tensor(i, n, name) is called as tensor i of n (1-based) starts."""
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    fds: dict[Path, int] = {}
    dst = os.open(tmp, os.O_WRONLY)
    # numpy and the I/O calls release the GIL, so threads convert chunks in parallel; each holds
    # one chunk, which bounds memory at CONVERT_WORKERS chunks
    pool = ThreadPoolExecutor(max_workers=constants.CONVERT_WORKERS, thread_name_prefix="qwq-convert")
    try:
        offset = pad(os.fstat(dst).st_size)
        copier = _Copier()
        for i, plan in enumerate(plans, 1):
            if on_tensor is not None:
                on_tensor(i, len(plans), plan.name)
            if plan.src.shard not in fds:
                fds[plan.src.shard] = os.open(plan.src.shard, os.O_RDONLY)
            _write_tensor(plan, fds[plan.src.shard], dst, offset, copier, pool, tick)
            padded = pad(plan.nbytes)
            # zero the alignment gap explicitly: the next tensor starts at an aligned offset
            if padded > plan.nbytes:
                _pwrite_all(dst, bytes(padded - plan.nbytes), offset + plan.nbytes)
                tick(padded - plan.nbytes)
            offset += padded
        os.ftruncate(dst, offset)
        os.fsync(dst)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        os.close(dst)
        for fd in fds.values():
            os.close(fd)
