"""Every Triton launch runs on the device of its tensors, with that device's current stream.

Triton takes the device and the stream of a launch from the current CUDA device, never from
the tensors, and neither torch.library.triton_op nor wrap_triton adds a guard. So every
launcher of fusedloss.triton_kernels launches through `_common.launch`, which enters
`_common.device_context(device of the tensors)` (torch.cuda.device for a CUDA device) around
the launch. Without a GPU, the tests replace `device_context` with a fake that records the
device it is given and marks the guard as entered, and wrap the kernels' `run` (the
interpreter's or the JIT's) so that each launch records whether it happened inside the
guard; every sample of every OpSpec with a Triton backend then goes through forward and
backward. On a machine with two GPUs, one sample per Triton op runs on cuda:1 while cuda:0 is
current, and must match the reference.
"""
import contextlib
import importlib

import pytest
import torch

import fusedloss  # noqa: F401  (makes every Op)
from fusedloss.specs import registry

pytest.importorskip("triton")
from fusedloss.triton_kernels import _common  # noqa: E402

import triton_capture as tc  # noqa: E402
from conftest import HAS_CUDA, HAS_TRITON, assert_exactly_as_oracle, assert_matches_oracle

pytestmark = pytest.mark.triton

TRITON_SPECS = [spec for spec in registry() if "triton" in spec.backends]
KERNEL_MODULES = [m for m in tc.MODULES if m != "_common"]


def _all_kernels() -> set:
    """"module.kernel" of every kernel (a jit function named *_kernel) of the kernel modules."""
    names = set()
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"{tc.PACKAGE}.{module_name}")
        names |= {f"{module_name}.{name}" for name, value in vars(module).items()
                  if name.endswith("_kernel") and hasattr(value, "fn")}
    return names


@contextlib.contextmanager
def guarded_launches():
    """Within the block, launches run as usual, and each is recorded as (kernel, the devices
    that the guard was entered with around it, or None outside any guard)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    records = []
    active = []

    @contextlib.contextmanager
    def fake_device_context(device):
        active.append(torch.device(device))
        try:
            yield
        finally:
            active.pop()

    original = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def recording_run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            tensors = {a.device for a in args if isinstance(a, torch.Tensor)}
            records.append((f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}",
                            tuple(active) or None, tensors))
        return original[type(self)](self, *args, grid=grid, warmup=warmup, **kwargs)

    saved = _common.device_context
    _common.device_context = fake_device_context
    for cls in original:
        cls.run = recording_run
    try:
        yield records
    finally:
        _common.device_context = saved
        for cls, run in original.items():
            cls.run = run


def test_every_launch_enters_the_device_of_its_tensors():
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    device = "cuda" if HAS_CUDA else "cpu"
    with guarded_launches() as records:
        for spec in TRITON_SPECS:
            for sample in spec.samples(device):
                tc.run_sample(spec, sample)
    assert records, "no Triton launch at all"
    unguarded = sorted({kernel for kernel, guard, _ in records if guard is None})
    assert not unguarded, f"launched outside _common.launch's device guard: {unguarded}"
    wrong = sorted({(kernel, str(guard), str(devices)) for kernel, guard, devices in records
                    if len(guard) != 1 or {guard[0]} != devices})
    assert not wrong, f"guard entered with another device than the tensors': {wrong}"
    missed = _all_kernels() - {kernel for kernel, _, _ in records}
    assert not missed, f"kernels that no Triton spec sample launches: {sorted(missed)}"


def test_device_context_makes_the_cuda_device_current():
    context = _common.device_context(torch.device("cuda", 1))
    assert isinstance(context, torch.cuda.device) and context.idx == 1
    assert isinstance(_common.device_context(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(_common.device_context(torch.device("meta")), contextlib.nullcontext)


def test_launchers_reject_tensors_on_two_devices():
    from fusedloss.triton_kernels import margin, pairs

    cos, target = torch.rand(4, 6), torch.tensor([0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="target is on meta but cos is on cpu"):
        margin.margin_cross_entropy(cos, target.to("meta"), None, None, 16.0, 1.0, 0.5, 0.0,
                                    False, 0.0, 0.0, -100, True)
    x, labels = torch.randn(4, 8), torch.tensor([0, 1, 0, 1])
    with pytest.raises(RuntimeError, match="ref is on meta but x is on cpu"):
        pairs.pair_extrema(x, labels, x.to("meta"), labels, 0, -1, 0)


@pytest.mark.gpu
def test_ops_on_the_second_gpu_while_the_first_is_current():
    if not HAS_CUDA or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices: the Triton ops run on cuda:1 while cuda:0 is "
                    "current")
    for spec in TRITON_SPECS:
        sample = spec.samples("cuda:1")[0]
        with torch.cuda.device(0):
            if spec.differentiable:
                assert_matches_oracle(spec.call(sample), "triton", sample.inputs, sample.names)
            else:
                assert_exactly_as_oracle(spec.call(sample), "triton", sample.inputs)
            torch.cuda.synchronize(1)
            assert torch.cuda.current_device() == 0, spec.name
