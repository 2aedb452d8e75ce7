"""pytest-benchmark suites of fusedloss: `python -m pytest bench/ --benchmark-only`.

Not part of the tests/ suite. Each test times forward + backward of one contender on
inputs shared by the module, and first checks that its loss agrees with the eager
baseline's, so that the benchmarks compare equal work.
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="session", autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def fwd_bwd_benchmark(benchmark):
    """``fwd_bwd_benchmark(step, clear)`` benchmarks ``step`` (forward + backward) with
    ``clear`` (input gradients to None) run before each round, outside the timing: one
    untimed warm-up round, then 10 timed rounds. Compile and check before calling it."""

    def run(step, clear, rounds=10):
        return benchmark.pedantic(step, setup=clear, rounds=rounds, iterations=1, warmup_rounds=1)

    return run
