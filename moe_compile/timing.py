"""Side-by-side timing on a shared, noisy machine: round-robin blocks of calls, the median block per call, and
ONNX Runtime sessions pinned to a thread count. The benchmarks, the examples and optimize's latency budget time
through these."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Union


def time_round_robin(calls: dict[str, Callable[[], object]], blocks: int, per_block: int) -> dict[str, float]:
    """Median over `blocks` round-robin blocks of the mean seconds per call, after two warm-up calls each."""
    for fn in calls.values():
        fn(), fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(blocks):
        for name, fn in calls.items():
            start = time.perf_counter()
            for _ in range(per_block):
                fn()
            samples[name].append((time.perf_counter() - start) / per_block)
    return {name: statistics.median(times) for name, times in samples.items()}


def ort_session(path: Union[str, os.PathLike], threads: int):
    """An ONNX Runtime CPU session with `threads` intra-op threads and one inter-op thread (b-bit expert weights
    computed in float32, as eager does: see export/weight_only.py)."""
    import onnxruntime as ort

    from .export.weight_only import exact_options

    options = exact_options()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
