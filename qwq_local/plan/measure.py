"""What llama.cpp actually allocates for a model and context, read from its own log lines
(`... model buffer size = X MiB`, `KV buffer size`, `compute buffer size`, `output buffer
size`). Used by the plan's tests and benchmarks/bench_plan.py to check the predictions."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
_BUF = re.compile(r"(?P<dev>[\w.]+(?:\[[^\]]*\])?)\s+(?P<kind>model|KV|compute|output) buffer size =\s+(?P<mib>[\d.]+) MiB")
# Printed when the context is freed, with 4 decimals instead of 2.
_COMPUTE_EXACT = re.compile(r"(?P<dev>[\w.]+(?:\[[^\]]*\])?) compute buffer size is\s+(?P<mib>[\d.]+) MiB")


@dataclass
class Measured:
    """Buffer bytes by kind ("model", "KV", "compute", "output") and buffer name (CPU_Mapped...)."""

    buffers: dict[str, dict[str, int]] = field(default_factory=dict)
    n_ctx: int = 0

    def kind(self, kind: str) -> int:
        return sum(self.buffers.get(kind, {}).values())

    @property
    def total(self) -> int:
        return sum(self.kind(k) for k in ("model", "KV", "compute", "output"))


def buffer_device(name: str) -> str:
    """"cpu" for host buffers (CPU, CPU_Mapped, CPU_REPACK, CUDA_Host...), "gpu" otherwise."""
    return "cpu" if name.startswith("CPU") or name.endswith("_Host") else "gpu"


def parse_buffer_log(text: str) -> Measured:
    out = Measured()
    exact: dict[str, int] = {}
    for line in text.splitlines():
        m = _BUF.search(line)
        if m:
            bucket = out.buffers.setdefault(m["kind"], {})
            bucket[m["dev"]] = bucket.get(m["dev"], 0) + round(float(m["mib"]) * MiB)
            continue
        m = _COMPUTE_EXACT.search(line)
        if m:
            exact[m["dev"]] = round(float(m["mib"]) * MiB)
    if exact:
        out.buffers["compute"] = exact
    return out


def measure(model: Path | str, *, n_ctx: int, kv_type: str = "f16", flash_attn: bool | None = None,
            n_batch: int = 512, n_ubatch: int = 512, gpu_layers: int = 0, validate: bool = True,
            metadata_only: bool = False) -> Measured:
    """Load `model` and a context with these settings, free them, and return what was logged."""
    from ..backend import binding as backend
    from ..gguf.safe_load import load_model

    load = load_model if validate else backend.Model.load
    with backend.capture_log() as log:
        model_obj = load(model, n_gpu_layers=gpu_layers, metadata_only=metadata_only)
        try:
            ctx = backend.Context(model_obj, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=1,
                                  type_k=kv_type, type_v=kv_type, flash_attn=flash_attn)
            n = ctx.n_ctx
            ctx.close()
        finally:
            model_obj.close()
    result = parse_buffer_log("".join(log))
    result.n_ctx = n
    return result


def dry_run(model: Path | str, *, n_ctx: int, kv_type: str = "f16", flash_attn: bool | None = None,
            n_batch: int = 512, n_ubatch: int = 512, gpu_layers: int = 0) -> Measured:
    """Ask llama.cpp itself for its compute and output buffer sizes without reading a weight:
    a metadata-only model (`no_alloc`) and a context on it (weights and KV then log as 0).
    Exact for this build and its devices, so on a GPU build it also sizes the GPU's buffers.
    The file is first validated (and test-loaded in a child process once) as every load is."""
    return measure(model, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash_attn, n_batch=n_batch,
                   n_ubatch=n_ubatch, gpu_layers=gpu_layers, metadata_only=True)
