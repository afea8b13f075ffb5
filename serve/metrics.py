"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: from a few ms (tiny model, follow-up) to minutes (7B cold on an edge device)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loc3r_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r)
        self.queue_wait = Histogram("loc3r_queue_wait_seconds", "Time a question waited in the queue", buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "loc3r_time_to_first_token_seconds", "From a question's arrival to its first token (queue wait included)",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.duration = Histogram("loc3r_request_seconds", "From a question's arrival to its last token", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("loc3r_queue_depth", "Questions waiting for the model", registry=r)
        self.rejected = Counter("loc3r_rejected", "Questions refused because the queue was full (429)", registry=r)
        self.cancelled = Counter("loc3r_cancelled", "Questions whose client went away before the answer was complete", registry=r)
        self.tokens = Counter("loc3r_generated_tokens", "Answer tokens generated (those of cancelled answers included)", registry=r)
        self.sessions = Gauge("loc3r_sessions", "Videos kept encoded for follow-up questions", registry=r)
        self.session_bytes = Gauge("loc3r_session_bytes", "Bytes held by the kept videos' encoded frames", registry=r)
        self.evictions = Counter("loc3r_session_evictions", "Kept videos dropped to stay within --session-memory", registry=r)
        self.scene_sources = Counter("loc3r_scene_reclaims", "Kept videos made resident again, by where their prefix came from "
                                     "(memory: resident KV; store: the scene store; prefill: recomputed)", ["source"], registry=r)
        self.scene_memory_bytes = Gauge("loc3r_scene_memory_bytes", "Bytes of scenes' KV held resident in host memory", registry=r)
        self.scene_memory_budget = Gauge("loc3r_scene_memory_budget_bytes", "Budget for scenes' KV held in memory (--scene-memory-mb)", registry=r)
        self.scenes_resident = Gauge("loc3r_scenes_resident", "Scenes whose KV is held in memory", registry=r)
        self.reclaims = Counter("loc3r_session_reclaims", "Kept videos whose prefix was prefilled again into the LLM cache", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
