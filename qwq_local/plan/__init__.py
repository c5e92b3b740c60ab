"""Memory before loading: bytes per device (GPU, RAM) from the GGUF's tensor sizes and the
settings by llama.cpp's own rules, `auto` GPU layers and context fitting, hardware facts
(RAM, GPUs, the build's backends, AMX), and measurement against llama.cpp's logged buffers.
"""

from __future__ import annotations

from .memory import plan, MemoryPlan, auto_gpu_layers, AutoFit
from .hardware import report

__all__ = ["plan", "MemoryPlan", "auto_gpu_layers", "AutoFit", "report"]
