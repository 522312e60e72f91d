"""runtime.calibrate_bench's GPU timing (time_op_gpu) against a simulated GPU: a host that issues
calls slower than the GPU runs them must not make the kernels look slow (the H200 calibration's
flat ~20 us per bf16 addmm for n = 32..1024), and the CPU sizes stay as they were."""

from __future__ import annotations

import contextlib

import pytest
import torch

from runtime import calibrate_bench as bench
from runtime import calibrate_gpu


class FakeGPU:
    """One stream on a simulated clock: the host pays `host_s` per call, the GPU `gpu_s` per
    kernel, in issue order; torch.cuda._sleep holds the GPU for cycles / CPS seconds."""

    CPS = 2e9

    def __init__(self, host_s: float, gpu_s: float, slow_after_sleeps: tuple[int, int] = (0, 0)):
        self.now = 0.0  # host clock
        self.free = 0.0  # when the GPU has finished everything issued
        self.host_s, self.gpu_s = host_s, gpu_s
        self.slow = slow_after_sleeps  # after sleep number a to b the host is 10x slower
        self.sleeps = 0

    def clock(self) -> float:
        return self.now

    def kernel(self, dur: float) -> None:
        self.free = max(self.free, self.now) + dur

    def call(self, *_args) -> None:
        slow = 10 if self.slow[0] <= self.sleeps <= self.slow[1] else 1
        self.now += self.host_s * slow
        self.kernel(self.gpu_s)

    def sleep(self, cycles: int) -> None:
        self.sleeps += 1
        self.kernel(cycles / self.CPS)

    def synchronize(self, *_args) -> None:
        self.now = max(self.now, self.free)

    def event_class(gpu):  # noqa: N805 - the fake's Event closes over the fake
        class Event:
            def __init__(self, enable_timing: bool = False):
                self.t = None

            def record(self) -> None:
                gpu.kernel(0.0)
                self.t = gpu.free

            def query(self) -> bool:
                return self.t <= gpu.now

            def synchronize(self) -> None:
                gpu.now = max(gpu.now, self.t)

            def elapsed_time(self, other) -> float:
                return (other.t - self.t) * 1e3

        return Event


@pytest.fixture
def fake_cuda(monkeypatch):
    def make(**kw) -> FakeGPU:
        gpu = FakeGPU(**kw)
        monkeypatch.setattr(bench.time, "perf_counter", gpu.clock)
        monkeypatch.setattr(torch.cuda, "_sleep", gpu.sleep, raising=False)
        monkeypatch.setattr(torch.cuda, "synchronize", gpu.synchronize)
        monkeypatch.setattr(torch.cuda, "Event", gpu.event_class())
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
        monkeypatch.setattr(calibrate_gpu, "_SLEEP_CYCLES_PER_S", {})
        return gpu

    return make


CUDA = torch.device("cuda", 0)


@pytest.mark.tier1
def test_host_bound_calls_time_the_gpu_not_the_host(fake_cuda):
    gpu = fake_cuda(host_s=20e-6, gpu_s=3e-6)  # the H200 bf16 addmm at n = 1024, roughly
    issue: list[float] = []
    t = bench.time_op(gpu.call, CUDA, 0.08, host_out=issue)
    assert t == pytest.approx(3e-6, rel=1e-6)
    assert issue == [pytest.approx(20e-6, rel=1e-6)]
    # the host loop (what calibrate measured before, and still does for the launch floor)
    assert bench.time_op(gpu.call, CUDA, 0.08, host_loop=True) == pytest.approx(20e-6, rel=1e-3)


@pytest.mark.tier1
def test_gpu_bound_calls_keep_their_time(fake_cuda):
    gpu = fake_cuda(host_s=20e-6, gpu_s=1.5e-3)
    assert bench.time_op(gpu.call, CUDA, 0.08) == pytest.approx(1.5e-3, rel=1e-6)


@pytest.mark.tier1
def test_a_batch_the_host_did_not_queue_in_time_is_redone(fake_cuda):
    # sleeps 1-2 measure the spin kernel's clock, 3 holds the first (sizing) batch, 4.. the five
    # timed batches: the host turns 10x slower during the first of them
    gpu = fake_cuda(host_s=20e-6, gpu_s=3e-6, slow_after_sleeps=(4, 4))
    t, host = bench.time_op_gpu(gpu.call, CUDA, 0.08)
    assert gpu.sleeps > 2 + 1 + 5  # a batch was redone
    assert t == pytest.approx(3e-6, rel=1e-6)
    assert host == pytest.approx(20e-6, rel=1e-6)


@pytest.mark.tier1
def test_gpu_sizes_are_added_on_gpus_only():
    s = bench.Sizes()
    assert s.matmul_sizes("bf16", "cpu") == s.matmul_n["bf16"]
    assert s.attention_lengths("cpu") == s.attention_t
    assert max(s.matmul_sizes("bf16", "cuda")) == 8192
    assert s.matmul_sizes("bf16", "cuda")[: len(s.matmul_n["bf16"])] == s.matmul_n["bf16"]
    assert s.matmul_sizes("fp64", "cuda") == s.matmul_n["fp64"][:1]
    assert max(s.attention_lengths("cuda")) == 4096
    q = bench.Sizes.quick()
    assert q.matmul_sizes("fp32", "cuda") == q.matmul_n["fp32"]
