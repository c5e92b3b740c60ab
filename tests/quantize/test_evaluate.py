"""Quality metrics (KL divergence, top-1 agreement, perplexity) on tiny models, and `qwq-local eval`."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qwq_local.cli import app
from qwq_local.errors import UsageError
from qwq_local.quantize.evaluate import DEFAULT_TEXT, _log_softmax, evaluate
from qwq_local.quantize.quantizer import quantize

runner = CliRunner()
CTX = 128


@pytest.fixture(scope="module")
def q8(tiny_gguf, tmp_path_factory) -> Path:
    return quantize(tiny_gguf, tmp_path_factory.mktemp("eval") / "tiny-Q8_0.gguf", qtype="Q8_0").output


def test_default_text_ships_with_the_package():
    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    assert len(text) > 5000
    assert "def " in text and "=" in text  # prose, code and math


def test_log_softmax_matches_definition():
    x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32) * 10
    expected = x - np.log(np.exp(x.astype(np.float64)).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(_log_softmax(x), expected, atol=1e-5)


def test_model_against_itself_is_perfect(tiny_gguf):
    (r,) = evaluate([tiny_gguf], reference=tiny_gguf, n_ctx=CTX, chunks=3)
    assert abs(r.mean_kld) < 1e-6 and abs(r.p99_kld) < 1e-6 and abs(r.max_kld) < 1e-6
    assert r.top1_agreement == 1.0
    assert r.ppl_ref == r.ppl_model and r.ppl_ref > 1
    assert r.n_chunks == 3 and r.n_scored == 3 * (CTX // 2 - 1)
    assert r.file_bytes == tiny_gguf.stat().st_size


def test_q8_0_is_much_closer_than_q4_k_m(tiny_gguf, tiny_gguf_q4km, q8):
    steps = []
    r8, r4 = evaluate([q8, tiny_gguf_q4km], reference=tiny_gguf, n_ctx=CTX, chunks=3,
                      progress=lambda done, total: steps.append((done, total)))
    assert steps[-1] == (9, 9)  # 3 windows x (reference + 2 models)
    assert 0 < r8.mean_kld < r4.mean_kld / 5
    assert r8.p99_kld < r4.p99_kld
    assert r8.top1_agreement > r4.top1_agreement
    assert abs(math.log(r8.ppl_model / r8.ppl_ref)) < abs(math.log(r4.ppl_model / r4.ppl_ref)) + 1e-3
    assert r8.ppl_ref == r4.ppl_ref  # the same reference pass serves every model
    assert r4.p99_kld >= r4.median_kld > 0


def test_text_and_window_checks(tiny_gguf, tmp_path):
    with pytest.raises(UsageError, match="fewer than one window"):
        evaluate([tiny_gguf], reference=tiny_gguf, text="too short", n_ctx=CTX)
    with pytest.raises(UsageError, match="even number"):
        evaluate([tiny_gguf], reference=tiny_gguf, n_ctx=127)
    from qwq_local.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="missing.gguf"):
        evaluate([tmp_path / "missing.gguf"], reference=tiny_gguf, n_ctx=CTX)
    with pytest.raises(UsageError, match="no text file"):
        evaluate([tiny_gguf], reference=tiny_gguf, text=tmp_path / "missing.txt")
    own = tmp_path / "own.txt"
    own.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    (r,) = evaluate(tiny_gguf, reference=tiny_gguf, text=own, n_ctx=64)
    assert r.n_chunks >= 1 and r.top1_agreement == 1.0


def test_cli_eval_json_and_svg_plot(tiny_gguf, q8, tmp_path):
    svg = tmp_path / "chart.svg"
    r = runner.invoke(app, ["eval", "--model", str(q8), "--model", str(tiny_gguf), "--reference", str(tiny_gguf),
                            "--ctx", str(CTX), "--chunks", "2", "--json", "--plot", str(svg)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [Path(d["model"]).name for d in data] == [q8.name, tiny_gguf.name]
    assert data[0]["mean_kld"] > 0 and abs(data[1]["mean_kld"]) < 1e-6
    assert {"p99_kld", "top1_agreement", "ppl_ref", "ppl_model", "file_bytes"} <= set(data[0])
    text = svg.read_text()
    assert text.startswith("<svg") and q8.stem in text and text.count("<circle") == 2


def test_cli_eval_table_and_png(tiny_gguf, q8, tmp_path):
    png = tmp_path / "chart.png"
    r = runner.invoke(app, ["eval", "-m", str(q8), "-r", str(tiny_gguf), "--ctx", str(CTX), "--chunks", "1",
                            "--plot", str(png)])
    if importlib.util.find_spec("matplotlib") is None:
        assert r.exit_code == UsageError.exit_code and "matplotlib" in r.output and ".svg" in r.output
        assert not png.exists()
    else:
        assert r.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    r = runner.invoke(app, ["eval", "-m", str(q8), "-r", str(tiny_gguf), "--ctx", str(CTX), "--chunks", "1"])
    assert r.exit_code == 0, r.output
    assert "mean KLD" in r.output and q8.name in r.output and "top-1" in r.output


def test_memory_stays_bounded(tiny_gguf, q8):
    """Many windows: the reference's log-probabilities for all of them would take
    n_windows x ctx/2 x n_vocab floats; what Python allocates at once must stay far below."""
    import tracemalloc

    from qwq_local.backend import binding as backend

    with backend.Model.load(tiny_gguf) as m:
        n_vocab = m.n_vocab
    ctx = 32
    tracemalloc.start()
    try:
        (r,) = evaluate([q8], reference=tiny_gguf, n_ctx=ctx)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    all_logprobs = r.n_chunks * (ctx // 2 - 1) * n_vocab * 4
    assert r.n_chunks >= 100
    assert peak < all_logprobs / 4, (peak, all_logprobs)


def test_unwritable_plot_path_is_a_one_line_error(tiny_gguf, q8, tmp_path):
    from qwq_local.quantize.evaluate import EvalResult
    from qwq_local.quantize.plot import write_plot

    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    # refused before the (long) evaluation runs
    r = runner.invoke(app, ["eval", "-m", str(q8), "-r", str(tiny_gguf), "--ctx", str(CTX), "--plot",
                            str(blocker / "chart.svg")])
    assert r.exit_code == UsageError.exit_code and not isinstance(r.exception, OSError)
    assert r.output.startswith("error: cannot write") and "mean KLD" not in r.output
    (tmp_path / "dir.svg").mkdir()
    r = runner.invoke(app, ["eval", "-m", str(q8), "-r", str(tiny_gguf), "--ctx", str(CTX), "--plot",
                            str(tmp_path / "dir.svg")])
    assert r.exit_code == UsageError.exit_code and "is a directory" in r.output and "mean KLD" not in r.output
    # a failure at write time (the directory went away meanwhile) is an error too, not a traceback
    result = EvalResult(model=q8, file_bytes=1, n_chunks=1, n_scored=1, mean_kld=0.1, median_kld=0.1, p99_kld=0.1,
                        max_kld=0.1, top1_agreement=1.0, ppl_ref=1.0, ppl_model=1.0)
    with pytest.raises(UsageError, match="cannot write the chart"):
        write_plot([result], blocker / "chart.svg")
