"""The allocator the timing commands run under (bench_suite.allocator): retained memory has no page faults."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench_suite.allocator import ALLOCATOR_MODES, allocator_description, glibc_version, use_allocator
from bench_suite.cli import main
from bench_suite.versions import versions

ROOT = Path(__file__).resolve().parents[1]

FAULTS = """
import resource, sys, torch
from bench_suite.allocator import use_allocator
use_allocator(sys.argv[1])
torch.set_num_threads(1)
def forward():  # an activation of 74 MiB and its GELU, as in deit_s's MLP at batch 64
    x = torch.randn(64, 197, 1536)
    return float(torch.nn.functional.gelu(x)[0, 0, 0])
for _ in range(3):
    forward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    forward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_call(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(glibc_version() is None, reason="mallopt is glibc's")
def test_retained_memory_has_no_page_faults_in_a_warm_forward() -> None:
    """glibc's defaults map and zero two blocks above its largest mmap threshold (32 MiB) per call, 2 x 74 MiB
    (~38k faults); retained memory: none."""
    system, retain = _faults_per_call("system"), _faults_per_call("retain")
    assert system > 5000, system
    assert retain < 0.02 * system, (retain, system)


def test_rows_record_the_allocator() -> None:
    try:
        assert "retained" in use_allocator("retain") and versions()["allocator"] == allocator_description()
        if glibc_version() is not None:
            assert versions()["allocator"].startswith(f"glibc {glibc_version()} malloc, freed memory retained")
    finally:
        use_allocator("retain")  # what the commands leave behind (a return to 'system' loses glibc's dynamic threshold)
    with pytest.raises(ValueError, match="--allocator takes retain or system"):
        use_allocator("jemalloc")
    assert ALLOCATOR_MODES == ("retain", "system")


def test_preloaded_allocator_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert use_allocator("retain") == "jemalloc (LD_PRELOAD)" == versions()["allocator"]


def test_allocator_option_refuses_other_values(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["speed", "--profile", "tiny", "--allocator", "tcmalloc", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_suite: error:") and "allocator" in err and len(err.strip().splitlines()) == 1
