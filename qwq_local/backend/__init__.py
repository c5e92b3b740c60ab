"""The llama.cpp binding: the one place that loads the library and drives its ctypes API (model
and context wrappers, log capture, the extra-buffer-type/AMX probe). It loads files as they are;
callers validate untrusted GGUFs first with `qwq_local.gguf.ensure_loadable`.
"""

from __future__ import annotations

from .binding import Model, Context, llama, capture_log, log_tail, system_info, llama_cpp_version, default_threads, extra_bufts_allowed, probe_record, probe_extra_bufts, loaded_libraries, build_key
from .probe import cpu_advertises_amx, cpu_flags

__all__ = ["Model", "Context", "llama", "capture_log", "log_tail", "system_info", "llama_cpp_version", "default_threads", "extra_bufts_allowed", "probe_record", "probe_extra_bufts", "loaded_libraries", "build_key", "cpu_advertises_amx", "cpu_flags"]
