"""The kernels' own argument checks, reached by calling torch.ops.fusedloss.<op> directly
(the public functions check first, in python/fusedloss/_checks.py). Every backend raises the
same exception type for the same bad input, the one the Python checks raise: a bad shape or
value ValueError, a bad dtype TypeError, a bad device RuntimeError."""
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import fusedloss  # noqa: F401  (makes every Op)
from fusedloss import _ops, _schemas, specs

from conftest import HAS_CUDA, HAS_TRITON

BAD = specs.kernel_bad_inputs()
IDS = [f"{case.op}-{case.id}" for case in BAD]


def call(fn, case, device: str = "cpu"):
    """fn (an implementation of fusedloss::<op>) on the family's valid arguments of the op
    with the case's replacing some, every tensor on `device`, passed in schema order."""
    op = case.op
    args = dict(specs.kernel_arguments(op), **case.bad())
    schema = getattr(torch.ops.fusedloss, op).default._schema
    values = [args[a.name] for a in schema.arguments]
    return fn(*[v.to(device) if isinstance(v, torch.Tensor) else v for v in values])


def test_every_op_has_bad_shapes_and_dtypes():
    for op in _schemas.SCHEMAS:
        kinds = {case.exception for case in BAD if case.op == op}
        assert {ValueError, TypeError} <= kinds, \
            f"fusedloss::{op}: give its valid arguments in its family's kernel_arguments()"


@pytest.mark.parametrize("case", BAD, ids=IDS)
def test_cpu_kernel(case):
    with pytest.raises(case.exception, match=case.message):
        call(getattr(torch.ops.fusedloss, case.op).default, case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [pytest.param(c, id=i) for c, i in zip(BAD, IDS)
                                  if not HAS_CUDA or "cuda" in _ops.kernel_backends(c.op)])
def test_cuda_kernel(case):
    with pytest.raises(case.exception, match=case.message):
        call(getattr(torch.ops.fusedloss, case.op).default, case, "cuda")


@pytest.mark.gpu
def test_cuda_kernel_rejects_a_cpu_target_as_a_device_error():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    # CUDA logits with a CPU target dispatch to the CUDA kernel, which names the devices.
    with pytest.raises(RuntimeError, match="target is on"):
        call(torch.ops.fusedloss.spherical_z_loss.default,
             specs.KernelBadInput("spherical_z_loss", "cpu target", lambda: dict(
                 logits=torch.randn(4, 6).cuda(), target=torch.tensor([0, 1, 2, 3])),
                 RuntimeError, ""))


def triton_twin(op_name: str):
    """The Triton implementation of `op_name`: the twin of its Op, or, for an op that mutates
    its input (no Op), its launcher, found by name in the Triton module of a family."""
    if op_name in _ops.OPS:
        return _ops.OPS[op_name].triton
    for family in sorted({op.family for op in _ops.OPS.values()}):
        module = importlib.import_module(f"fusedloss.triton_kernels.{family}")
        if hasattr(module, op_name):
            return getattr(module, op_name)
    raise KeyError(f"no Triton launcher named {op_name}")


def triton_outcomes() -> list:
    """[(op, exception type name or "no error", message)] of the Triton twin of each BAD case,
    on CUDA tensors, or on CPU ones under TRITON_INTERPRET=1 (run in a subprocess)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for case in BAD:
        try:
            call(triton_twin(case.op), case, device)
            out.append((case.op, "no error", ""))
        except Exception as exc:  # noqa: BLE001  (the parent compares the type)
            out.append((case.op, type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else ""))
    return out


_CHILD = """
import importlib.util, json, sys
sys.path.insert(0, sys.argv[2])
spec = importlib.util.spec_from_file_location("kernel_checks", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(module.triton_outcomes()))
"""


@pytest.mark.triton
def test_triton_op():
    """The Triton twins raise as the kernels do, with the same type and a message that names
    the argument (triton_kernels/_common.check_args). Run in a subprocess: an unchecked
    launcher may read past a short tensor."""
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    env = dict(os.environ)
    if not HAS_CUDA:
        env["TRITON_INTERPRET"] = "1"
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", _CHILD, __file__, here], capture_output=True,
                         text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    outcomes = json.loads(run.stdout.strip().splitlines()[-1])
    wrong = [f"{case_id}: {kind} {message}" for case_id, (_, kind, message), case
             in zip(IDS, outcomes, BAD)
             if kind != case.exception.__name__ or not re.search(case.message, message)]
    assert not wrong, "\n".join(wrong)
