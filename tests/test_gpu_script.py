"""benchmarks/gpu.py's own logic, on the CPU: the device it picks, the time budget (what it skips, how
it stops an item or a subprocess), the loader's workers against /dev/shm, the test run's outcome, the
engine's syncs per step. The script has one call of a few minutes on a lent GPU machine to succeed, so
what decides its course is checked here."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_benchmark_script", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees two GPUs (current: 1); torch.cuda.set_device records the index it would set, after the
    argument check torch makes before any CUDA call (the one that raised on an index-less device)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda device: chosen.append(torch.cuda._utils._get_device_index(device)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored afterwards
    return chosen


def test_a_bare_cuda_device_resolves_to_the_current_gpu(gpu, two_gpus):
    assert gpu.setup_device("cuda") == torch.device("cuda", 1)
    assert gpu.setup_device("cuda:0") == torch.device("cuda", 0)
    assert two_gpus == [1, 0]


def test_a_gpu_index_torch_does_not_see_is_a_one_line_error(gpu, two_gpus):
    with pytest.raises(ValueError, match=r"--device cuda:2, but torch sees 2 GPUs \(cuda:0 to cuda:1\)"):
        gpu.setup_device("cuda:2")
    with pytest.raises(ValueError, match="--device tpu: use cuda, cuda:N or cpu"):
        gpu.setup_device("tpu")
    assert two_gpus == []


def test_the_dry_run_resolves_its_device_through_the_same_function(gpu, two_gpus):
    assert gpu.setup_device("cpu") == torch.device("cpu")
    assert two_gpus == []  # no CUDA call for the CPU


def test_syncs_per_step_is_the_difference_of_two_runs_per_extra_step(gpu):
    short = [("item", "engine.py:10"), ("tolist", "engine.py:20"), ("nonzero", "loss.py:5")]  # 2 iterations
    long = short + [("item", "engine.py:10"), ("item", "engine.py:10"), ("nonzero", "loss.py:5")]  # 4 iterations
    assert gpu.syncs_per_step(short, long, 2) == {("item", "engine.py:10"): 1.0, ("nonzero", "loss.py:5"): 0.5}


def test_a_sync_only_in_the_shorter_run_is_counted_not_a_key_error(gpu):
    short = [("item", "engine.py:10"), ("tolist", "checkpoint.py:7")]
    long = [("item", "engine.py:10"), ("item", "engine.py:10"), ("item", "engine.py:10")]
    assert gpu.syncs_per_step(short, long, 2) == {("item", "engine.py:10"): 1.0, ("tolist", "checkpoint.py:7"): -0.5}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_the_budget_keeps_the_tests_time_and_skips_what_would_not_fit(gpu):
    clock = Clock()
    budget = gpu.Budget(100, {"train": 30, "e2e": 30, "frcnn": 10, "tests": 40}, clock=clock)
    assert budget.SLACK == 15
    items = ["train", "e2e", "frcnn", "tests"]
    assert budget.limit("train", items[1:]) == 45  # 100 less the tests' 40 and the slack
    assert budget.skip_reason("train", items[1:]) is None
    clock.now += 45  # train ran to its limit: 55 left, 0 once the tests' time is kept
    assert budget.skip_reason("e2e", items[2:]) == (
        "time budget: needs about 30 s, 55 s left of --budget 100, 55 s of it kept for the tests")
    assert budget.skip_reason("frcnn", items[3:]) is not None
    assert budget.skip_reason("e2e", ["frcnn"]) is None  # without the tests, nothing is kept
    clock.now += 20  # clean-up after the stopped item ate into the slack: the tests still run
    assert budget.skip_reason("tests", []) is None and budget.limit("tests", []) == 35
    clock.now += 16  # 19 s left: under half of the tests' 40
    assert budget.skip_reason("tests", []) == "time budget: needs about 20 s, 19 s left of --budget 100"


def test_no_budget_runs_everything(gpu):
    budget = gpu.Budget(0, {"train": 1e6, "tests": 1e6})
    assert budget.skip_reason("train", ["tests"]) is None and budget.limit("train", ["tests"]) == float("inf")


def test_an_item_past_its_limit_is_stopped(gpu):
    start = time.monotonic()
    with pytest.raises(gpu.BudgetExceeded, match="ran past its 0 s limit"):
        with gpu.stop_after(0.2):
            while time.monotonic() - start < 10:
                sum(range(1000))
    assert time.monotonic() - start < 2
    with gpu.stop_after(5):  # disarmed on leaving: no alarm afterwards
        pass
    time.sleep(0.05)


def test_a_subprocess_is_killed_at_its_limit_with_what_it_printed(gpu):
    start = time.monotonic()
    code, lines = gpu.run_streamed([sys.executable, "-c", "import time; print('started'); time.sleep(60)"], 1.0)
    assert code is None and lines == ["started"] and time.monotonic() - start < 15
    code, lines = gpu.run_streamed([sys.executable, "-c", "import sys; print('a'); sys.exit(3)"], 30)
    assert (code, lines) == (3, ["a"])


@pytest.mark.parametrize("shm_mib, workers", [(None, 8), (64, 0), (2048, 4), (3200, 7), (65536, 8)])
def test_loader_workers_fit_in_shared_memory(gpu, shm_mib, workers):
    """Batches of 100 MiB in half the free /dev/shm, 2 per worker and 2 in the main process:
    2048 MiB -> 1024 / 100 = 10.24 batches, less 2 = 8.24, 4 workers; 3200 -> 16 - 2 = 14, 7 workers."""
    got, why = gpu.fit_workers(8, 100 * 2 ** 20, None if shm_mib is None else shm_mib * 2 ** 20)
    assert got == workers
    assert ("instead of 8" in why) == (workers < 8)


def test_the_float_batch_is_the_largest_the_loader_hands_over(gpu):
    prof = gpu.profile("cuda", quick=True)  # 480x640 JPEGs -> 800x1067, 16 images
    assert gpu.loader_batch_bytes(prof) == 16 * 3 * 800 * 1067 * 4


def test_a_test_run_cut_short_reports_what_finished_and_what_was_running(gpu):
    lines = ["============ test session starts ============",
             "tests/test_cuda.py::test_a[x] PASSED                    [ 10%]",
             "tests/test_cuda.py::test_b FAILED                       [ 20%]",
             "tests/test_cuda.py::test_c PASSED                       [ 30%]",
             "tests/test_cuda.py::test_nccl "]
    summary, failed = gpu.pytest_outcome(None, lines, 120)
    assert summary == "stopped at its 120 s limit: 2 passed, 1 failed"
    assert failed == ["test_b", "test_nccl (running)"]
    assert gpu.pytest_outcome(-6, lines, 120) == ("ended without a summary (exit code -6): 2 passed, 1 failed",
                                                  ["test_b", "test_nccl (running)"])  # e.g. an abort
    lines[-1] += "PASSED                  [ 40%]"
    lines += ["=========== short test summary info ============", "FAILED tests/test_cuda.py::test_b - assert 1 == 2",
              "======= 1 failed, 3 passed in 12.30s ======="]
    assert gpu.pytest_outcome(1, lines, 120) == ("1 failed, 3 passed", ["test_b"])
