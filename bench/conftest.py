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


@pytest.fixture
def assert_agrees():
    """``assert_agrees(loss, leaves, ref_loss, ref_grads)``: the loss agrees with the
    reference's to 1e-4 relative, as in ``python -m fusedloss.bench``, and each leaf's
    gradient with the reference's to 1e-4 relative plus 1e-5 of the reference's largest
    entry (fp32 contenders that sum in different orders). Leaves and gradients in order."""

    def check(loss, leaves, ref_loss, ref_grads):
        torch.testing.assert_close(float(loss.detach()), ref_loss, rtol=1e-4, atol=0.0)
        assert len(leaves) == len(ref_grads)
        for leaf, ref in zip(leaves, ref_grads):
            assert leaf.grad is not None and leaf.grad.shape == leaf.shape
            torch.testing.assert_close(leaf.grad, ref, rtol=1e-4,
                                       atol=1e-5 * float(ref.abs().max()))

    return check
