"""A chart of quality loss (mean KL divergence) against file size for `qwq-local eval --plot`.

SVG is written directly (no dependency); PNG needs matplotlib, which qwq-local does not
require: without it, a PNG request fails with a message naming both ways out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

from ..errors import UsageError

_W, _H, _M = 640, 400, 60  # canvas and margin, px


def check_plot_target(path: Path | str) -> None:
    """Fail before an evaluation runs if its chart could not be written afterwards."""
    from ..fileutil import check_output_dir

    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError(f"writing {Path(path).name} needs matplotlib (pip install 'qwq-local[plot]', or matplotlib); "
                             "or ask for an SVG chart: --plot chart.svg")
    elif suffix != ".svg":
        raise UsageError(f"--plot {Path(path).name}: use a .svg (built in) or .png (needs matplotlib) file name")
    check_output_dir(Path(path))


def write_plot(results: Sequence, path: Path | str) -> Path:
    """Write mean KLD (log scale) against file size for `results` (EvalResult) to path."""
    path = Path(path)
    try:
        return _write_plot(results, path)
    except OSError as exc:
        raise UsageError(f"cannot write the chart {path}: {exc.strerror or exc}; choose another --plot path") from None


def _write_plot(results: Sequence, path: Path) -> Path:
    from ..fileutil import atomic_output

    suffix = path.suffix.lower()
    if suffix == ".svg":
        with atomic_output(path) as tmp:
            tmp.write_text(svg_chart(results), encoding="utf-8")
        return path
    if suffix == ".png":
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise UsageError(f"writing {path.name} needs matplotlib (pip install 'qwq-local[plot]', or matplotlib); "
                             "or ask for an SVG chart: --plot chart.svg") from None
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for r in results:
            ax.scatter(r.file_bytes / 2**30, max(r.mean_kld, 1e-9))
            ax.annotate(r.model.stem, (r.file_bytes / 2**30, max(r.mean_kld, 1e-9)), fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("file size (GiB)")
        ax.set_ylabel("mean KL divergence vs reference")
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return path
    raise UsageError(f"--plot {path.name}: use a .svg (built in) or .png (needs matplotlib) file name")


def svg_chart(results: Sequence) -> str:
    xs = [r.file_bytes / 2**30 for r in results]
    ys = [math.log10(max(r.mean_kld, 1e-9)) for r in results]
    x0, x1 = min(xs), max(xs)
    y0, y1 = math.floor(min(ys)), math.ceil(max(ys))
    if x1 - x0 < 1e-12:
        x0, x1 = x0 * 0.9, x1 * 1.1 + 1e-9
    if y1 == y0:
        y1 = y0 + 1

    def px(x: float) -> float:
        return _M + (x - x0) / (x1 - x0) * (_W - 2 * _M)

    def py(y: float) -> float:
        return _H - _M - (y - y0) / (y1 - y0) * (_H - 2 * _M)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{_W}" height="{_H}" fill="white"/>',
           f'<line x1="{_M}" y1="{_H - _M}" x2="{_W - _M}" y2="{_H - _M}" stroke="black"/>',
           f'<line x1="{_M}" y1="{_M}" x2="{_M}" y2="{_H - _M}" stroke="black"/>',
           f'<text x="{_W / 2}" y="{_H - 15}" text-anchor="middle">file size (GiB)</text>',
           f'<text x="15" y="{_H / 2}" text-anchor="middle" transform="rotate(-90 15 {_H / 2})">'
           'mean KL divergence vs reference (log)</text>']
    for e in range(y0, y1 + 1):
        out.append(f'<text x="{_M - 6}" y="{py(e) + 4:.1f}" text-anchor="end">1e{e}</text>')
        out.append(f'<line x1="{_M}" y1="{py(e):.1f}" x2="{_W - _M}" y2="{py(e):.1f}" stroke="#ddd"/>')
    for i in range(5):
        x = x0 + (x1 - x0) * i / 4
        out.append(f'<text x="{px(x):.1f}" y="{_H - _M + 16}" text-anchor="middle">{x:.3g}</text>')
    for r, x, y in zip(results, xs, ys):
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="#1f77b4"/>')
        out.append(f'<text x="{px(x) + 6:.1f}" y="{py(y) - 6:.1f}">{escape(r.model.stem)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
