"""Placing layers across several offload devices: local GPUs and llama.cpp RPC workers, with the
rest in local RAM (issue #12).

llama.cpp's rule (src/llama-model.cpp, load_tensors): with n_gpu_layers = N, the last N of the
n_layer + 1 "layers" (the blocks, then the output layer) are offloaded, the input layer never;
offloaded layer j (0..N-1) goes to device k where k is the first with cumsum(split)[k]/sum > j/N.
With integer layer counts as tensor_split, device k gets exactly its count of consecutive layers,
so the plan below is the placement llama.cpp makes. Device order is llama.cpp's default: RPC
workers first, then local GPUs (src/llama.cpp, llama_prepare_model_devices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .. import constants
from ..errors import InsufficientMemoryError
from .rules import compute_bytes, gpu_tensor_bytes, kv_bytes_per_token, layer_of, pad_ctx, read_shape


@dataclass
class Share:
    """One device's part: name as llama.cpp names its buffers ("RPC0[10.0.0.2:50052]", "CUDA0",
    "CPU"), free bytes it reported, its layers [first, first + layers), bytes by kind."""

    name: str
    free: int
    layers: int = 0
    first: int = 0
    weights: int = 0
    kv: int = 0
    compute: int = 0
    margin: int = constants.PLAN_VRAM_MARGIN_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute

    @property
    def fits(self) -> bool:
        return self.total == 0 or self.total <= self.free - self.margin


@dataclass
class DevicePlan:
    """Where every layer goes. `offload` are the devices in llama.cpp's order, `host` is local
    RAM; n_gpu_layers and tensor_split are what to pass to llama_model_params."""

    model: str
    n_layer: int
    n_ctx: int
    offload: list[Share]
    host: Share
    fits: bool = False
    reason: str = ""
    ptrs: list[int] = field(default_factory=list)  # ggml_backend_dev_t of each offload device

    @property
    def n_gpu_layers(self) -> int:
        return sum(s.layers for s in self.offload)

    @property
    def tensor_split(self) -> list[float]:
        return [float(s.layers) for s in self.offload]

    def table(self) -> list[dict]:
        rows = []
        for s in [*self.offload, self.host]:
            last = s.first + s.layers - 1
            span = "-" if not s.layers else (f"{s.first}-{last}" if last < self.n_layer else
                                              f"{s.first}-{last - 1} + output" if s.layers > 1 else "output")
            rows.append({"device": s.name, "layers": s.layers, "blocks": span, "weights": s.weights,
                         "kv": s.kv, "compute": s.compute, "total": s.total, "free": s.free, "fits": s.fits})
        return rows

    def describe(self) -> str:
        from ..fileutil import human_bytes

        parts = [f"{s.name} {s.layers} layers {human_bytes(s.total)} of {human_bytes(s.free)} free"
                 for s in [*self.offload, self.host]]
        return "; ".join(parts)


def _largest_remainder(n: int, weights: Sequence[int]) -> list[int]:
    total = sum(weights)
    if n <= 0 or total <= 0:
        return [0] * len(weights)
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_plan(model: Path | str, devices: Sequence[tuple[str, int]], *, n_ctx: int = constants.DEFAULT_N_CTX,
               kv_type: str = "f16", flash_attn: bool | None = None, n_ubatch: int = constants.DEFAULT_N_UBATCH,
               gpu_layers: int | str = "auto", ram: int | None = None) -> DevicePlan:
    """Place the layers of `model` on `devices` ([(buffer name, free bytes)], llama.cpp's order)
    and local RAM.

    gpu_layers "auto": the most layers that fit, shared by free memory (as llama.cpp's default
    split) and kept within each device's free memory minus constants.PLAN_VRAM_MARGIN_BYTES;
    raises InsufficientMemoryError with every device's numbers when even the best split does not
    fit. A number: that many layers shared by free memory, checked but not refused.
    Bytes: weights as the devices log them (rules.gpu_tensor_bytes), KV per layer, one compute
    buffer per device (rules.compute_bytes); RAM: ram bytes (None: available now)."""
    shape = read_shape(model)
    n_layer = shape.n_layer
    ctx = pad_ctx(n_ctx)
    fa = True if flash_attn is None else bool(flash_attn)
    ubatch = min(n_ubatch, int(n_ctx))
    per_layer_dev = [0] * (n_layer + 1)  # index n_layer: the output layer
    per_layer_host = [0] * (n_layer + 1)
    host_fixed = 0
    for name, type_name, tshape, _offset, nbytes, _part in shape.tensors:
        layer = layer_of(name, n_layer)
        if layer < 0:
            host_fixed += nbytes
            continue
        per_layer_dev[layer] += gpu_tensor_bytes(type_name, tshape, nbytes)
        per_layer_host[layer] += nbytes
    kv_layer = kv_bytes_per_token(shape, kv_type) // max(n_layer, 1) * ctx
    if ram is None:
        from .hardware import ram as ram_now

        ram = ram_now().available

    def build(counts: list[int]) -> DevicePlan:
        n_off = sum(counts)
        start = n_layer + 1 - n_off
        shares, first = [], start
        for (name, free), count in zip(devices, counts):
            layers = range(first, first + count)
            has_out = n_layer in layers
            share = Share(name=name, free=int(free), layers=count, first=first,
                          weights=sum(per_layer_dev[i] for i in layers),
                          kv=kv_layer * sum(1 for i in layers if i < n_layer))
            if count:
                share.compute = compute_bytes(shape, n_ctx=ctx, n_ubatch=ubatch, flash_attn=fa,
                                              layers=count > int(has_out), output=has_out,
                                              quantized_kv=kv_type != "f16")
            shares.append(share)
            first += count
        host = Share(name="CPU", free=int(ram), layers=start, first=0, margin=constants.PLAN_RAM_MARGIN_BYTES,
                     weights=host_fixed + sum(per_layer_host[:start]), kv=kv_layer * min(start, n_layer))
        host.compute = compute_bytes(shape, n_ctx=ctx, n_ubatch=ubatch, flash_attn=fa, layers=start > 0,
                                     output=start > n_layer, quantized_kv=kv_type != "f16") \
            + shape.n_vocab * 4  # the output (logits) buffer lives in RAM
        p = DevicePlan(model=str(shape.path), n_layer=n_layer, n_ctx=ctx, offload=shares, host=host)
        p.fits = all(s.fits for s in shares) and host.fits
        return p

    weights = [max(int(free), 0) for _name, free in devices]
    if isinstance(gpu_layers, str) and gpu_layers.strip().lower() != "auto":
        gpu_layers = int(gpu_layers)
    if not isinstance(gpu_layers, str):
        n = n_layer + 1 if gpu_layers < 0 else min(int(gpu_layers), n_layer + 1)
        p = build(_largest_remainder(n, weights))
        p.reason = f"{n} layers offloaded as asked: {p.describe()}"
        return p
    best = None
    for n in range(n_layer + 1 if devices else 0, -1, -1):
        p = build(_largest_remainder(n, weights))
        if best is None:
            best = p
        if p.fits:
            p.reason = f"auto: {p.describe()}"
            return p
    from ..fileutil import human_bytes

    need = sum(s.total for s in best.offload) + best.host.total
    have = sum(max(s.free - s.margin, 0) for s in [*best.offload, best.host])
    detail = "; ".join(f"{s.name} needs {human_bytes(s.total)} of {human_bytes(s.free)} free" for s in [*best.offload, best.host])
    raise InsufficientMemoryError(
        f"{Path(shape.path).name} at {n_ctx} tokens does not fit these devices: {detail} "
        f"(total {human_bytes(need)} > {human_bytes(have)} usable, margins kept free); add a worker, "
        "use a smaller quant, a shorter --ctx or a q8_0 KV cache")


def rpc_devices(endpoints: Sequence[str], *, connect: bool = False) -> list:
    """The workers' devices (backend.rpc.RpcDevice), asked over RPC: probed from a child
    process, or with connect=True also registered in this process (needed to load)."""
    from ..backend import rpc

    return rpc.connect(endpoints) if connect else [d for ep in endpoints for d in rpc.probe(ep)]


def device_name(dev) -> str:
    """The buffer name llama.cpp logs for an RPC device: "RPC<index on the worker>[endpoint]"."""
    return f"RPC{dev.index}[{dev.endpoint}]"


def local_gpus() -> list[tuple[str, int, int | None]]:
    """(name, free bytes, ggml_backend_dev_t) of this machine's GPUs as ggml sees them."""
    from ..backend import rpc

    devs = rpc.local_devices()
    return [(d["name"], d["free"], d["ptr"]) for d in devs if d["type"] in ("GPU", "IGPU")]


def plan_with_workers(model: Path | str, endpoints: Sequence[str], *, connect: bool = False, **options) -> DevicePlan:
    """split_plan over the workers (then the local GPUs, llama.cpp's order) and RAM.

    connect=True registers the workers in this process and fills DevicePlan.ptrs for loading.
    Raises RpcError (worker unreachable/busy, no RPC in this build), InsufficientMemoryError."""
    workers = rpc_devices(endpoints, connect=connect)
    gpus = local_gpus()
    devices = [(device_name(d), d.free) for d in workers] + [(name, free) for name, free, _ in gpus]
    p = split_plan(model, devices, **options)
    if connect:
        p.ptrs = [d.ptr for d in workers] + [ptr for _, _, ptr in gpus]
    return p


def load_options_for_workers(model: Path | str, rpc, **options) -> tuple[int, str, dict]:
    """(n_gpu_layers, placement text, extra Model.load options) to load `model` across the RPC
    workers `rpc` ("HOST:PORT,..." or a list), local GPUs and RAM (QwQ.load's rpc option)."""
    from ..backend.rpc import RpcGuard, parse_endpoints, require_rpc
    from ..errors import UsageError

    require_rpc()
    endpoints = parse_endpoints(rpc)
    if not endpoints:
        raise UsageError("rpc needs at least one worker as HOST:PORT")
    p = plan_with_workers(model, endpoints, connect=True, **options)
    return p.n_gpu_layers, p.reason, {"devices": p.ptrs, "tensor_split": p.tensor_split,
                                      "guard": RpcGuard(endpoints)}
