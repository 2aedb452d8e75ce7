"""No host synchronisation in a loss call on a device (DESIGN.md, Testing): a loss call never
waits for the GPU, so CUDA graphs can capture it and the pipeline never stalls. The
functions that synchronise by nature say why in their spec (`OpSpec.host_sync`: the sharded
ops' collectives and error agreement, the miner's data-dependent output size).

Without a GPU: every other public function runs forward and backward on `meta` tensors,
which hold no values, so any read of one (`.item()`, `bool()`, `.tolist()`, `nonzero`)
raises; its checks then take the path of a device tensor, as on CUDA. With a GPU: the same
samples run on CUDA under `torch.cuda.set_sync_debug_mode("error")`, and a target out of
range raises at the next synchronisation."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fusedloss import _checks, specs

from conftest import spec_backends

NO_SYNC = [s for s in specs.registry() if not s.host_sync]


def test_every_synchronising_function_says_why():
    for spec in specs.registry():
        assert spec.host_sync or spec in NO_SYNC


def test_target_check_reads_no_value_of_a_device_tensor():
    """On a tensor that is not on the CPU the range check is queued on the device: a meta
    target (no values at all) passes through it, where a read would raise."""
    target = torch.tensor([0, 1, 5, -100], device="meta")
    _checks.target_values("f", target, 3, -100)


def _on_meta(sample):
    return [None if t is None else
            t.detach().to("meta").requires_grad_(t.is_floating_point()) for t in sample.inputs]


@pytest.mark.parametrize("spec", NO_SYNC, ids=lambda s: s.name)
def test_forward_and_backward_read_no_device_value(spec):
    for sample in spec.samples("cpu"):
        inputs = _on_meta(sample)
        loss = spec.function(*inputs, backend="auto", **sample.kwargs)
        if spec.differentiable:
            loss.sum().backward()
            for t in inputs:
                if t is not None and t.is_floating_point():
                    assert t.grad is not None and t.grad.shape == t.shape, sample.id


@pytest.mark.parametrize("spec,backend,device", spec_backends(NO_SYNC, gpu_only=True))
def test_no_sync_on_cuda(spec, backend, device):
    for sample in spec.samples(device):
        inputs = [None if t is None else t.detach().requires_grad_(t.is_floating_point())
                  for t in sample.inputs]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = spec.function(*inputs, backend=backend, **sample.kwargs)
            if spec.differentiable:
                loss.sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_a_bad_target_on_cuda_fails_at_the_next_synchronisation():
    """In a child process: a device-side assertion leaves its CUDA context unusable."""
    script = textwrap.dedent("""
        import torch, fusedloss
        cos = torch.rand(4, 7, device="cuda")
        target = torch.tensor([0, 1, 2, 7], device="cuda")
        loss = fusedloss.margin_cross_entropy(cos, target)  # returns without waiting
        try:
            torch.cuda.synchronize()
        except RuntimeError as exc:
            print("raised:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "CUDA_LAUNCH_BLOCKING": "0"})
    assert "raised:" in out.stdout, out.stdout + out.stderr
