"""The memory plan against what llama.cpp really allocates (CPU loads here), llama.cpp's GPU
layer-placement rules, the automatic fit and its refusal, and the `plan` command."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qwq_local import InsufficientMemoryError, UsageError
from qwq_local.cli import app
from qwq_local.plan.hardware import parse_size
from qwq_local.plan.memory import auto_gpu_layers, layer_of, pad_ctx, plan, read_shape
from qwq_local.plan.measure import measure
from qwq_local.synthetic.factory import make_tiny_checkpoint

GiB = 1024**3
BIG = 1 << 42  # "plenty": keeps fitting out of the way where a test is about arithmetic


@pytest.fixture(scope="module")
def mid_bf16(tmp_path_factory):
    """A mid-size QwQ-shaped model (hidden 1024, 4 layers, FFN 4096, 16/4 heads): big enough
    that llama.cpp's fixed overheads do not dominate the totals."""
    from qwq_local.convert.pipeline import convert

    d = tmp_path_factory.mktemp("mid")
    ckpt = make_tiny_checkpoint(d / "ckpt", hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                                num_key_value_heads=4, intermediate_size=4096)
    return convert(ckpt, d / "mid-bf16.gguf")


@pytest.fixture(scope="module")
def mid_quants(tmp_path_factory, mid_bf16):
    from qwq_local.quantize.quantizer import quantize

    d = tmp_path_factory.mktemp("midq")
    out = {"bf16": mid_bf16}
    for q in ("Q8_0", "Q4_K_M"):
        quantize(mid_bf16, d / f"mid-{q}.gguf", qtype=q)
        out[q] = d / f"mid-{q}.gguf"
    return out


CASES = [
    # (quant, n_ctx, kv_type, flash_attn, n_ubatch)
    ("bf16", 512, "f16", None, 512),
    ("bf16", 2048, "f16", False, 512),
    ("bf16", 300, "f16", None, 512),  # batch clamped to the asked context, then n_ctx -> 512
    ("Q8_0", 4096, "q8_0", None, 512),
    ("Q8_0", 1000, "f16", True, 128),
    ("Q4_K_M", 8192, "f16", None, 512),
    ("Q4_K_M", 2048, "q4_0", True, 256),
    ("Q4_K_M", 8192, "f16", False, 512),
]


@pytest.mark.parametrize("quant,n_ctx,kv_type,flash_attn,n_ubatch", CASES)
def test_plan_matches_llama_cpp_within_3_percent(mid_quants, quant, n_ctx, kv_type, flash_attn, n_ubatch):
    path = mid_quants[quant]
    got = measure(path, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash_attn, n_ubatch=n_ubatch, validate=False)
    p = plan(path, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash_attn, n_ubatch=n_ubatch, vram=0, ram=BIG)
    assert p.n_ctx == got.n_ctx == pad_ctx(n_ctx)
    assert sum(p.kv.values()) == got.kind("KV")  # exact: cells x row sizes
    # Weights as logged (mapped span + repacked copies); 2-decimal MiB log rounding only.
    assert abs(sum(p.weights_logged.values()) - got.kind("model")) <= 0.002 * got.kind("model") + 20_000
    assert abs(sum(p.output.values()) - got.kind("output")) <= 6_000
    # The compute formula is calibrated, not exact (allocator fragmentation): 8% on this shape.
    assert abs(sum(p.compute.values()) - got.kind("compute")) <= 0.08 * got.kind("compute")
    assert abs(p.logged_total_bytes - got.total) <= 0.03 * got.total, (p.to_dict(), got.buffers)


def test_tiny_model_total_within_3_percent(tiny_gguf):
    """Tiny models (hidden 320, 2 layers): the compute buffer is half the total."""
    got = measure(tiny_gguf, n_ctx=1024, validate=False)
    p = plan(tiny_gguf, n_ctx=1024, vram=0, ram=BIG)
    assert abs(p.logged_total_bytes - got.total) <= 0.03 * got.total, (p.to_dict(), got.buffers)


def test_quantized_v_cache_needs_flash_attention(mid_quants):
    from qwq_local.errors import RuntimeLoadError

    with pytest.raises(UsageError, match="flash attention"):
        plan(mid_quants["bf16"], n_ctx=512, kv_type="q8_0", flash_attn=False, vram=0, ram=BIG)
    # ... which is llama.cpp's own rule:
    with pytest.raises(RuntimeLoadError, match="flash_attn"):
        measure(mid_quants["bf16"], n_ctx=512, kv_type="q8_0", flash_attn=False, validate=False)
    # auto turns it on
    assert plan(mid_quants["bf16"], n_ctx=512, kv_type="q8_0", vram=0, ram=BIG).flash_attn is True


def test_quantized_kv_needs_head_sizes_its_blocks_divide(tmp_path):
    import gguf_craft as gc

    from qwq_local.errors import RuntimeLoadError

    path = gc.write_tiny_qwen2(tmp_path / "head16.gguf")  # 64 wide, 4 heads: head size 16
    for kv_type in ("q8_0", "q4_0"):
        with pytest.raises(UsageError, match=f"a {kv_type} KV cache needs head sizes divisible by 32"):
            plan(path, n_ctx=512, kv_type=kv_type, vram=0, ram=BIG)
        with pytest.raises(UsageError, match="divisible by 32"):
            auto_gpu_layers(path, n_ctx=512, kv_type=kv_type, vram=0, ram=BIG)
        # ... which is llama.cpp's own rule:
        with pytest.raises(RuntimeLoadError, match="does not divide n_embd_head_k=16"):
            measure(path, n_ctx=512, kv_type=kv_type, validate=False)
    assert plan(path, n_ctx=512, kv_type="f16", vram=0, ram=BIG).fits


def test_gpu_split_follows_llama_cpp_layer_rules(mid_quants):
    path = mid_quants["Q4_K_M"]
    shape = read_shape(path)
    n_layer = shape.n_layer
    assert n_layer == 4
    by_layer: dict[int, int] = {}
    for name, _t, _s, _o, nbytes, _part in shape.tensors:
        by_layer[layer_of(name, n_layer)] = by_layer.get(layer_of(name, n_layer), 0) + nbytes
    per_layer_kv = plan(path, n_ctx=4096, vram=BIG, ram=BIG).kv["cpu"] // n_layer
    for g in range(0, n_layer + 2):
        p = plan(path, n_ctx=4096, gpu_layers=g, vram=BIG, ram=BIG)
        gpu_blocks = list(range(n_layer - min(g, n_layer), n_layer))  # the LAST g blocks
        want_gpu = sum(by_layer[i] for i in gpu_blocks) + (by_layer[n_layer] if g == n_layer + 1 else 0)
        assert p.weights["gpu"] == want_gpu, g
        assert p.weights["cpu"] + p.weights["gpu"] == shape.file_weights_bytes
        assert p.weights["cpu"] >= by_layer[-1]  # token_embd never leaves the CPU
        assert p.kv["gpu"] == len(gpu_blocks) * per_layer_kv  # KV on its layer's device
        assert p.kv["cpu"] == (n_layer - len(gpu_blocks)) * per_layer_kv
        # Logits are computed where the output layer is.
        vocab_logits = shape.n_vocab * 512 * 4
        if g == n_layer + 1:
            assert p.compute["gpu"] >= vocab_logits and p.compute["cpu"] < vocab_logits
        elif g == 0:
            assert p.compute["gpu"] == 0
    # offload_kqv=False keeps every layer's KV cache in RAM.
    p = plan(path, n_ctx=4096, gpu_layers="all", offload_kqv=False, vram=BIG, ram=BIG)
    assert p.kv["gpu"] == 0 and p.kv["cpu"] == n_layer * per_layer_kv
    # n_layer blocks on the GPU still leave the output layer on the CPU; "all" and -1 move it.
    assert plan(path, gpu_layers=n_layer, vram=BIG, ram=BIG).weights["cpu"] > by_layer[-1]
    for everything in ("all", -1, 99):
        assert plan(path, gpu_layers=everything, vram=BIG, ram=BIG).weights["cpu"] == by_layer[-1]


def test_auto_picks_largest_fitting_layers(mid_quants):
    from qwq_local import constants

    path = mid_quants["Q4_K_M"]
    n_layer = read_shape(path).n_layer
    for want in (1, 3, n_layer + 1):
        need = plan(path, n_ctx=4096, gpu_layers=want, vram=BIG, ram=BIG).total("gpu")
        vram = need + constants.PLAN_VRAM_MARGIN_BYTES + 1
        fit = auto_gpu_layers(path, n_ctx=4096, vram=vram, ram=64 * GiB)
        assert fit.gpu_layers == want and fit.n_ctx == 4096
        assert fit.plan.fits and fit.plan.total("gpu") <= vram - constants.PLAN_VRAM_MARGIN_BYTES
        layers, ctx, reason = fit  # unpacks as a tuple for QwQ.load(gpu_layers="auto")
        assert str(want) in reason
    # No VRAM (or a build without offload): CPU only.
    assert auto_gpu_layers(path, n_ctx=4096, vram=0, ram=64 * GiB).gpu_layers == 0
    # plan(gpu_layers="auto") is the same choice.
    assert plan(path, n_ctx=4096, gpu_layers="auto", vram=0, ram=64 * GiB).gpu_layers == 0


def test_auto_reduces_context_down_to_the_floor(mid_quants):
    from qwq_local import constants

    path = mid_quants["bf16"]
    at_4096 = plan(path, n_ctx=4096, vram=0, ram=BIG).total("cpu")
    at_8192 = plan(path, n_ctx=8192, vram=0, ram=BIG).total("cpu")
    ram = (at_4096 + at_8192) // 2 + constants.PLAN_RAM_MARGIN_BYTES
    fit = auto_gpu_layers(path, n_ctx=16384, vram=0, ram=ram, min_ctx=2048)
    # Not just the halving step (4096) that fits: the largest 256-multiple that does.
    assert fit.gpu_layers == 0 and 4096 < fit.n_ctx < 8192 and fit.n_ctx % 256 == 0
    assert fit.plan.fits
    assert not plan(path, n_ctx=fit.n_ctx + 256, vram=0, ram=ram).fits
    assert "reduced from 16384" in fit.reason
    # The floor: below it, refusal.
    with pytest.raises(InsufficientMemoryError):
        auto_gpu_layers(path, n_ctx=16384, vram=0, ram=at_4096 - 1 + constants.PLAN_RAM_MARGIN_BYTES, min_ctx=4096)


def test_impossible_fit_raises_with_numbers_and_alternatives(mid_quants):
    from qwq_local import constants

    path = mid_quants["bf16"]
    with pytest.raises(InsufficientMemoryError) as err:
        auto_gpu_layers(path, n_ctx=8192, vram=0, ram=constants.PLAN_RAM_MARGIN_BYTES + 1024 * 1024)
    msg = str(err.value)
    assert "does not fit" in msg and "MiB" in msg
    assert "--kv-type q8_0" in msg and "smaller quant" in msg
    assert err.value.exit_code == 8


def test_plan_flags_what_does_not_fit(mid_quants):
    p = plan(mid_quants["bf16"], n_ctx=4096, gpu_layers="all", vram=10 * 1024 * 1024, ram=BIG)
    assert p.fits is False and "GPU needs" in p.reason and "too much" in p.reason
    # GPU layers asked on a machine without a usable GPU: say why, not just "0 B free".
    from qwq_local.plan import hardware

    if hardware.offload_memory_free() == 0:  # this machine (CPU build); a GPU machine has VRAM
        p = plan(mid_quants["bf16"], n_ctx=4096, gpu_layers=2, ram=BIG)
        assert p.fits is False and "no GPU that this llama-cpp-python can offload to" in p.reason


def test_damaged_hyperparameters_are_a_bad_file_not_a_crash(tmp_path):
    import gguf
    import gguf_craft as gc

    from qwq_local.errors import BadModelFileError

    # Before: int("x") raised ValueError (a traceback from `qwq-local plan`), 16.5 planned as 16.
    cases = [("key_length", "x", gguf.GGUFValueType.STRING), ("value_length", 16.5, gguf.GGUFValueType.FLOAT32),
             ("key_length", [16, -2], gguf.GGUFValueType.ARRAY)]
    for i, (name, value, vtype) in enumerate(cases):
        key = f"qwen2.attention.{name}"
        path = gc.write_tiny_qwen2(tmp_path / f"h{i}.gguf", extra={key: (value, vtype)})
        with pytest.raises(BadModelFileError, match=f"{key} is .*not a non-negative integer"):
            read_shape(path)
    # A GGUF without a language model's hyperparameters (here: none at all).
    raw = tmp_path / "raw.gguf"
    raw.write_bytes(gc.valid_raw())
    with pytest.raises(BadModelFileError, match="GGUF has no llama.block_count"):
        plan(raw, vram=0, ram=BIG)


def test_batch_sizes_must_be_positive(mid_quants):
    for kw in ({"n_batch": 0}, {"n_ubatch": 0}, {"n_batch": -1}):
        with pytest.raises(UsageError, match="batch sizes must be at least 1"):
            plan(mid_quants["Q8_0"], vram=0, ram=BIG, **kw)


def test_parse_size():
    assert parse_size("24G") == 24 * GiB
    assert parse_size("8GiB") == 8 * GiB
    assert parse_size("512M") == 512 * 1024**2
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1.5T") == int(1.5 * 1024**4)
    assert parse_size("1000") == 1000
    with pytest.raises(UsageError):
        parse_size("lots")


def test_plan_cli_json_and_table(mid_quants):
    runner = CliRunner()
    path = str(mid_quants["Q4_K_M"])
    res = runner.invoke(app, ["plan", "-m", path, "--ctx", "2048", "--kv-type", "q8_0", "--json",
                              "--ram", "64G", "--vram", "0"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    for key in ("weights_bytes", "kv_bytes", "compute_bytes", "output_bytes", "total_bytes"):
        assert set(d[key]) == {"cpu", "gpu", "total"}
        assert d[key]["total"] == d[key]["cpu"] + d[key]["gpu"]
    assert d["n_ctx"] == 2048 and d["gpu_layers"] == 0 and d["fits"] is True and d["kv_type"] == "q8_0"

    res = runner.invoke(app, ["plan", "-m", path, "--gpu-layers", "auto", "--vram", "8G", "--ram", "64G"])
    assert res.exit_code == 0, res.output
    assert "5 of 5 layers on the GPU" in res.output and "GPU" in res.output and "fits" in res.output

    res = runner.invoke(app, ["plan", "-m", path, "--gpu-layers", "auto", "--vram", "0", "--ram", "1100M"])
    assert res.exit_code == 8 and "error:" in res.output and "does not fit" in res.output

    res = runner.invoke(app, ["plan", "-m", path, "--ctx", "2048", "--dry-run", "--json", "--vram", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["compute_source"] == "llama.cpp dry run"

    res = runner.invoke(app, ["plan", "-m", path, "--kv-type", "q4_0", "--no-flash-attn"])
    assert res.exit_code == 2 and "flash attention" in res.output

    # A fixed placement that does not fit is shown, and the exit code says so.
    res = runner.invoke(app, ["plan", "-m", path, "--vram", "0", "--ram", "10M"])
    assert res.exit_code == 8 and "does NOT fit" in res.output
    res = runner.invoke(app, ["plan", "-m", path, "--vram", "0", "--ram", "10M", "--json"])
    assert res.exit_code == 8 and json.loads(res.output)["fits"] is False


def _write_split_gguf(base, *, n_embd=256, n_layer=2, n_head=4, n_kv=2, n_ff=512, n_vocab=512):
    """A small qwen2 GGUF in 3 parts (base-0000k-of-00003.gguf), as gguf-py splits files."""
    import numpy as np

    from qwq_local.synthetic.factory import write_qwen2_gguf

    rng = np.random.default_rng(0)

    def tensor(name, shape):
        if len(shape) == 1:
            return np.ones(shape, dtype=np.float32)
        return (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float16)

    write_qwen2_gguf(base, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_kv, n_ff=n_ff,
                     n_vocab=n_vocab, tensor=tensor, writer_options={"split_max_tensors": 10})
    return base.with_name(base.stem + "-00001-of-00003.gguf")


def test_split_gguf_counts_every_part(tmp_path):
    first = _write_split_gguf(tmp_path / "m.gguf")
    shape = read_shape(first)
    assert {t[5] for t in shape.tensors} == {0, 1, 2} and len(shape.tensors) == 1 + 2 * 12 + 2
    got = measure(first, n_ctx=1024, validate=False)
    p = plan(first, n_ctx=1024, vram=0, ram=BIG)
    # llama.cpp maps each part separately: one CPU_Mapped buffer per part, summed in the log.
    assert abs(sum(p.weights_logged.values()) - got.kind("model")) <= 3 * 6_000
    assert p.weights["cpu"] == shape.file_weights_bytes
    assert sum(p.kv.values()) == got.kind("KV")
    (tmp_path / "m-00002-of-00003.gguf").unlink()
    from qwq_local import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="00002-of-00003"):
        read_shape(first)


@pytest.mark.parametrize("amx", ["off", None])
def test_repacked_weights_follow_the_extra_buffer_switch(mid_quants, monkeypatch, amx):
    """Whether llama.cpp repacks Q4_K weights (a CPU_REPACK buffer beside the mapped file) is
    backend.extra_bufts_allowed() (QWQ_LOCAL_AMX=off, or the probe); the plan follows it.
    Extra buffer types are never forced on for a quantized model (the AMX crash)."""
    from qwq_local.backend import binding as backend

    if amx is None:
        monkeypatch.delenv("QWQ_LOCAL_AMX", raising=False)
    else:
        monkeypatch.setenv("QWQ_LOCAL_AMX", amx)
    repack = backend.extra_bufts_allowed()
    path = mid_quants["Q4_K_M"]
    got = measure(path, n_ctx=2048, validate=False)
    p = plan(path, n_ctx=2048, vram=0, ram=BIG)
    assert p.repack is repack
    assert ("CPU_REPACK" in got.buffers["model"]) is repack
    assert abs(sum(p.weights_logged.values()) - got.kind("model")) <= 0.002 * got.kind("model") + 20_000
    assert p.weights["cpu"] == read_shape(path).file_weights_bytes  # resident: each tensor once
    assert abs(p.logged_total_bytes - got.total) <= 0.03 * got.total


def test_public_plan_is_callable_whatever_was_imported_first(mid_quants):
    import qwq_local
    import qwq_local.plan  # binds qwq_local.plan to the submodule

    p = qwq_local.plan(mid_quants["bf16"], n_ctx=1024, vram=0, ram=BIG)
    assert p.n_ctx == 1024 and "plan" in qwq_local.__all__


@pytest.mark.parametrize("n_ctx,kv_type,flash_attn,n_ubatch", [(8192, "q8_0", None, 512), (2048, "f16", False, 256)])
def test_dry_run_takes_llama_cpps_own_compute_buffers(mid_quants, n_ctx, kv_type, flash_attn, n_ubatch):
    """A metadata-only llama.cpp load sizes the compute buffers exactly (the formula is within
    8% here); weights, KV and output still come from the arithmetic."""
    path = mid_quants["Q4_K_M"]
    got = measure(path, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash_attn, n_ubatch=n_ubatch, validate=False)
    p = plan(path, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash_attn, n_ubatch=n_ubatch, vram=0, ram=BIG,
             dry_run=True)
    assert p.compute_source == "llama.cpp dry run" and p.to_dict()["compute_source"] == p.compute_source
    assert p.compute["gpu"] == 0
    assert abs(p.compute["cpu"] - got.kind("compute")) <= 6_000  # the log's 2-decimal MiB
    assert sum(p.kv.values()) == got.kind("KV")
    assert abs(p.logged_total_bytes - got.total) <= 0.002 * got.total


def test_runtime_refuses_a_model_bigger_than_this_machine_before_loading(tmp_path):
    """QwQ.load(gpu_layers="auto") consults the plan on every build (CPU-only too) and refuses
    a model that cannot fit, with numbers and alternatives, instead of being OOM-killed. The
    model is QwQ-32B-shaped and sparse (no disk used), with more layers than RAM can hold."""
    import math

    import psutil
    from gguf_craft import sparse_files_work, write_sparse_gguf
    from typer.testing import CliRunner

    from qwq_local.cli import app
    from qwq_local.errors import InsufficientMemoryError
    from qwq_local.quantize.predict import qwen2_shape
    from qwq_local.runtime.model import QwQ

    assert sparse_files_work(tmp_path), "this test needs a filesystem with sparse files"
    per_layer = 2 * (2 * 5120 * 5120 + 2 * 5120 * 1024 + 3 * 5120 * 27648)  # bf16 bytes
    n_layer = math.ceil(2 * psutil.virtual_memory().total / per_layer)
    shape = qwen2_shape(n_layer=n_layer, hidden=5120, ffn=27648, vocab=152064, n_head=40, n_head_kv=8)
    big = write_sparse_gguf(tmp_path / "qwq-32b-shaped.gguf", shape)
    with pytest.raises(InsufficientMemoryError) as err:
        QwQ.load(big, n_ctx=8192, gpu_layers="auto")
    message = str(err.value)
    assert "smaller quant" in message or "IQ2_XXS" in message
    result = CliRunner().invoke(app, ["run", "-m", str(big), "hi"])
    assert result.exit_code == InsufficientMemoryError.exit_code
    assert result.output.count("\n") <= 2 and "Traceback" not in result.output


def test_kv_type_names_are_case_insensitive(tiny_gguf):
    """Q8_0 or q8_0, as quant type names are: the CLI and the library agree."""
    upper = plan(tiny_gguf, n_ctx=1024, kv_type="Q8_0").to_dict()
    assert upper["kv_bytes"] == plan(tiny_gguf, n_ctx=1024, kv_type="q8_0").to_dict()["kv_bytes"]
    result = CliRunner().invoke(app, ["plan", "-m", str(tiny_gguf), "--ctx", "1024", "--kv-type", "Q8_0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["kv_bytes"] == upper["kv_bytes"]


def test_slots_share_the_kv_of_n_ctx_and_widen_the_output_buffer(tiny_gguf):
    one = plan(tiny_gguf, n_ctx=1024, n_seq=1, ram=1 << 40, vram=0)
    four = plan(tiny_gguf, n_ctx=1024, n_seq=4, ram=1 << 40, vram=0)
    assert four.kv == one.kv  # 4 streams of 256 cells = the cells of one context of 1024
    assert four.output["cpu"] == 4 * one.output["cpu"]
    assert auto_gpu_layers(tiny_gguf, n_ctx=1024, n_seq=4, ram=1 << 40, vram=0).plan.output == four.output
