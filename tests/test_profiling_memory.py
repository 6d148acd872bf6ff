"""Peak memory: process RSS high-water mark on CPU; CUDA fields None with a reason off-GPU."""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tofu_export.profiling.memory import measure_memory, reset_peak_memory

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")


def _current_rss_mib() -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert match is not None
    return int(match.group(1)) / 1024


def _peak_before_and_after_a_new_high() -> tuple[float | None, float, float | None]:
    """``(peak, current RSS, peak after touching enough memory to exceed the old peak)`` in MiB, read in a forked
    child: Linux starts a child's high-water mark at its RSS, so the new peak costs ~64 MiB, not the gigabytes an
    earlier export in this worker may have left as its peak."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: numpy and resource only, then _exit
        try:
            before, current = measure_memory("cpu").peak_rss_mib, _current_rss_mib()
            block = np.ones((int((before or 0) - current) + 64) * 1024 * 1024, dtype=np.uint8)  # touched: resident
            after = measure_memory("cpu").peak_rss_mib
            os.write(write, json.dumps([before, current, after, int(block[-1])]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        reply = pipe.read()
    os.waitpid(pid, 0)
    before, current, after, _ = json.loads(reply)
    return before, current, after


@linux_only
def test_peak_rss_rises_with_a_new_high_water_mark() -> None:
    before, current, after = _peak_before_and_after_a_new_high()
    assert before is not None and before >= current - 1
    assert after is not None and after >= before + 32


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_fields_are_none_with_reason_when_not_on_cuda() -> None:
    reset_peak_memory("cpu")
    report = measure_memory("cpu")
    assert report.cuda_peak_allocated_mib is None and "not CUDA" in (report.cuda_reason or "")
    cuda_report = measure_memory("cuda")
    assert cuda_report.cuda_peak_allocated_mib is None and "is_available" in (cuda_report.cuda_reason or "")
    assert report.to_dict()["rss_reason"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_counts_allocations() -> None:
    reset_peak_memory("cuda")
    block = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    report = measure_memory("cuda")
    assert report.cuda_peak_allocated_mib is not None and report.cuda_peak_allocated_mib >= 64
    del block
