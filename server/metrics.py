"""Every Prometheus metric of the server, in one registry per app (names prefixed ``jumplora_``)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)
UNKNOWN_TASK = "<unknown>"  # label for requests naming a task that is not served (keeps label sets bounded)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._published: dict[str, tuple] = {}  # task -> the (density, non-zero, overlap) its gauges show
        self.request_latency = Histogram(
            "jumplora_request_duration_seconds", "End-to-end request latency", ["task", "endpoint"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("jumplora_time_to_first_token_seconds", "Time from arrival to the first token",
                              ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("jumplora_inter_token_latency_seconds", "Time between two tokens of one request",
                             ["task"], buckets=TOKEN_BUCKETS, registry=r)
        self.generated_tokens = Counter("jumplora_generated_tokens", "Tokens generated", ["task"], registry=r)
        self.prompt_tokens = Counter("jumplora_prompt_tokens", "Prompt tokens processed", ["task"], registry=r)
        self.requests = Counter("jumplora_requests", "Requests by outcome", ["task", "endpoint", "status"],
                                registry=r)
        self.queue_length = Gauge("jumplora_queue_length", "Requests waiting for a batch row", registry=r)
        self.batch_size = Gauge("jumplora_running_batch_size", "Rows in the running batch", registry=r)
        self.step_seconds = Histogram("jumplora_decode_step_seconds", "Time of one batched decode step",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.adapter_density = Gauge("jumplora_adapter_density",
                                     "Non-zero fraction of the adapter's targeted delta entries", ["task"],
                                     registry=r)
        self.adapter_nonzero = Gauge("jumplora_adapter_nonzero_params", "Non-zero entries of the adapter's delta",
                                     ["task"], registry=r)
        self.adapter_overlap = Gauge(
            "jumplora_adapter_overlap_ratio",
            "Fraction of the adapter's non-zero positions that are non-zero in an earlier task's delta", ["task"],
            registry=r)
        self.adapters_served = Gauge("jumplora_adapters_served", "Task adapters being served", registry=r)
        self.merged_sets = Gauge("jumplora_merged_weights_sets",
                                 "Routes whose merged weights are cached for serving", registry=r)
        self.merged_bytes = Gauge("jumplora_merged_weights_bytes", "Memory of the cached merged weights (at most "
                                  "merged_weights_mb)", registry=r)
        self.merged_builds = Counter("jumplora_merged_weights_builds",
                                     "Projection groups whose merged weights were built", registry=r)
        self.adapter_load_errors = Counter("jumplora_adapter_load_errors",
                                           "Stored adapters refused at load (corrupt, foreign, malformed)",
                                           ["task", "reason"], registry=r)

        self.jobs = Gauge("jumplora_jobs", "Training jobs by state", ["state"], registry=r)
        self.train_step = Gauge("jumplora_training_step", "Step of the running training job", registry=r)
        self.train_loss = Gauge("jumplora_training_loss", "Loss at the last step of the running job", registry=r)
        self.train_density = Gauge("jumplora_training_density",
                                   "Share of delta entries the running job's gate keeps", registry=r)
        self.train_tokens_per_s = Gauge("jumplora_training_tokens_per_second",
                                        "Training throughput of the running job", registry=r)
        self.jobs_loop_errors = Counter("jumplora_jobs_loop_errors",
                                        "Errors that escaped a turn of the jobs thread (it backs off and retries)",
                                        registry=r)
        self.register_seconds = Histogram("jumplora_register_seconds",
                                          "Time from a stored adapter to the engine serving it",
                                          buckets=LATENCY_BUCKETS, registry=r)

    def set_adapters(self, tasks) -> None:
        """Publish per-adapter gauges for exactly the served tasks (removed tasks lose their series). Only the
        series that change are touched: with 1,000 tasks served, setting all three gauges of every task again
        took 70 ms of each registration."""
        now = {info.name: (info.density, info.nonzero, info.overlap) for info in tasks}
        gauges = (self.adapter_density, self.adapter_nonzero, self.adapter_overlap)
        for name in self._published.keys() - now.keys():
            for gauge in gauges:
                gauge.remove(name)
        for name, values in now.items():
            if self._published.get(name) != values:
                for gauge, value in zip(gauges, values):
                    gauge.labels(name).set(value)
        self._published = now
        self.adapters_served.set(len(now))

    def render(self) -> bytes:
        return generate_latest(self.registry)
