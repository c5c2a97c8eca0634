"""bench_suite plugin: top-k attention (the method is registered by :mod:`bench_topk.method`)."""
