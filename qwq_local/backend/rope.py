"""The rope scaling a QwQ context gets: the model card's static-YaRN rule as llama.cpp's
context parameters (pure Python; plan, runtime and the CLI show and apply the same dict).

The card (Qwen/QwQ-32B README, "Usage Guidelines"): full context 131,072 tokens; for prompts
over 8,192 tokens enable static YaRN, factor 4.0, original_max_position_embeddings 32,768. In
llama.cpp terms: rope scaling yarn, freq scale 0.25 (= 1/factor), yarn orig ctx 32768
(llama_context_params.rope_scaling_type / rope_freq_scale / yarn_orig_ctx). Static YaRN uses
the same factor at every length and costs a little quality on short texts, which is why the
card adds it only when long contexts are needed.
"""

from __future__ import annotations

from .. import constants
from ..errors import UsageError


def rope_params(n_ctx: int, rope_scaling: str = constants.DEFAULT_ROPE_SCALING) -> dict:
    """The rope scaling for a context of n_ctx tokens.

    rope_scaling: "auto" (the card's rule: none at n_ctx <= 8192, static YaRN above), "none"
    (plain RoPE, whatever the GGUF's metadata asks) or "yarn" (static YaRN at any n_ctx).
    Returns {"choice": the rope_scaling asked, "scaling": "none"|"yarn", "factor": 1.0 or 4.0,
    "freq_scale": 1/factor, "orig_ctx": 32768 for yarn, None for none}.
    Raises UsageError for n_ctx outside 1..131072 or an unknown choice.
    """
    n_ctx = int(n_ctx)
    if n_ctx <= 0 or n_ctx > constants.MAX_CONTEXT:
        raise UsageError(f"n_ctx must be between 1 and {constants.MAX_CONTEXT}, not {n_ctx}")
    choice = str(rope_scaling).strip().lower()
    if choice not in constants.ROPE_SCALING_CHOICES:
        raise UsageError(f"rope_scaling must be one of {', '.join(constants.ROPE_SCALING_CHOICES)}, "
                         f"not {rope_scaling!r}")
    yarn = choice == "yarn" or (choice == "auto" and n_ctx > constants.YARN_MIN_CTX)
    if not yarn:
        return {"choice": choice, "scaling": "none", "factor": 1.0, "freq_scale": 1.0, "orig_ctx": None}
    factor = constants.YARN_FACTOR
    return {"choice": choice, "scaling": "yarn", "factor": factor, "freq_scale": 1.0 / factor,
            "orig_ctx": constants.YARN_ORIG_CTX}


def describe_rope(rope: dict) -> str:
    """One line for tables: "none" or "YaRN x4 (orig ctx 32768)", with the choice when forced."""
    text = "none" if rope["scaling"] == "none" else f"YaRN x{rope['factor']:g} (orig ctx {rope['orig_ctx']})"
    return text + ("" if rope.get("choice", "auto") == "auto" else f" [--rope-scaling {rope['choice']}]")


def rope_rule() -> str:
    """The automatic rule in words (for `doctor` and `info`)."""
    return (f"none at n_ctx <= {constants.YARN_MIN_CTX}, static YaRN x{constants.YARN_FACTOR:g} "
            f"(orig ctx {constants.YARN_ORIG_CTX}) above (model card; --rope-scaling none|yarn overrides)")
