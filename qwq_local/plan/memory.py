"""Memory plan: what llama.cpp will allocate for a GGUF with given settings, per device, before
anything is loaded (the rules and the calibrated compute formula are in rules.py), whether
it fits this machine, and the automatic choice of GPU layers and context (auto_gpu_layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import constants
from ..backend.rope import rope_params
from ..errors import InsufficientMemoryError, UsageError
from .rules import (  # noqa: F401  (layer_of, pad_ctx: re-exported for callers and tests)
    ModelShape,
    compute_bytes,
    device_of_layer,
    gpu_tensor_bytes,
    is_repacked,
    kv_bytes_per_token,
    layer_of,
    pad_ctx,
    read_shape,
)


@dataclass
class MemoryPlan:
    """Bytes llama.cpp will allocate, per device ("cpu" is host RAM, "gpu" the offload device)."""

    model: str
    gpu_layers: int
    n_layer: int
    n_ctx: int
    n_ctx_requested: int
    n_batch: int
    n_ubatch: int
    kv_type: str
    flash_attn: bool
    repack: bool
    weights: dict[str, int]
    weights_logged: dict[str, int]
    kv: dict[str, int]
    compute: dict[str, int]
    output: dict[str, int]
    vram: int | None = None
    ram: int | None = None
    fits: bool | None = None
    reason: str = ""
    compute_source: str = "formula"  # or "llama.cpp dry run"
    # The rope scaling this context gets (backend.rope.rope_params): no memory effect, shown so
    # a plan says everything the load will do.
    rope: dict = field(default_factory=dict)
    # The speculative-decoding draft model's own plan (weights, KV, compute), counted in total().
    draft: "MemoryPlan | None" = None

    def total(self, device: str) -> int:
        own = sum(part.get(device, 0) for part in (self.weights, self.kv, self.compute, self.output))
        return own + (self.draft.total(device) if self.draft is not None else 0)

    @property
    def total_bytes(self) -> int:
        return self.total("cpu") + self.total("gpu")

    @property
    def logged_total_bytes(self) -> int:
        """What llama.cpp's own buffer-size log lines add up to (mapped spans included)."""
        return sum(self.weights_logged.values()) + sum(self.kv.values()) + sum(self.compute.values()) \
            + sum(self.output.values())

    def to_dict(self) -> dict[str, Any]:
        def dev(part: dict[str, int]) -> dict[str, int]:
            out = {"cpu": part.get("cpu", 0), "gpu": part.get("gpu", 0)}
            out["total"] = out["cpu"] + out["gpu"]
            return out

        totals = {"cpu": self.total("cpu"), "gpu": self.total("gpu")}
        totals["total"] = totals["cpu"] + totals["gpu"]
        return {
            "model": self.model, "gpu_layers": self.gpu_layers, "n_layer": self.n_layer,
            "n_ctx": self.n_ctx, "n_ctx_requested": self.n_ctx_requested, "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch, "kv_type": self.kv_type, "flash_attn": self.flash_attn,
            "repack": self.repack, "compute_source": self.compute_source, "rope": self.rope,
            "weights_bytes": dev(self.weights), "kv_bytes": dev(self.kv),
            "compute_bytes": dev(self.compute), "output_bytes": dev(self.output),
            "total_bytes": totals,
            "weights_logged_bytes": dev(self.weights_logged),
            "logged_total_bytes": self.logged_total_bytes,
            "vram_bytes": self.vram, "ram_bytes": self.ram, "fits": self.fits, "reason": self.reason,
            "draft": self.draft.to_dict() if self.draft is not None else None,
        }


def _resolve_gpu_layers(gpu_layers: int | str, n_layer: int) -> int:
    if isinstance(gpu_layers, str):
        text = gpu_layers.strip().lower()
        if text in {"all", "max", "-1"}:
            return n_layer + 1
        if not text.lstrip("-").isdigit():
            raise UsageError(f"gpu_layers must be a number, 'all' or 'auto', not {gpu_layers!r}")
        gpu_layers = int(text)
    if gpu_layers < 0:
        return n_layer + 1  # llama.cpp's -1: everything
    return min(int(gpu_layers), n_layer + 1)


def _resolve_flash_attn(kv_type: str, flash_attn: bool | None) -> bool:
    if kv_type not in constants.KV_TYPES:
        raise UsageError(f"unknown KV cache type {kv_type!r}; use one of {', '.join(constants.KV_TYPES)}")
    quantized_v = kv_type != "f16"
    if flash_attn is False and quantized_v:
        raise UsageError(f"a {kv_type} KV cache needs flash attention (llama.cpp refuses a quantized "
                         "V cache without it); drop --no-flash-attn or use --kv-type f16")
    return True if flash_attn is None else bool(flash_attn)


def _check_kv_blocks(shape: ModelShape, kv_type: str) -> None:
    """llama.cpp refuses a quantized KV cache whose blocks do not divide the head size."""
    from ..quantize.types import ggml_block

    block = ggml_block(kv_type.upper())[0]
    if block > 1 and (shape.head_dim_k % block or shape.head_dim_v % block):
        raise UsageError(f"a {kv_type} KV cache needs head sizes divisible by {block}, and this model's are "
                         f"{shape.head_dim_k} (K) and {shape.head_dim_v} (V); use --kv-type f16")


def _default_repack() -> bool:
    from ..backend import binding as backend

    return "REPACK = 1" in backend.system_info() and backend.extra_bufts_allowed()


def plan(model: Path | str | ModelShape, *, n_ctx: int = constants.DEFAULT_N_CTX, kv_type: str = "f16",
         flash_attn: bool | None = None, n_batch: int = constants.DEFAULT_N_BATCH,
         n_ubatch: int = constants.DEFAULT_N_UBATCH, gpu_layers: int | str = 0,
         vram: int | None = None, ram: int | None = None, use_mmap: bool = True,
         offload_kqv: bool = True, repack: bool | None = None, logits_all: bool = False,
         dry_run: bool = False, rope_scaling: str = constants.DEFAULT_ROPE_SCALING,
         draft: Path | str | ModelShape | None = None, draft_gpu_layers: int | str = 0,
         n_seq: int = 1) -> MemoryPlan:
    """Predict llama.cpp's allocations for `model` (a GGUF path) with these settings.

    gpu_layers: a number (0 = CPU only, n_layer + 1 or -1 = everything) or "auto" (see
    auto_gpu_layers). vram/ram: free bytes to check the plan against (None: this machine's,
    from hardware.py; no GPU or no offload support means 0 VRAM). repack: whether CPU weights
    get repacked (None: as this llama.cpp build and backend.extra_bufts_allowed() decide).
    logits_all: batches will ask for every token's logits (perplexity/KL evaluation); llama.cpp
    then grows the output buffer to n_vocab floats per batch token on the first such batch.
    dry_run: take the compute buffers from llama.cpp itself (a metadata-only load of this file
    with these settings: exact for this build; used where the build can place the layers as
    planned, i.e. CPU-only plans or builds with GPU offload).
    rope_scaling: "auto" | "none" | "yarn", as QwQ.load; the plan's `rope` shows what the
    context (after any automatic shortening) gets. Raises UsageError for n_ctx outside 1..131072.
    draft: a speculative-decoding draft GGUF, planned with the same context and KV settings at
    draft_gpu_layers (its own context: QwQ.load(draft=...)); its bytes count in the totals and
    the fit (plan.draft holds its breakdown).
    n_seq: sequences sharing the context (the server's --parallel slots). n_ctx is the KV cache of
    all of them (n_ctx // n_seq cells each, llama.cpp's non-unified KV), so the KV bytes are
    those of n_ctx; the output buffer holds at least n_seq rows (llama_context::output_reserve).
    """
    rope = rope_params(n_ctx, rope_scaling)  # also the n_ctx range check
    shape = read_shape(model)
    kv_type = kv_type.lower()
    if isinstance(gpu_layers, str) and gpu_layers.strip().lower() == "auto":
        fit = auto_gpu_layers(shape, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash_attn, n_batch=n_batch,
                              n_ubatch=n_ubatch, vram=vram, ram=ram, use_mmap=use_mmap, repack=repack,
                              dry_run=dry_run or None, rope_scaling=rope_scaling, draft=draft,
                              draft_gpu_layers=draft_gpu_layers, n_seq=n_seq)
        return fit.plan
    if n_batch < 1 or n_ubatch < 1:
        raise UsageError(f"batch sizes must be at least 1, not n_batch={n_batch}, n_ubatch={n_ubatch}")
    n_layer = shape.n_layer
    ngl = _resolve_gpu_layers(gpu_layers, n_layer)
    fa = _resolve_flash_attn(kv_type, flash_attn)
    _check_kv_blocks(shape, kv_type)
    if repack is None:
        repack = _default_repack()
    ctx = pad_ctx(n_ctx)
    # llama.cpp clamps the batch to the context as asked, before rounding the context up.
    batch = min(n_batch, int(n_ctx))
    ubatch = min(n_ubatch, batch)

    weights = {"cpu": 0, "gpu": 0}
    logged = {"cpu": 0, "gpu": 0}
    spans: dict[int, list[int]] = {}  # split part -> [first byte, end] of its mapped CPU tensors
    repacked = 0
    cpu_layer_bytes: dict[int, int] = {}
    output_weight_bytes = 0
    for name, type_name, tshape, offset, nbytes, part in shape.tensors:
        layer = layer_of(name, n_layer)
        where = device_of_layer(layer, n_layer, ngl)
        weights[where] += nbytes
        if where == "gpu":
            logged["gpu"] += gpu_tensor_bytes(type_name, tshape, nbytes)
            continue
        if 0 <= layer < n_layer:
            cpu_layer_bytes[layer] = cpu_layer_bytes.get(layer, 0) + nbytes
        elif layer == n_layer and len(tshape) >= 2:
            output_weight_bytes += nbytes
        if repack and is_repacked(name, type_name, tshape):
            repacked += nbytes
        elif use_mmap:
            span = spans.setdefault(part, [offset, offset + nbytes])
            span[0], span[1] = min(span[0], offset), max(span[1], offset + nbytes)
        else:
            logged["cpu"] += -(-nbytes // constants.GGUF_ALIGNMENT) * constants.GGUF_ALIGNMENT
    logged["cpu"] += sum(end - start for start, end in spans.values())
    logged["cpu"] += repacked

    kv = {"cpu": 0, "gpu": 0}
    per_layer_kv = kv_bytes_per_token(shape, kv_type) // max(n_layer, 1) * ctx
    for layer in range(n_layer):
        where = device_of_layer(layer, n_layer, ngl) if offload_kqv else "cpu"
        kv[where] += per_layer_kv

    n_gpu_blocks = min(ngl, n_layer)
    output_on_gpu = ngl > n_layer
    compute = {"cpu": 0, "gpu": 0}
    qkv = kv_type != "f16"
    compute["cpu"] = compute_bytes(shape, n_ctx=ctx, n_ubatch=ubatch, flash_attn=fa, quantized_kv=qkv,
                                    layers=n_gpu_blocks < n_layer, output=not output_on_gpu)
    if ngl > 0:
        peaks = [compute_bytes(shape, n_ctx=ctx, n_ubatch=ubatch, flash_attn=fa, quantized_kv=qkv,
                                layers=n_gpu_blocks > 0, output=output_on_gpu)]
        if not output_on_gpu and ubatch >= 32:
            # Batches of 32+ tokens run the CPU tensors' matrix products on the GPU as well
            # (ggml's op offload): the scheduler copies those weights into the GPU compute
            # buffer, one split at a time: a CPU layer with its activations, or the output
            # matrix with the logits it produces.
            if cpu_layer_bytes:
                peaks.append(max(cpu_layer_bytes.values()) + compute_bytes(
                    shape, n_ctx=ctx, n_ubatch=ubatch, flash_attn=fa, layers=True, output=False))
            peaks.append(output_weight_bytes + compute_bytes(
                shape, n_ctx=ctx, n_ubatch=ubatch, flash_attn=fa, quantized_kv=qkv, layers=False, output=True))
        compute["gpu"] = max(peaks)
    source = "formula"
    if dry_run:
        from . import hardware

        if ngl == 0 or hardware.build().gpu_offload:
            from .measure import buffer_device, dry_run as llama_dry_run

            got = llama_dry_run(shape.path, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash_attn, n_batch=n_batch,
                                n_ubatch=n_ubatch, gpu_layers=ngl)
            compute = {"cpu": 0, "gpu": 0}
            for name, size in got.buffers.get("compute", {}).items():
                compute[buffer_device(name)] += size
            source = "llama.cpp dry run"
    # output_reserve(): n_vocab floats per output, max(outputs in a batch, n_seq_max).
    output = {"cpu": shape.n_vocab * 4 * max(batch if logits_all else 1, int(n_seq)), "gpu": 0}

    result = MemoryPlan(
        model=str(shape.path), gpu_layers=ngl, n_layer=n_layer, n_ctx=ctx, n_ctx_requested=int(n_ctx),
        n_batch=batch, n_ubatch=ubatch, kv_type=kv_type, flash_attn=fa, repack=bool(repack), compute_source=source,
        weights=weights, weights_logged=logged, kv=kv, compute=compute, output=output, rope=rope)
    if draft is not None:
        result.draft = plan(draft, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash_attn, n_batch=n_batch,
                            n_ubatch=n_ubatch, gpu_layers=draft_gpu_layers, vram=vram, ram=ram, use_mmap=use_mmap,
                            offload_kqv=offload_kqv, repack=repack, dry_run=dry_run,
                            rope_scaling=rope_scaling, n_seq=n_seq)
    _check_fit(result, vram=vram, ram=ram)
    return result


def _available(vram: int | None, ram: int | None) -> tuple[int, int]:
    if vram is None or ram is None:
        from . import hardware

        if vram is None:
            vram = hardware.offload_memory_free()
        if ram is None:
            ram = hardware.ram().available
    return int(vram), int(ram)


def _check_fit(p: MemoryPlan, *, vram: int | None, ram: int | None) -> None:
    from ..fileutil import human_bytes

    vram_of_this_machine = vram is None
    vram, ram = _available(vram, ram)
    p.vram, p.ram = vram, ram
    need_gpu, need_cpu = p.total("gpu"), p.total("cpu")
    vram_ok = need_gpu == 0 or need_gpu <= vram - constants.PLAN_VRAM_MARGIN_BYTES
    from .hardware import unified_memory

    unified = unified_memory()
    if unified:  # Apple Silicon: the GPU's share comes out of the same RAM
        need_cpu += need_gpu
    ram_ok = need_cpu <= ram - constants.PLAN_RAM_MARGIN_BYTES
    p.fits = vram_ok and ram_ok
    parts = []
    if need_gpu:
        parts.append(f"GPU needs {human_bytes(need_gpu)} of {human_bytes(vram)} free "
                     f"({'ok' if vram_ok else 'too much'}, {human_bytes(constants.PLAN_VRAM_MARGIN_BYTES)} kept free)")
        if vram_of_this_machine and vram == 0:
            parts[-1] += (" (no GPU that this llama-cpp-python can offload to: see `qwq-local doctor`, or plan "
                          "for another machine with --vram)")
    parts.append(f"RAM needs {human_bytes(need_cpu)}{' (GPU share included: unified memory)' if unified and need_gpu else ''} "
                 f"of {human_bytes(ram)} available "
                 f"({'ok' if ram_ok else 'too much'}, {human_bytes(constants.PLAN_RAM_MARGIN_BYTES)} kept free)")
    p.reason = "; ".join(parts)


@dataclass(frozen=True)
class AutoFit:
    """auto_gpu_layers' answer; unpacks as (gpu_layers, n_ctx, reason)."""

    gpu_layers: int
    n_ctx: int
    reason: str
    plan: MemoryPlan

    def __iter__(self):
        return iter((self.gpu_layers, self.n_ctx, self.reason))

    def __int__(self) -> int:
        return self.gpu_layers


def _contexts(n_ctx: int, floor: int) -> list[int]:
    out = [pad_ctx(n_ctx)]
    c = out[0]
    while c // 2 >= floor:
        c = pad_ctx(c // 2)
        out.append(c)
    if out[-1] > floor and floor > 0:
        out.append(pad_ctx(floor))
    return out


def auto_gpu_layers(model: Path | str | ModelShape, *, n_ctx: int = constants.DEFAULT_N_CTX,
                    kv_type: str = "f16", flash_attn: bool | None = None,
                    n_batch: int = constants.DEFAULT_N_BATCH, n_ubatch: int = constants.DEFAULT_N_UBATCH,
                    vram: int | None = None, ram: int | None = None, min_ctx: int = constants.PLAN_MIN_CTX,
                    use_mmap: bool = True, repack: bool | None = None, dry_run: bool | None = None,
                    rope_scaling: str = constants.DEFAULT_ROPE_SCALING,
                    draft: Path | str | ModelShape | None = None, draft_gpu_layers: int | str = 0,
                    n_seq: int = 1) -> AutoFit:
    """The most GPU layers that fit free VRAM and RAM (each minus a margin) at n_ctx; if nothing
    fits, the largest context (a multiple of 256) down to `min_ctx` at which something does.

    dry_run: size compute buffers with llama.cpp's metadata-only load (default: on builds with
    GPU offload when a GPU is in play; see plan()). draft/draft_gpu_layers: a draft model whose
    memory is reserved first (see plan()).
    Returns AutoFit(gpu_layers, n_ctx, reason, plan), which also unpacks as a 3-tuple. On a
    build without GPU offload (or with vram=0) gpu_layers is 0. Raises InsufficientMemoryError
    with the numbers and alternatives when even CPU-only at `min_ctx` does not fit.
    """
    from ..fileutil import human_bytes

    shape = read_shape(model)
    vram, ram = _available(vram, ram)
    if repack is None:
        repack = _default_repack()
    max_layers = shape.n_layer + 1 if vram > constants.PLAN_VRAM_MARGIN_BYTES else 0
    if dry_run is None:
        # A GPU build sizes its GPU compute buffers itself, exactly (the GPU side of the
        # formula is unmeasured); a CPU build plans CPU-only, where the formula is calibrated.
        from . import hardware

        dry_run = max_layers > 0 and hardware.build().gpu_offload
    kw = dict(kv_type=kv_type, flash_attn=flash_attn, n_batch=n_batch, n_ubatch=n_ubatch, dry_run=dry_run,
              vram=vram, ram=ram, use_mmap=use_mmap, repack=repack, rope_scaling=rope_scaling,
              draft=read_shape(draft) if draft is not None else None, draft_gpu_layers=draft_gpu_layers,
              n_seq=n_seq)

    def best_at(ctx: int) -> tuple[MemoryPlan | None, MemoryPlan]:
        """The plan with the most GPU layers that fits at `ctx` (None if none does), and the
        plan that comes closest (for the refusal message)."""
        # Fewer GPU layers never needs more VRAM, so search for the largest that fits.
        lo, hi, best = 0, max_layers, None
        while lo <= hi:
            mid = (lo + hi) // 2
            p = plan(shape, n_ctx=ctx, gpu_layers=mid, **kw)
            gpu_ok = p.total("gpu") == 0 or p.total("gpu") <= vram - constants.PLAN_VRAM_MARGIN_BYTES
            if gpu_ok:
                lo = mid + 1
                if p.fits:
                    best = p
            else:
                hi = mid - 1
        return best, plan(shape, n_ctx=ctx, gpu_layers=max(hi, 0), **kw)

    smallest = None
    too_big = None  # the smallest context tried that did not fit
    for ctx in _contexts(n_ctx, min(min_ctx, n_ctx)):
        best, smallest = best_at(ctx)
        if best is None:
            too_big = ctx
            continue
        if too_big is not None:
            # Halving found a context that fits; the largest one lies between it and the
            # last that did not (memory only grows with the context): bisect in llama.cpp's
            # 256-token steps.
            pad = constants.LLAMA_CTX_PAD
            lo, hi = best.n_ctx // pad + 1, too_big // pad - 1
            while lo <= hi:
                mid = (lo + hi) // 2
                found, _ = best_at(mid * pad)
                if found is not None:
                    best, lo = found, mid + 1
                else:
                    hi = mid - 1
        why = (f"{best.gpu_layers} of {shape.n_layer + 1} layers on the GPU "
               if max_layers else "no GPU offload available: CPU only, ")
        why += f"at context {best.n_ctx}"
        if best.n_ctx < pad_ctx(n_ctx):
            why += f" (reduced from {n_ctx}: more did not fit)"
        if max_layers and best.gpu_layers < max_layers:
            why += "; more layers would exceed free VRAM"
        best.reason = why + "; " + best.reason
        return AutoFit(best.gpu_layers, best.n_ctx, best.reason, best)
    raise InsufficientMemoryError(_no_fit_message(shape, smallest, vram=vram, ram=ram, n_ctx=n_ctx,
                                                  min_ctx=min_ctx, kv_type=kv_type, human=human_bytes))


def _no_fit_message(shape: ModelShape, p: MemoryPlan, *, vram: int, ram: int, n_ctx: int, min_ctx: int,
                    kv_type: str, human) -> str:
    budget = max(vram - constants.PLAN_VRAM_MARGIN_BYTES, 0) + max(ram - constants.PLAN_RAM_MARGIN_BYTES, 0)
    need = p.total_bytes
    asked = f" (asked for {pad_ctx(n_ctx)})" if pad_ctx(n_ctx) != p.n_ctx else ""
    msg = (f"{shape.path.name} does not fit even at context {p.n_ctx}{asked}: it needs {human(need)} "
           f"(weights {human(sum(p.weights.values()))}, KV {human(sum(p.kv.values()))}, compute "
           f"{human(sum(p.compute.values()))}) but {human(vram)} VRAM and {human(ram)} RAM are free "
           f"({human(budget)} usable after keeping {human(constants.PLAN_VRAM_MARGIN_BYTES)} VRAM and "
           f"{human(constants.PLAN_RAM_MARGIN_BYTES)} RAM free). Try: ")
    alts = []
    fixed = need - sum(p.kv.values())
    per_token = kv_bytes_per_token(shape, kv_type)
    ctx_fit = (budget - fixed) // per_token if per_token else 0
    if 256 <= ctx_fit < p.n_ctx:
        alts.append(f"a smaller context (--ctx {ctx_fit // 256 * 256})")
    if kv_type == "f16":
        alts.append(f"a q8_0 KV cache (--kv-type q8_0: {human(kv_bytes_per_token(shape, 'q8_0') * p.n_ctx)} "
                    f"instead of {human(per_token * p.n_ctx)})")
    overhead = need - sum(p.weights.values())
    sizes = {**constants.QWQ_GGUF_SIZES, **constants.QWQ_COMMUNITY_GGUF_SIZES}
    smaller = [(q, s) for q, s in sorted(sizes.items(), key=lambda kv: -kv[1])
               if s + overhead <= budget and s < sum(p.weights.values())]
    if smaller:
        q, s = smaller[0]
        alts.append(f"a smaller quant such as {q} ({s / 1e9:.1f} GB for QwQ-32B; qwq-local pull --quant {q})")
    else:
        alts.append("a smaller quant (for QwQ-32B even IQ2_XXS is 9.1 GB) or a machine with more memory")
    return msg + "; ".join(alts)
