"""Peak memory: process RSS high-water mark on CPU; CUDA fields None with a reason off-GPU."""

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


@linux_only
def test_peak_rss_rises_with_a_new_high_water_mark() -> None:
    before = measure_memory("cpu").peak_rss_mib
    assert before is not None and before >= _current_rss_mib() - 1
    extra_mib = int(before - _current_rss_mib()) + 64  # enough to exceed the old peak
    block = np.ones(extra_mib * 1024 * 1024, dtype=np.uint8)  # touched, so resident
    after = measure_memory("cpu").peak_rss_mib
    assert after is not None and after >= before + 32
    del block


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
