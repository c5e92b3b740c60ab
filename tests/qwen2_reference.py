"""An independent numpy Qwen2 forward pass (float64), the yardstick for converted GGUFs.

Written from the Qwen2 architecture as transformers defines it, not from llama.cpp: RMSNorm,
rotary embeddings in the "neox" (rotate-half) layout, grouped-query attention with q/k/v biases
and a causal mask, SwiGLU MLP, untied or tied output head.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """x: (seq, heads, head_dim). Rotate-half RoPE: pairs (i, i + d/2) share frequency i."""
    d = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (seq, d/2)
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[:, None, :]
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * cos + rotated * sin


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def forward(weights: dict[str, np.ndarray], config: dict, tokens: list[int]) -> np.ndarray:
    """Logits (seq, vocab) for every position of `tokens`."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    hidden = config["hidden_size"]
    n_head = config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // n_head
    eps = config["rms_norm_eps"]
    theta = config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0)
    seq = len(tokens)
    pos = np.arange(seq)
    mask = np.triu(np.full((seq, seq), -np.inf), k=1)

    x = w["model.embed_tokens.weight"][np.asarray(tokens)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]
        k = h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]
        v = h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]
        q = rope(q.reshape(seq, n_head, head_dim), pos, theta)
        k = rope(k.reshape(seq, n_kv, head_dim), pos, theta)
        v = v.reshape(seq, n_kv, head_dim)
        group = n_head // n_kv
        out = np.empty((seq, n_head, head_dim))
        for hd in range(n_head):
            kv = hd // group
            scores = q[:, hd, :] @ k[:, kv, :].T / np.sqrt(head_dim) + mask
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            out[:, hd, :] = probs @ v[:, kv, :]
        x = x + out.reshape(seq, n_head * head_dim) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def load_config(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "config.json").read_text())
