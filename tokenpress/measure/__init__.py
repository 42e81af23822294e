"""Layer 4, measurement: running a model to measure what a stack does - ``evaluate`` (accuracy on the
shapes benchmark, FLOPs and prefill time against the uncompressed model in one run), ``bench`` (speedup
against FLOPs), ``profiling`` (torch.profiler, stage timers) and ``leaderboard`` (every method on the
shipped proxies)."""
