"""Prometheus metrics of one server (its own registry, so several apps in one process, as in
the tests, do not collide): requests, tokens, tokens/s, queue depth, slots busy, KV cells used."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["Metrics"]


class Metrics:
    def __init__(self, *, queue_depth: Callable[[], int], slots_busy: Callable[[], int],
                 kv_cells: Callable[[], int]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwq_local_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("qwq_local_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.prompt_tokens_cached = Counter("qwq_local_prompt_tokens_cached",
                                            "Prompt tokens reused from a slot's KV cache", registry=r)
        self.completion_tokens = Counter("qwq_local_completion_tokens", "Generated tokens (thought included)",
                                         registry=r)
        self.draft_tokens = Counter("qwq_local_draft_tokens", "Tokens proposed by speculative decoding's drafter",
                                    registry=r)
        self.draft_accepted_tokens = Counter("qwq_local_draft_accepted_tokens",
                                             "Proposed tokens that verification kept", registry=r)
        self.tokens_per_second = Gauge("qwq_local_generation_tokens_per_second",
                                       "Generation speed of the last finished request (tokens/s)", registry=r)
        # Continuous batching (--parallel > 1): sequences / calls is the mean batch width.
        self.decode_calls = Counter("qwq_local_decode_calls", "llama_decode calls of the shared context",
                                    registry=r)
        self.decode_sequences = Counter("qwq_local_decode_sequences",
                                        "Sequences carried by those calls, summed (width x calls)", registry=r)
        self.decode_tokens = Counter("qwq_local_decode_tokens", "Tokens carried by those calls", registry=r)
        Gauge("qwq_local_queue_depth", "Requests waiting for a slot", registry=r).set_function(queue_depth)
        Gauge("qwq_local_slots_busy", "Slots generating now", registry=r).set_function(slots_busy)
        Gauge("qwq_local_kv_cells_used", "KV cache cells holding tokens, all slots", registry=r).set_function(kv_cells)

    def on_reply(self, reply: Any) -> None:
        usage = reply.usage
        self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
        self.prompt_tokens_cached.inc(usage.get("cached_tokens", 0))
        self.completion_tokens.inc(usage.get("completion_tokens", 0))
        self.draft_tokens.inc(usage.get("draft_tokens", 0))
        self.draft_accepted_tokens.inc(usage.get("draft_accepted_tokens", 0))
        if reply.timings.get("gen_tps"):
            self.tokens_per_second.set(reply.timings["gen_tps"])

    def on_decode(self, n_tokens: int, seqs: tuple[int, ...]) -> None:
        """backend.batched.SharedContext's hook, called after every llama_decode."""
        self.decode_calls.inc()
        self.decode_sequences.inc(len(seqs))
        self.decode_tokens.inc(n_tokens)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
