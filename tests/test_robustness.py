"""Robustness of every public op: numerical stress at the edges, threads, memory growth.

Stress: scale 64 with fp16 / bf16 inputs, target cosines of exactly 1 and -1 and where
theta + m crosses pi, rows of equal logits, logits of magnitude 1e4, tiny spreads: no NaN or
Inf where the fp64 reference is finite, and the values agree with it; a NaN in a row that
counts reaches the loss. Threads: several Python threads calling an op at once give what
serial calls give. Memory: a thousand forward and backward calls do not grow the resident set.
"""
import gc
import threading

import pytest
import torch

import fusedloss
from fusedloss import specs

from conftest import assert_close, device_backends, loss_and_grads, oracle

LOW_PRECISION = [torch.float16, torch.bfloat16]


def _call(fn, **kw):
    """call(backend, *tensors) of the public op `fn` with options `kw`."""
    return lambda backend, *tensors: fn(*tensors, backend=backend, **kw)


def _against_fp64_reference(fn, tensors, backend, **kw):
    """Every output finite where the fp64 reference is finite and fits the dtype, within the
    dtype's tolerance of it there, and an overflow (+-inf) exactly where the reference's
    value exceeds the dtype's range (a spherical Z-loss gradient of 1e11 in fp16)."""
    dtype = tensors[0].dtype
    got = loss_and_grads(_call(fn, **kw), backend, tensors)
    want = oracle(_call(fn, **kw), tensors)
    for g, w, what in zip(got, want, ("loss", "grad 0", "grad 1")):
        g = g.cpu()
        assert torch.isfinite(w).all(), f"{what}: the reference itself is not finite"
        fits = w.abs() <= torch.finfo(g.dtype).max
        assert torch.isfinite(g[fits]).all(), f"{what}: not finite where the reference is"
        assert torch.equal(torch.isinf(g[~fits]).double() * w[~fits].sign(),
                           g[~fits].sign().double()), f"{what}: no overflow where expected"
        assert_close(g[fits], w[fits], dtype, what)


def _edge_cosines(n, c, dtype, device):
    """Target cosines exactly 1 and -1, at -0.9 (theta + 0.5 > pi) and near the clamp edges;
    the rest uniform in (-1, 1)."""
    cos = torch.rand(n, c, dtype=torch.float64) * 2 - 1
    target = torch.arange(n) % c
    for row, value in enumerate((1.0, -1.0, -0.9, 0.9999, -0.9999, 0.0)[:n]):
        cos[row, target[row]] = value
    return cos.to(dtype).to(device), target.to(device)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("margins", [dict(m2=0.5), dict(m1=1.35), dict(m1=1.0, m2=0.3, m3=0.2),
                                     dict(m3=0.35)], ids=["arc", "sphere", "combined", "cos"])
def test_margin_scale_64_low_precision_edges(backend, device, dtype, margins):
    cos, target = _edge_cosines(6, 300, dtype, device)
    _against_fp64_reference(fusedloss.margin_cross_entropy, [cos, target], backend,
                            scale=64.0, reduction="none", **margins)


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float32], ids=str)
def test_margin_linear_scale_64_low_precision(backend, device, dtype):
    x = torch.randn(9, 24, dtype=torch.float64)
    w = torch.randn(70, 24, dtype=torch.float64)
    target = torch.randint(0, 70, (9,))
    # (Exact target cosines of +-1 are the logit-level test's: through a matmul they arrive
    # as 1 - ulp, where arccos turns fp32 rounding into a 1e-2 change of the target logit.)
    _against_fp64_reference(fusedloss.linear_margin_cross_entropy,
                            [x.to(dtype).to(device), w.to(dtype).to(device), target.to(device)],
                            backend, scale=64.0, m2=0.5, reduction="none")


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION, ids=str)
def test_all_logits_equal(backend, device, dtype):
    cos = torch.full((4, 257), 0.25, dtype=dtype, device=device)
    target = torch.tensor([0, 1, 100, 256], device=device)
    _against_fp64_reference(fusedloss.margin_cross_entropy, [cos, target], backend,
                            scale=64.0, m3=0.35, reduction="none")
    _against_fp64_reference(fusedloss.spherical_z_loss, [cos + 0, target], backend,
                            reduction="none")


@pytest.mark.parametrize("backend,device", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_of_magnitude_1e4(backend, device, dtype):
    logits = (torch.randn(5, 129, dtype=torch.float64) * 1e4).to(dtype).to(device)
    target = torch.randint(0, 129, (5,), device=device)
    _against_fp64_reference(fusedloss.spherical_z_loss, [logits, target], backend,
                            reduction="none")
    # cross-entropy of logits 1e4 apart: scale 1e4 on cosines in (-1, 1), no margin
    cos = torch.rand(5, 129, dtype=torch.float64).mul(2).sub(1).to(dtype).to(device)
    _against_fp64_reference(fusedloss.margin_cross_entropy, [cos, target], backend,
                            scale=1e4, reduction="none")


@pytest.mark.parametrize("backend,device", device_backends())
def test_spherical_tiny_spread(backend, device):
    logits = (3.0 + 1e-3 * torch.randn(4, 100, dtype=torch.float64)).float().to(device)
    target = torch.randint(0, 100, (4,), device=device)
    _against_fp64_reference(fusedloss.spherical_z_loss, [logits, target], backend,
                            reduction="none")


@pytest.mark.parametrize("backend,device", device_backends())
def test_nan_input_reaches_the_loss_of_its_row_only(backend, device):
    cos, target = _edge_cosines(4, 33, torch.float32, device)
    cos[1, 7] = float("nan")
    cos[2, 3] = float("nan")
    target[2] = -100  # ignored: its NaN must not leak
    for fn in (fusedloss.margin_cross_entropy, fusedloss.spherical_z_loss):
        loss = fn(cos, target, backend=backend, reduction="none")
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all(), fn.__name__
        assert torch.isnan(fn(cos, target, backend=backend, reduction="mean"))


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", device_backends())
def test_more_than_2_31_elements(backend, device):
    """bf16 cos [160, 2^24] (2^31.3 elements, 5 GiB): every row's loss and a gradient entry
    far past 2^31 agree with the reference of the same rows, so no index wrapped."""
    n, c = 160, 1 << 24
    cos = torch.empty(n, c, dtype=torch.bfloat16, device=device)
    for row in cos:  # row by row: a whole-tensor uniform_ may draw in fp32 first (10 GiB)
        row.uniform_(-1, 1)
    target = torch.randint(0, c, (n,), device=device)
    target[-1] = c - 1
    cos.requires_grad_()
    loss = fusedloss.margin_cross_entropy(cos, target, backend=backend, m2=0.5, reduction="none")
    loss.sum().backward()
    for row in (0, n // 2, n - 1):
        x = cos.detach()[row:row + 1].double().cpu().requires_grad_()
        want = fusedloss.margin_cross_entropy(x, target[row:row + 1].cpu(), backend="reference",
                                              m2=0.5, reduction="none")
        want.sum().backward()
        assert_close(loss[row:row + 1].cpu(), want.detach(), torch.bfloat16, f"loss of row {row}")
        cols = torch.tensor([0, c // 2, int(target[row]), c - 1])
        assert_close(cos.grad[row, cols.to(device)].cpu(), x.grad[0, cols], torch.bfloat16,
                     f"gradient of row {row}")


def _ops_for(backend, device):
    """(name, call) of every stress sample of every spec with kernels on `backend`, each call
    returning the loss and gradients of its fixed inputs."""
    calls = {}
    for spec in specs.registry():
        if backend in spec.backends:
            for sample in spec.stress(device):
                calls[f"{spec.name}: {sample.id}"] = (
                    lambda spec=spec, sample=sample:
                    loss_and_grads(spec.call(sample), backend, sample.inputs))
    assert calls, f"no stress samples for {backend}"
    return calls


@pytest.mark.parametrize("backend,device", device_backends())
def test_threads_give_the_serial_results(backend, device):
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter keeps the launch grid in global state, so it runs "
                    "one kernel at a time; compiled Triton (GPU) is tested")
    ops = _ops_for(backend, device)
    serial = {name: call() for name, call in ops.items()}
    results, errors = {}, []

    def worker(k):
        try:
            for name, call in ops.items():
                results[(k, name)] = call()
        except BaseException as exc:  # reported below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (k, name), outs in results.items():
        for got, want in zip(outs, serial[name]):
            assert torch.equal(got, want), f"{name} in thread {k} differs from the serial call"


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("backend,device", [p for p in device_backends() if p.id == "cpu"])
def test_repeated_calls_do_not_grow_memory(backend, device):
    ops = _ops_for(backend, device)
    for call in ops.values():  # warm-up: allocator pools, lazy registrations
        for _ in range(50):
            call()
    gc.collect()
    before = _resident_bytes()
    for _ in range(1000):
        for call in ops.values():
            call()
    gc.collect()
    grown = _resident_bytes() - before
    # One call's tensors are ~40 KiB; a leak of one of them per call would be 40 MiB.
    assert grown < 8 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over 1000 calls"


def _reset_peak_resident() -> int:
    """Resets the resident high-water mark (Linux) and returns the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _resident_bytes()


def _peak_resident() -> int:
    with open("/proc/self/status") as f:
        line = next(row for row in f if row.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_backward_scales_a_bf16_gradient_without_a_full_size_copy():
    """Regression: an in-place mul_ of a bf16 gradient by the fp32 incoming gradient made a
    temporary of the whole gradient in fp32 (twice its size), so that the > 2^31 test ran
    out of memory in backward. The scaling goes in row chunks now."""
    cos = torch.rand(64, 1 << 21, dtype=torch.bfloat16).requires_grad_()  # 256 MiB
    target = torch.randint(0, cos.shape[1], (64,))
    loss = fusedloss.margin_cross_entropy(cos, target, m2=0.5, reduction="none", backend="cpu")
    before = _reset_peak_resident()
    loss.backward(torch.rand(64))
    grown = _peak_resident() - before
    # The full-size temporary alone was 512 MiB; the process noise of one backward is ~40 MiB.
    assert grown < 128 << 20, f"backward used {grown / 2**20:.0f} MiB beyond the gradient"
