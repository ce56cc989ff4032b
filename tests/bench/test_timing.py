"""How the benchmark times: every timing after a rest, per-call arithmetic of the eager timers."""

import pytest

from moe_learn.bench import timing


class FakeClock:
    """Stands in for CUDA events: each call of the timed function takes ``per_call_ms``."""

    def __init__(self, per_call_ms):
        self.now, self.per_call_ms, self.calls = 0.0, per_call_ms, 0

    def fn(self):
        self.calls += 1
        self.now += self.per_call_ms

    def event_class(self):
        clock = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = clock.now

            def elapsed_time(self, end):
                return end.t - self.t

        return Event


@pytest.fixture
def fake_gpu(monkeypatch):
    events = []
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda: events.append("sync"))
    monkeypatch.setattr(timing.time, "sleep", lambda seconds: events.append(("sleep", seconds)))
    monkeypatch.setattr(timing, "REST_S", 0.25)

    def with_clock(per_call_ms):
        clock = FakeClock(per_call_ms)
        monkeypatch.setattr(timing.torch.cuda, "Event", clock.event_class())
        return clock

    return events, with_clock


def test_every_timing_follows_a_rest(fake_gpu, monkeypatch):
    """Ceilings and kernels are timed on a rested GPU alike (a loaded H100 sits at its power cap)."""
    import triton.testing

    events, with_clock = fake_gpu
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: events.append("time") or 2.0)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: events.append("graph") or 3.0)
    assert timing.do_bench(lambda: None) == pytest.approx(2e-3)
    assert timing.do_bench_graph(lambda: None) == pytest.approx(3e-3)
    assert events == ["sync", ("sleep", 0.25), "time", "sync", ("sleep", 0.25), "graph"]
    events.clear()
    timing.do_bench_loop(with_clock(0.5).fn)
    timing.time_single_call(with_clock(0.5).fn)
    assert [e for e in events if e != "sync"] == [("sleep", 0.25), ("sleep", 0.25)]
    assert events[:2] == ["sync", ("sleep", 0.25)]


def test_rest_false_is_for_a_group_that_rested_before(fake_gpu, monkeypatch):
    import triton.testing

    events, with_clock = fake_gpu
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: 1.0)
    timing.do_bench_loop(with_clock(0.5).fn, rest=False)
    timing.time_single_call(with_clock(0.5).fn, rest=False)
    timing.do_bench_graph(lambda: None, rest=False)
    assert ("sleep", 0.25) not in events


@pytest.mark.parametrize("per_call_ms,calls_per_sample", [(0.02, 100), (0.5, 20), (30.0, 1)])
def test_loop_timing_divides_each_loop_by_its_calls(fake_gpu, per_call_ms, calls_per_sample):
    _, with_clock = fake_gpu
    clock = with_clock(per_call_ms)
    assert timing.do_bench_loop(clock.fn, samples=4) == pytest.approx(per_call_ms * 1e-3)
    assert clock.calls == 3 + 1 + 4 * calls_per_sample  # warm-up, the estimate, the loops (~10 ms each)


def test_single_call_timing_warms_up_then_times_each_call_alone(fake_gpu):
    events, with_clock = fake_gpu
    clock = with_clock(0.125)
    assert timing.time_single_call(clock.fn, samples=5, rest=False) == pytest.approx(0.125e-3)
    assert clock.calls == 1 + 5
    assert events.count("sync") == 2 * 5  # idle GPU before each call, wait for it after


def test_geomean_and_rel_err():
    import torch

    assert timing.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert timing.rel_err(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])) == pytest.approx(4 / 3)


def test_environment_records_the_baselines_versions(monkeypatch):
    monkeypatch.setattr(timing.torch.cuda, "get_device_name", lambda: "Fake GPU")
    env = timing.environment()
    assert env["gpu"] == "Fake GPU" and env["transformers"] == timing.package_version("transformers") != ""
    assert env["liger_kernel"] == timing.package_version("liger-kernel")
    assert timing.package_version("moe-learn-no-such-distribution") == "not installed"
