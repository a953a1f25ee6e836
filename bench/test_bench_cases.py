"""The registry as pytest-benchmark tests: ``pytest bench/ --benchmark-only``.

Not part of the CI test run (testpaths = tests); CI runs a smoke pass of
``tritium bench`` instead.  Sizes follow ``--benchmark-sizes`` (quick/full).
"""
from __future__ import annotations

import pytest
import torch

from tritium.bench.registry import Skip, load_all
from tritium.bench.runner import sizes_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _params():
    for case in load_all().values():
        for size in sizes_for(case, DEVICE, quick=True):
            for mode in case.modes:
                for provider in case.providers:
                    yield pytest.param(case, size, mode, provider,
                                       id=f"{case.name}-{case.label(size)}-{mode}-{provider}")


@pytest.mark.parametrize("case,size,mode,provider", list(_params()))
def test_bench(benchmark, case, size, mode, provider):
    try:
        fn = case.providers[provider](size, mode, DEVICE, DTYPE)
    except Skip as skip:
        pytest.skip(str(skip))
    benchmark.extra_info.update({"case": case.name, "size": case.label(size), "mode": mode,
                                 "provider": provider, "device": DEVICE})
    if DEVICE == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
        benchmark(timed)
    else:
        benchmark(fn)
