"""Running the model: `QwQ` loads a GGUF fitted to memory and chats with QwQ's template,
sampler chain and thinking budget; the decode loop drives llama.cpp token by token with the
thought and answer split as they stream.
"""

from __future__ import annotations

from .model import QwQ
from .decode import Reply, Event, Cancel, Sampling

__all__ = ["QwQ", "Reply", "Event", "Cancel", "Sampling"]
