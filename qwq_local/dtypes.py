"""bfloat16 <-> float32 bit conversions, shared by the converter (bf16 checkpoints to f16/f32/q8_0
GGUFs) and the synthetic checkpoint factory (which writes bf16 shards as QwQ's release does).

They sit at the bottom of the package because both users do: numpy has no bfloat16 dtype.
"""

from __future__ import annotations


def f32_to_bf16_bits(values):
    """Round-to-nearest-even float32 -> bfloat16, as uint16 bit patterns."""
    import numpy as np

    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # quiet NaNs first (as gguf-py does) so the rounding add cannot carry into the sign
    u = np.where((u & 0x7FFFFFFF) > 0x7F800000, (u & 0xFFFF0000) | 0x00400000, u).astype(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def bf16_bits_to_f32(bits):
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    import numpy as np

    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)
