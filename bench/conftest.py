"""pytest-benchmark suites of fusedloss: `python -m pytest bench/ --benchmark-only`.

Not part of the tests/ suite. Each test times forward + backward of one contender of a case
of a `python -m fusedloss.bench` family, at a small CPU shape, on inputs shared by the
module, and first checks that its loss and gradients agree with the eager baseline's, so
that the benchmarks compare equal work. In CI (`--benchmark-disable`) each runs once: the
agreement check.
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


class FamilyCase:
    """One case of a benchmark family (fusedloss.bench.Family) on the CPU: its inputs, built
    once, the loss and leaf gradients of its eager baseline, and the steps of its contenders.
    A step runs forward + backward and returns the loss."""

    def __init__(self, fam, case):
        self.fam, self.case = fam.seen_by(case), case
        self.inputs = self.fam.make_inputs(case, "cpu")
        self.leaves = self.inputs["leaves"]
        self.reference = self._loss_and_grads(self.step(self.fam.baselines[0]))

    def step(self, contender):
        """The step of `contender`; a skip where its peer library is not installed."""
        from fusedloss.bench import NotInstalled

        try:
            return self.fam.contenders[contender](self.case, self.inputs)
        except NotInstalled as e:
            pytest.skip(str(e))

    def clear(self):
        for leaf in self.leaves:
            leaf.grad = None

    def _loss_and_grads(self, step):
        self.clear()
        loss = step()
        grads = [leaf.grad.clone() for leaf in self.leaves]
        self.clear()
        return float(loss), grads


@pytest.fixture(scope="module")
def _family_cases():
    """The FamilyCases of a test module, made on first use and shared by its tests."""
    return {}


@pytest.fixture
def bench_contender(benchmark, fwd_bwd_benchmark, assert_agrees, _family_cases):
    """``bench_contender(fam, case, contender, group, extra_info)``: checks the first step of
    the contender of the family's case (which compiles a compiled contender) against the eager
    baseline with ``assert_agrees``, then benchmarks its steps under ``group``, with
    ``extra_info``. The case's inputs and baseline are made once per module."""

    def run(fam, case, contender, group, extra_info):
        key = (fam.name, tuple(sorted(case.items())))
        if key not in _family_cases:
            _family_cases[key] = FamilyCase(fam, case)
        fc = _family_cases[key]
        benchmark.group = group
        benchmark.extra_info.update(extra_info)
        step = fc.step(contender)
        fc.clear()
        assert_agrees(step(), fc.leaves, *fc.reference)
        fwd_bwd_benchmark(step, fc.clear)

    return run
