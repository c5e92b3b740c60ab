"""The offline demo: the whole pipeline a real QwQ-32B goes through, on a tiny random model.

tiny checkpoint -> bf16 GGUF -> Q4_K_M GGUF -> one chat turn. Each stage is reported through a
callback so the CLI can print it as it happens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import constants

DEMO_QUESTION = "How many r's are in the word strawberry?"


@dataclass
class Stage:
    name: str
    seconds: float
    detail: str


@dataclass
class DemoResult:
    workdir: Path
    stages: list[Stage] = field(default_factory=list)
    reply: object = None  # runtime.Reply


def default_workdir() -> Path:
    return constants.cache_dir() / "demo"


def run_demo(*, workdir: Path | None = None, max_tokens: int = 64, thinking_budget: int = 32,
             seed: int = 0, on_stage: Callable[[Stage], None] | None = None) -> DemoResult:
    from ..convert.pipeline import convert
    from ..fileutil import human_bytes
    from ..quantize.quantizer import quantize
    from ..runtime.model import QwQ
    from ..synthetic.factory import make_tiny_checkpoint

    workdir = Path(workdir) if workdir else default_workdir()
    result = DemoResult(workdir=workdir)

    def stage(name: str, start: float, detail: str) -> None:
        s = Stage(name, time.perf_counter() - start, detail)
        result.stages.append(s)
        if on_stage:
            on_stage(s)

    t = time.perf_counter()
    ckpt = make_tiny_checkpoint(workdir / "tiny-qwq-checkpoint")
    shards = sorted(ckpt.glob("*.safetensors"))
    stage("checkpoint", t, f"{ckpt} ({len(shards)} safetensors shards, "
          f"{human_bytes(sum(p.stat().st_size for p in shards))})")

    t = time.perf_counter()
    bf16 = convert(ckpt, workdir / "tiny-qwq-bf16.gguf")
    stage("convert", t, f"{bf16} ({human_bytes(bf16.stat().st_size)})")

    t = time.perf_counter()
    q4 = workdir / "tiny-qwq-Q4_K_M.gguf"
    quantize(bf16, q4, qtype="Q4_K_M")
    stage("quantize", t, f"{q4} ({human_bytes(q4.stat().st_size)})")

    t = time.perf_counter()
    model = QwQ.load(q4, n_ctx=1024, gpu_layers=0, seed=seed)
    stage("load", t, f"{q4.name}, context 1024")

    t = time.perf_counter()
    reply = model.chat([{"role": "user", "content": DEMO_QUESTION}], max_tokens=max_tokens,
                       thinking_budget=thinking_budget, seed=seed)
    result.reply = reply
    stage("chat", t, f"{reply.usage['completion_tokens']} tokens, finish_reason={reply.finish_reason}")
    model.close()
    return result
