"""Getting models: official GGUFs pulled from the Hugging Face Hub into its standard cache
(resumable, sha256-verified, offline-first), cached files listed, and model names such as
`qwq:q4_k_m` resolved to paths without touching the network.
"""

from __future__ import annotations

from .download import pull, resolve_model, list_models, LocalModel
from .cache import hub_cache_dir, offline_mode, split_parts

__all__ = ["pull", "resolve_model", "list_models", "LocalModel", "hub_cache_dir", "offline_mode", "split_parts"]
