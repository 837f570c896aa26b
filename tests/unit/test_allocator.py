"""retain_freed_memory: a freed training-step-sized buffer is reused, not faulted in again each step."""

import platform
import resource

import pytest
import torch

from recsys.model.allocator import retain_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc tuning")
def test_step_sized_buffers_stop_page_faulting():
    assert retain_freed_memory()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        scores = torch.ones(32, 2080)  # [B, B + n_sample] ~266 KB: above glibc's initial mmap threshold
        del scores
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 50 * 10  # a fresh mmap would fault its ~65 pages every time
