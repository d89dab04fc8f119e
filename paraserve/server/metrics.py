"""Prometheus metrics, in a registry of the server's own (no global state)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from paraserve.engine.async_engine import AsyncLLM, StepRecord

EXPERT_REFRESH_S = 1.0  # per-expert counters are read from the workers at most this often

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)


class Metrics:
    def __init__(self, engine: AsyncLLM, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        self.engine = engine
        labels = ["model_name"]
        self.running = Gauge("paraserve:num_requests_running", "Requests in the running batch", labels, registry=r)
        self.waiting = Gauge("paraserve:num_requests_waiting", "Requests waiting to run", labels, registry=r)
        self.kv_usage = Gauge("paraserve:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1)", labels, registry=r)
        self.prefix_hit = Gauge("paraserve:prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / looked up", labels, registry=r)
        self.prompt_tokens = Counter("paraserve:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.gen_tokens = Counter("paraserve:generation_tokens", "Tokens generated", labels, registry=r)
        self.preemptions = Counter("paraserve:num_preemptions", "Requests preempted (recomputed later)", labels, registry=r)
        self.success = Counter("paraserve:request_success", "Finished requests", labels + ["finished_reason"], registry=r)
        self.ttft = Histogram("paraserve:time_to_first_token_seconds", "Time to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("paraserve:time_per_output_token_seconds", "Time per output token after the first",
                              labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("paraserve:e2e_request_latency_seconds", "End-to-end request latency", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.step_tokens = Histogram("paraserve:step_scheduled_tokens", "Tokens computed per engine step", labels,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=r)
        self.step_running = Histogram("paraserve:step_running_requests", "Running requests per engine step",
                                      labels, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.spec_drafts = Counter("paraserve:spec_decode_num_drafts", "Speculative verifications (draft trees verified)",
                                   labels, registry=r)
        self.spec_draft_tokens = Counter("paraserve:spec_decode_num_draft_tokens", "Draft tokens verified",
                                         labels, registry=r)
        self.spec_accepted_tokens = Counter("paraserve:spec_decode_num_accepted_tokens",
                                            "Draft tokens accepted (bonus tokens not included)", labels, registry=r)
        self.spec_acceptance = Gauge("paraserve:spec_decode_acceptance_rate",
                                     "Accepted / verified draft tokens, since start", labels, registry=r)
        self.spec_accepted_len = Gauge("paraserve:spec_decode_mean_accepted_length",
                                       "Tokens emitted per verification (accepted drafts + bonus), since start",
                                       labels, registry=r)
        cfg = engine.engine.hf_config
        self.moe = bool(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None))
        if self.moe:
            self.expert_tokens = Counter("paraserve:expert_tokens", "Tokens routed to each expert, per MoE layer",
                                         labels + ["layer", "expert"], registry=r)
            self.expert_imbalance = Gauge("paraserve:expert_load_imbalance",
                                          "Max / mean tokens per expert since start, per MoE layer (1 = balanced)",
                                          labels + ["layer"], registry=r)
        self._expert_seen: dict[int, list[int]] = {}
        self._expert_at = 0.0
        self.name = model_name
        engine.step_listeners.append(self._on_step)

    def _on_step(self, rec: StepRecord, outputs) -> None:
        n = self.name
        self.running.labels(n).set(rec.num_running)
        self.waiting.labels(n).set(rec.num_waiting)
        self.kv_usage.labels(n).set(rec.kv_usage)
        self.prefix_hit.labels(n).set(self.engine.engine.scheduler.kv.prefix_hit_rate())
        if rec.num_preemptions:
            self.preemptions.labels(n).inc(rec.num_preemptions)
        if rec.num_scheduled_tokens:
            self.step_tokens.labels(n).observe(rec.num_scheduled_tokens)
            self.step_running.labels(n).observe(rec.num_running)
        if rec.num_drafts:
            self.spec_drafts.labels(n).inc(rec.num_drafts)
            self.spec_draft_tokens.labels(n).inc(rec.num_draft_tokens)
            self.spec_accepted_tokens.labels(n).inc(rec.num_accepted_tokens)
            total = self.engine.engine.scheduler.spec_stats
            self.spec_acceptance.labels(n).set(total.acceptance_rate)
            self.spec_accepted_len.labels(n).set(total.mean_accepted_length)
        # read at most once a second, and whenever a request finishes (so an idle server's
        # counters include every finished request)
        if self.moe and (time.monotonic() - self._expert_at >= EXPERT_REFRESH_S
                         or any(o.finished for o in outputs)):
            self._update_experts()

    def _update_experts(self) -> None:
        """On the engine thread (a step listener): the workers' counters are read between steps."""
        self._expert_at = time.monotonic()
        for layer, counts in self.engine.engine.expert_load().items():
            seen = self._expert_seen.get(layer, [0] * len(counts))
            for e, (now, before) in enumerate(zip(counts, seen)):
                if now > before:
                    self.expert_tokens.labels(self.name, str(layer), str(e)).inc(now - before)
            self._expert_seen[layer] = counts
            mean = sum(counts) / len(counts) if counts else 0
            self.expert_imbalance.labels(self.name, str(layer)).set(max(counts) / mean if mean else 1.0)

    def observe_request(self, prompt_tokens: int, output_tokens: int, ttft: float | None, e2e: float,
                        reasons: list[str]) -> None:
        n = self.name
        self.prompt_tokens.labels(n).inc(prompt_tokens)
        self.gen_tokens.labels(n).inc(output_tokens)
        if ttft is not None:
            self.ttft.labels(n).observe(ttft)
            if output_tokens > 1:
                self.tpot.labels(n).observe((e2e - ttft) / (output_tokens - 1))
        self.e2e.labels(n).observe(e2e)
        for reason in reasons:
            self.success.labels(n, reason).inc()

    def render(self) -> bytes:
        if self.engine.num_unfinished == 0:  # idle: no step will come to update the gauges
            self.running.labels(self.name).set(0)
            self.waiting.labels(self.name).set(0)
            self.kv_usage.labels(self.name).set(self.engine.engine.scheduler.kv.usage())
        return generate_latest(self.registry)
