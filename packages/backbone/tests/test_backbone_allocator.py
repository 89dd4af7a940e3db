"""The CPU allocator policy: kept memory is reused without page faults, the default unmaps it."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys

import pytest
import torch

from post3r_backbone import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocate, touch and free a 64 MiB block (above glibc's mmap threshold cap) 6 times under a
# policy, then print the minor page faults of the last 4 rounds (the first two warm up).
FAULTS = """
import resource, sys, torch
from post3r_backbone import allocator
getattr(allocator, sys.argv[1])()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for round in range(6):
    if round == 2:
        start = faults()
    torch.ones(16 * 2**20)  # 64 MiB, written in full, freed at once
print(faults() - start)
"""


def page_faults_under(policy: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", FAULTS, policy], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults() -> None:
    pages = 4 * 64 * 2**20 // 4096  # what 4 freshly mapped 64 MiB blocks fault in
    assert page_faults_under("unmap_freed_memory") > pages // 2
    assert page_faults_under("keep_freed_memory") < pages // 20


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_policies_are_taken_by_glibc() -> None:
    assert allocator.keep_freed_memory() is True
    assert allocator.unmap_freed_memory() is True
    allocator.release_free_memory()
    assert allocator.keep_freed_memory() is True  # the test process keeps its usual policy


def test_policies_are_harmless_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(name):
        raise OSError("no C library")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert allocator.keep_freed_memory() is False
    assert allocator.unmap_freed_memory() is False
    allocator.release_free_memory()  # nothing to do, no error


def test_keep_freed_memory_for_sets_the_policy_for_cpu_jobs_only(monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("kept") or True)
    assert allocator.keep_freed_memory_for("cuda:1") is False
    assert allocator.keep_freed_memory_for(torch.device("cuda")) is False
    assert calls == []
    assert allocator.keep_freed_memory_for(torch.device("cpu")) is True
    assert allocator.keep_freed_memory_for("cpu") is True
    assert calls == ["kept", "kept"]
