"""The debug hooks of kernels/_runtime.py: the launch ledger and the NaN output sentinels."""
import os
import subprocess
import sys
import threading

import pytest
import torch

from tritium.kernels._runtime import (
    count_launches,
    empty,
    empty_like,
    read_launch_ledgers,
    sentinel_outputs,
    sentinels_enabled,
)
from tritium.kernels.norm import rms_norm


def test_ledger_counts_per_kernel_across_threads(device):
    x, w = torch.randn(3, 8, device=device), torch.ones(8, device=device)
    with count_launches() as outer:
        rms_norm(x, w)
        with count_launches() as inner:
            worker = threading.Thread(target=rms_norm, args=(x, w))  # the serving engine's thread
            worker.start()
            worker.join()
    assert outer["_rms_norm_fwd_kernel"] == 2 and inner["_rms_norm_fwd_kernel"] == 1
    rms_norm(x, w)
    assert outer["_rms_norm_fwd_kernel"] == 2  # closed ledgers stop counting
    with pytest.raises(AssertionError, match=r"_rope_kernel.*never launched"):
        outer.require("_rms_norm_fwd_kernel", "_rope_kernel")


def test_ledger_of_another_process_via_environment(tmp_path):
    code = ("import torch; from tritium.kernels import rms_norm; "
            "rms_norm(torch.randn(4, 16), torch.ones(16)); rms_norm(torch.randn(2, 16), torch.ones(16))")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITIUM_LAUNCH_LEDGER=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    assert read_launch_ledgers(tmp_path) == {"_rms_norm_fwd_kernel": 2}


def test_sentinels_fill_outputs_with_nan_or_the_integer_minimum():
    assert sentinels_enabled()  # tests/kernels/conftest.py turns them on for every kernel test
    assert torch.isnan(empty((2, 3), dtype=torch.bfloat16, device="cpu")).all()
    assert (empty(4, dtype=torch.int32, device="cpu") == torch.iinfo(torch.int32).min).all()
    assert torch.isnan(empty_like(torch.zeros(5))).all()
    with sentinel_outputs():  # nesting keeps them on
        assert sentinels_enabled()
    assert sentinels_enabled()


def test_sentinels_expose_an_unwritten_row(monkeypatch, device):
    """What the mode is for: a launcher whose grid misses the last row returns NaN there."""
    import tritium.kernels.norm as norm_mod

    original = norm_mod.launch
    monkeypatch.setattr(norm_mod, "launch", lambda kernel, grid: original(kernel, (grid[0] - 1,) + grid[1:]))
    y = rms_norm(torch.randn(3, 8, device=device), torch.ones(8, device=device))
    assert torch.isfinite(y[:2]).all() and torch.isnan(y[2]).all()
