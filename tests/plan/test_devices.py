"""plan/devices.py: the split across workers and RAM, against llama.cpp's own buffer log."""

from __future__ import annotations

import pytest

from qwq_local.backend import binding as backend
from qwq_local.errors import InsufficientMemoryError
from qwq_local.plan.devices import load_options_for_workers, plan_with_workers, split_plan
from qwq_local.plan.measure import parse_buffer_log

GiB = 1024**3


@pytest.mark.parametrize("gpu_layers", [1, 2, 3])
def test_split_matches_the_buffers_llama_cpp_logs_per_rpc_device(rpc_workers, tiny_gguf_q4km, gpu_layers):
    planned = plan_with_workers(tiny_gguf_q4km, rpc_workers, n_ctx=256, gpu_layers=gpu_layers)
    layers, _why, extra = load_options_for_workers(tiny_gguf_q4km, rpc_workers, n_ctx=256, gpu_layers=gpu_layers)
    assert layers == planned.n_gpu_layers == gpu_layers
    with backend.capture_log() as log:
        model = backend.Model.load(tiny_gguf_q4km, n_gpu_layers=layers, extra_bufts=False, **extra)
        ctx = backend.Context(model, n_ctx=256, n_threads=1)
        ctx.close()
        model.close()
    measured = parse_buffer_log("".join(log))
    for share in planned.offload:
        logged = measured.buffers.get("model", {}).get(share.name, 0)
        # the log rounds to 0.01 MiB
        assert abs(logged - share.weights) <= 0.006 * 1024 * 1024, (share.name, logged, share.weights)
        assert abs(measured.buffers.get("KV", {}).get(share.name, 0) - share.kv) <= 0.006 * 1024 * 1024


def test_auto_shares_layers_by_free_memory_and_refuses_with_numbers(tiny_gguf):
    devices = [("RPC0[a:1]", 3 * GiB), ("RPC0[b:1]", 1 * GiB)]
    p = split_plan(tiny_gguf, devices, n_ctx=256, ram=8 * GiB)
    assert p.fits and p.n_gpu_layers == 3 and p.tensor_split == [2.0, 1.0]  # 3:1 of 3 layers
    assert "RPC0[a:1] 2 layers" in p.reason
    # Devices too small for any layer (the margin alone is 768 MiB), RAM too small for the rest.
    with pytest.raises(InsufficientMemoryError, match=r"RPC0\[a:1\] needs .* of .* free.*CPU needs"):
        split_plan(tiny_gguf, [("RPC0[a:1]", 100), ("RPC0[b:1]", 100)], n_ctx=256, ram=100)
