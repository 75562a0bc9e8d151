"""The app's Prometheus metrics (through Ray's metrics export), labelled by route, variant and adapter version.

Serve's own metrics (per-deployment request counts, queue lengths, replica health) come on top; cluster/ has a
Grafana dashboard over both.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Histogram

LABELS = ("route", "variant", "adapter")
LATENCY_MS = [25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]


class RouterMetrics:
    def __init__(self):
        self.requests = Counter("tandem_requests", "chat completions answered", LABELS + ("status",))
        self.latency = Histogram("tandem_latency_ms", "chat completion latency", LATENCY_MS, LABELS)
        self.tokens = Counter("tandem_tokens", "prompt and completion tokens", LABELS + ("kind",))
        self.format_valid = Counter("tandem_format_valid", "answers in the trained output format", LABELS + ("valid",))
        self.retrieved = Histogram("tandem_retrieved_chunks", "chunks retrieved per RAG request", [1, 2, 3, 5, 10, 20],
                                   ("route",))
        self.feedback = Counter("tandem_feedback", "feedback received", ("rating",))

    def observe(self, record: dict) -> None:
        tags = {"route": record["route"], "variant": record["variant"], "adapter": record["adapter"] or "base"}
        self.requests.inc(1, {**tags, "status": record["status"]})
        self.latency.observe(record["latency_ms"], tags)
        for kind in ("prompt", "completion"):
            if record.get(f"{kind}_tokens"):
                self.tokens.inc(record[f"{kind}_tokens"], {**tags, "kind": kind})
        if record.get("format_valid") is not None:
            self.format_valid.inc(1, {**tags, "valid": str(record["format_valid"]).lower()})
        if record.get("rag"):
            self.retrieved.observe(len(record["retrieved"]), {"route": record["route"]})


class AdapterMetrics:
    def __init__(self):
        self.loads = Counter("tandem_adapter_loads", "LoRA adapters loaded into a replica", ("adapter",))
        self.evictions = Counter("tandem_adapter_evictions", "LoRA adapters evicted and deleted", ("adapter",))
