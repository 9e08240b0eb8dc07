"""The proxy's Prometheus metrics, on the server's own registry (``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram


class ProxyMetrics:
    def __init__(self, registry):
        self.requests = Counter("edgeguard_proxy_requests", "Chat completions proxied, by stream and outcome",
                                ["stream", "action"], registry=registry)
        self.cuts = Counter("edgeguard_proxy_cuts", "Answers cut after a flag", registry=registry)
        self.care = Counter("edgeguard_proxy_care_continuations", "CARE continuations asked of the upstream",
                            registry=registry)
        self.blocks = Counter("edgeguard_proxy_prompt_blocks", "Prompts refused before any answer",
                              registry=registry)
        self.delay = Histogram("edgeguard_proxy_release_delay_seconds",
                               "Time from the upstream sending text to the client getting it", registry=registry,
                               buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.prompt = Histogram("edgeguard_proxy_prompt_seconds", "Time to the prompt's verdict", registry=registry,
                                buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
