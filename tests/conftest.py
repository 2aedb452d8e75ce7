"""Shared test helpers: tolerances by dtype, the backends to test, devices, and the drivers
that run a loss and its fp64 reference and compare the loss and the gradients.

A loss under test is given as a `call(backend, *inputs)` that returns the loss; every
floating-point input becomes a fresh leaf that takes a gradient, integer inputs (targets,
labels) pass through, and None stands for an absent optional tensor (its gradient is None)."""
import os

import torch

# Without a GPU, Triton kernels run on CPU tensors under the interpreter. Triton reads the
# variable when a kernel is defined, so it is set before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402


HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Relative tolerance of a result computed in `dtype`, against an fp64 oracle run on the
# same (rounded) inputs. fp16/bf16 results are rounded to 11 and 8 significant bits.
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REDUCTIONS = ["mean", "sum", "none"]
# No row, some rows or every row of a batch of 6 rows ignored.
IGNORED_ROWS_OF_6 = pytest.mark.parametrize("ignored", [(), (1, 4), (0, 1, 2, 3, 4, 5)],
                                            ids=["none", "some", "all"])

# The margin variants that the logit-level and the fused linear margin ops are both tested
# with; each test file adds its own.
MARGIN_VARIANTS = {
    "arcface": dict(m2=0.5),
    "cosface": dict(m3=0.35),
    "sphereface": dict(m1=1.35),
    "combined": dict(m1=1.0, m2=0.3, m3=0.2),
    "arcface_detached": dict(m2=0.5, margin_grad="detached"),
    "elastic_arc_plus": dict(m2=0.5, m2_std=0.0175, elastic_plus=True),
    "elastic_cos": dict(m3=0.35, m3_std=0.05),
    "smoothing": dict(m2=0.5, label_smoothing=0.1),
    "z_loss_term": dict(m2=0.5, lse_square_scale=1e-4),
    "z_loss_term_smoothing": dict(m3=0.35, label_smoothing=0.1, lse_square_scale=1e-2),
}


def assert_close(actual, expected, dtype, what=""):
    """`actual` equals the fp64 `expected` within the tolerance of `dtype`, measured against
    the largest magnitude of `expected` (so a gradient full of tiny softmax entries is
    judged against its target column). NaN must match NaN."""
    tol = TOLERANCE[dtype]
    expected = expected.double()
    magnitude = float(expected.abs().nan_to_num(0.0).max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * max(1.0, magnitude),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def _is_float(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def loss_and_grads(call, backend, inputs, upstream=torch.ones_like):
    """(loss, gradient of each floating-point or None input) of `call(backend, *inputs)`,
    backpropagated from `upstream(loss)` (all ones unless given)."""
    args = [t.detach().clone().requires_grad_() if _is_float(t) else t for t in inputs]
    loss = call(backend, *args)
    loss.backward(upstream(loss))
    grads = [None if a is None else a.grad for a in args if a is None or _is_float(a)]
    return (loss.detach(), *grads)


def _oracle_copy(t):
    if t is None:
        return None
    return t.detach().double().cpu() if _is_float(t) else t.cpu()


def oracle(call, inputs, upstream=torch.ones_like):
    """loss_and_grads of the reference backend on fp64 CPU copies of the inputs."""
    return loss_and_grads(call, "reference", [_oracle_copy(t) for t in inputs], upstream)


def assert_matches_oracle(call, backend, inputs, names=("loss", "grad"), upstream=torch.ones_like):
    """The loss and gradients of `backend` have the dtype of the first input and agree with
    the fp64 oracle within that dtype's tolerance; `names` labels them (loss first)."""
    dtype = inputs[0].dtype
    got = loss_and_grads(call, backend, inputs, upstream)
    want = oracle(call, inputs, upstream)
    for g, e, what in zip(got, want, names):
        if e is None:
            assert g is None, what
            continue
        assert g.dtype == dtype, what
        assert_close(g.cpu(), e, dtype, what)


def assert_exactly_as_oracle(call, backend, inputs):
    """The integer outputs (a tensor or a tuple of them) of `backend` equal those of the
    reference backend on fp64 CPU copies of the inputs."""
    got = call(backend, *inputs)
    want = call("reference", *[_oracle_copy(t) for t in inputs])
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g.cpu(), w), f"output {k}: {g} != {w}"


def scores_drivers(make_call):
    """run(scores, target, backend, **options) -> (loss, d loss / d scores) and
    check_against_oracle(scores, target, backend, **options) for a loss of [N, C] scores and
    class targets whose call `make_call(**options)` builds."""
    def run(scores, target, backend, **options):
        return loss_and_grads(make_call(**options), backend, (scores, target))

    def check_against_oracle(scores, target, backend, **options):
        assert_matches_oracle(make_call(**options), backend, (scores, target))
    return run, check_against_oracle


def assert_gradcheck(call, backend, inputs):
    """torch.autograd.gradcheck of call(backend, *inputs) in its fp64 floating-point inputs."""
    positions = [i for i, t in enumerate(inputs) if _is_float(t)]

    def loss_of(*leaves):
        args = list(inputs)
        for i, leaf in zip(positions, leaves):
            args[i] = leaf
        return call(backend, *args)

    leaves = [inputs[i].detach().requires_grad_() for i in positions]
    assert torch.autograd.gradcheck(loss_of, leaves)


NON_CONTIGUOUS_LAYOUTS = ["row_strided", "column_strided", "transposed"]


def non_contiguous(base, layout):
    """The values of the 2-D `base` in one of NON_CONTIGUOUS_LAYOUTS: rows with a stride of
    twice their length, columns with a stride of 2, or column-major."""
    n, c = base.shape
    if layout == "row_strided":
        view = torch.cat([base, base], dim=1)[:, :c]
    elif layout == "column_strided":
        view = torch.stack([base, base], dim=2).reshape(n, 2 * c)[:, ::2]
    else:
        view = base.t().contiguous().t()
    assert not view.is_contiguous()
    return view


def assert_ignored_rows_count_for_nothing(call, backend, inputs, ignored, reduction):
    """Ignored rows get a zero gradient; with every row ignored the "mean" loss is NaN and
    the "sum" and per-row losses are 0, as with F.cross_entropy."""
    loss, grad = loss_and_grads(call, backend, inputs)
    assert torch.all(grad[list(ignored)] == 0)
    if len(ignored) == grad.shape[0]:
        assert math.isnan(loss) if reduction == "mean" else torch.all(loss == 0)


def nan_rows_loss_and_grad(call_for, backend, scores, target):
    """Puts NaN in a non-target column of row 1, in the target column of row 2 and in row 3,
    which `target` ignores; asserts that the loss is NaN in rows 1 and 2 only, that the
    ignored row has loss and gradient 0 and that the mean is NaN. `call_for(reduction)` is
    the call; returns the per-row losses and the gradient."""
    scores[1, (target[1] + 1) % scores.shape[1]] = float("nan")
    scores[2, target[2]] = float("nan")
    scores[3, 0] = float("nan")
    loss, grad = loss_and_grads(call_for("none"), backend, (scores, target))
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isfinite(loss[0]) and loss[3] == 0
    assert torch.isfinite(grad[0]).all() and torch.all(grad[3] == 0)
    mean = loss_and_grads(call_for("mean"), backend, (scores, target))[0]
    assert torch.isnan(mean)
    return loss, grad


def assert_autocast_gives_fp32_loss(call, backend, inputs, device):
    """Under bf16 autocast the loss is fp32 (as F.cross_entropy's) and the gradient of the
    bf16 scores bf16, both within bf16 tolerance of the fp64 oracle."""
    x = inputs[0].clone().requires_grad_()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = call(backend, x, *inputs[1:])
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    want_loss, want_grad = oracle(call, inputs)
    assert_close(loss.detach().cpu(), want_loss, torch.bfloat16, "loss")
    assert_close(x.grad.cpu(), want_grad, torch.bfloat16, "grad")


def assert_no_grad_matches_oracle(call, backend, inputs):
    """Under torch.no_grad (no gradient kept) the loss is the oracle's."""
    with torch.no_grad():
        loss = call(backend, *inputs)
    want = oracle(call, inputs)[0]
    assert_close(loss.cpu(), want, inputs[0].dtype, "loss")


def assert_second_backward_scales(call, backend, inputs):
    """A second backward through the same per-row losses, with an incoming gradient three
    times the first, gives three times the first gradient (the gradient is recomputed, not
    reused after the first backward spent it)."""
    x = inputs[0].clone().requires_grad_()
    loss = call(backend, x, *inputs[1:])
    weights = torch.arange(1.0, loss.numel() + 1, device=x.device)
    (first,) = torch.autograd.grad(loss, x, weights, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x, weights * 3)
    assert_close(second, 3 * first, x.dtype, "second backward")


def assert_auto_backend_is_cpu(call, inputs):
    """On CPU tensors backend="auto" gives exactly what the cpu backend gives."""
    assert torch.equal(call("auto", *inputs), call("cpu", *inputs))


def assert_empty_batch_like_cross_entropy(loss_for):
    """`loss_for(reduction)` of an empty batch: 0 for "sum" and NaN for "mean", as
    F.cross_entropy gives, and an empty tensor for "none"."""
    empty_scores, empty_target = torch.rand(0, 7), torch.zeros(0, dtype=torch.long)
    want_sum = torch.nn.functional.cross_entropy(empty_scores, empty_target, reduction="sum")
    want_mean = torch.nn.functional.cross_entropy(empty_scores, empty_target, reduction="mean")
    assert loss_for("sum").item() == want_sum.item() == 0.0
    assert torch.isnan(loss_for("mean")) and torch.isnan(want_mean)
    assert loss_for("none").shape == (0,)


def clustered_data(classes, dim, n, centre_scale, noise, device):
    """(points in fp64, labels) on `device`: n points, each a random one of `classes` centres
    drawn with spread `centre_scale`, plus noise of spread `noise`; the same for every call."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=gen) * centre_scale
    labels = torch.randint(0, classes, (n,), generator=gen)
    points = centres[labels] + noise * torch.randn(n, dim, generator=gen)
    return points.double().to(device), labels.to(device)


def small_mlp(dim_in, dim_out, device):
    """Linear(dim_in, 32), ReLU, Linear(32, dim_out) in fp64 on `device`: the network below a
    loss in the convergence tests."""
    return torch.nn.Sequential(torch.nn.Linear(dim_in, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, dim_out)).double().to(device)


def sgd_loss_curve(loss_of_step, parameters, lr, steps):
    """The loss of each of `steps` plain SGD steps on `parameters`."""
    opt = torch.optim.SGD(parameters, lr=lr)
    curve = []
    for _ in range(steps):
        loss = loss_of_step()
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return torch.tensor(curve)


def assert_curves_agree(fused, reference, tol):
    """Training with the fused op halves the loss, and its loss curve is the reference's."""
    assert fused[-1] < 0.5 * fused[0]
    torch.testing.assert_close(fused, reference, rtol=tol, atol=tol)


def assert_compiled_matches_eager(step, inputs, names, differentiable=True):
    """torch.compile(step, fullgraph=True) on `inputs` (its floating-point ones require grad)
    gives the eager loss and gradients, within fp32 tolerance; `names` labels them. A step
    that is not differentiable (integer outputs) gives exactly the eager outputs."""
    torch._dynamo.reset()
    if not differentiable:
        compiled, eager = torch.compile(step, fullgraph=True)(*inputs), step(*inputs)
        for k, (got, want) in enumerate(zip(compiled, eager)):
            assert torch.equal(got, want), f"output {k}"
        return
    leaves = [t for t in inputs if _is_float(t)]
    loss = torch.compile(step, fullgraph=True)(*inputs)
    loss.backward()
    compiled = [loss.detach()] + [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    eager = step(*inputs)
    eager.backward()
    for got, want, what in zip(compiled, [eager.detach()] + [t.grad for t in leaves], names):
        assert_close(got, want.double(), torch.float32, what)


def bad_input_params(cases):
    """pytest params (args, kwargs, exception, message) of (id, args, kwargs, exception,
    message) cases."""
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


def scores_and_target_bad_inputs(scores):
    """The bad-input cases shared by the losses of [N, C] `scores` (their name in messages)
    and class targets: the scores' rank, dtype and type, the target's dtype, shape and range,
    the options that every such loss takes, and devices."""
    def ok_target(n):
        return torch.zeros(n, dtype=torch.long)

    def with_target(target):
        return lambda: (torch.rand(2, 3), target)

    plain = with_target(ok_target(2))
    cases = [
        (f"1-D {scores}", lambda: (torch.rand(5), ok_target(5)), {}, ValueError,
         f"{scores} must be 2-D"),
        (f"3-D {scores}", lambda: (torch.rand(2, 3, 4), ok_target(2)), {}, ValueError,
         f"{scores} must be 2-D"),
        (f"integer {scores}", lambda: (torch.ones(2, 3, dtype=torch.long), ok_target(2)), {},
         TypeError, f"{scores} must be float16, bfloat16, float32 or float64"),
        (f"{scores} not a tensor", lambda: ([[0.1, 0.2]], ok_target(1)), {}, TypeError,
         f"{scores} must be a tensor"),
        ("float target", with_target(torch.zeros(2)), {}, TypeError, "integer class indices"),
        ("bool target", with_target(torch.zeros(2, dtype=torch.bool)), {}, TypeError,
         "integer class indices"),
        ("2-D target", with_target(torch.zeros(2, 1, dtype=torch.long)), {}, ValueError,
         r"target must have shape \[2\]"),
        ("short target", lambda: (torch.rand(4, 3), ok_target(3)), {}, ValueError,
         r"target must have shape \[4\]"),
        ("negative target", lambda: (torch.rand(4, 3), torch.tensor([0, -1, 2, 2])), {},
         ValueError, r"target\[1\] = -1 is outside \[0, 3\)"),
        ("unknown reduction", plain, dict(reduction="avg"), ValueError, "unknown reduction 'avg'"),
        ("unknown backend", plain, dict(backend="tpu"), ValueError, "unknown backend 'tpu'"),
        ("float ignore_index", plain, dict(ignore_index=-1.0), TypeError,
         "ignore_index must be an int"),
        (f"meta target with cpu {scores}", with_target(ok_target(2).to("meta")), {},
         RuntimeError, "must be on one device"),
    ]
    if HAS_CUDA:
        cases += [
            ("cpu and cuda mixed", with_target(ok_target(2).cuda()), {}, RuntimeError,
             "must be on one device"),
            ("cpu backend on cuda", lambda: (torch.rand(2, 3, device="cuda"), ok_target(2).cuda()),
             dict(backend="cpu"), ValueError, "runs on cpu tensors"),
        ]
    else:
        cases.append(("cuda backend without CUDA", plain, dict(backend="cuda"), RuntimeError,
                      "backend 'cuda' is not available"))
    return cases


def device_backends():
    """(backend, device) pairs that this machine can test against the reference."""
    pairs = [pytest.param("cpu", "cpu", id="cpu")]
    if HAS_TRITON:
        dev = "cuda" if HAS_CUDA else "cpu"
        pairs.append(pytest.param("triton", dev, id="triton", marks=pytest.mark.triton))
    pairs.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu))
    return pairs


def cpu_and_gpu_backends(gpu_backends=("cuda", "triton")):
    """(backend, device) pairs: the cpu backend on CPU tensors, then each of `gpu_backends` on
    CUDA tensors (marked gpu: skipped without a CUDA device)."""
    gpu = [pytest.param(backend, "cuda", id=backend, marks=pytest.mark.gpu)
           for backend in gpu_backends]
    return [pytest.param("cpu", "cpu", id="cpu")] + gpu


def pytest_collection_modifyitems(config, items):
    """Skips the tests marked triton without Triton and those marked gpu without CUDA."""
    if not HAS_TRITON:
        skip = pytest.mark.skip(reason="Triton is not installed")
        for item in items:
            if "triton" in item.keywords:
                item.add_marker(skip)
    if not HAS_CUDA:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spec_backends(specs, gpu_only=False):
    """pytest params (spec, backend, device): every spec with every backend of device_backends()
    that has its kernels (spec.backends); with gpu_only, its GPU backends on CUDA tensors."""
    params = []
    for spec in specs:
        pairs = cpu_and_gpu_backends(("cuda", "triton"))[1:] if gpu_only else device_backends()
        for p in pairs:
            backend, device = p.values
            if backend in spec.backends:
                params.append(pytest.param(spec, backend, device, id=f"{spec.name}-{p.id}",
                                           marks=p.marks))
    return params


class ScoresLossContract:
    """The tests that every loss of scores [N, C] and class targets [N] passes, whatever its
    math, on every backend of device_backends(): the oracle under every reduction with
    ignored rows, non-contiguous scores, autocast, no gradient, a second backward, the auto
    backend and an empty batch. A test module subclasses it in a class named Test... (which
    pytest collects) and sets

        loss       loss(**options) -> call(backend, scores, target)
        inputs     inputs(n, c, dtype, device, ignore=()) -> (scores, target), the rows in
                   `ignore` ignored
        options    the keywords of the calls (a typical configuration of the loss)
    """

    options: dict = {}

    def call(self, **options):
        """The loss with the class's options, `options` taking precedence."""
        return self.loss(**{**self.options, **options})

    @pytest.mark.parametrize("backend,device", device_backends())
    @pytest.mark.parametrize("reduction", REDUCTIONS)
    @IGNORED_ROWS_OF_6
    def test_reductions_and_ignored_rows(self, backend, device, reduction, ignored):
        inputs = self.inputs(6, 40, torch.float32, device, ignore=ignored)
        call = self.call(reduction=reduction)
        assert_matches_oracle(call, backend, inputs)
        assert_ignored_rows_count_for_nothing(call, backend, inputs, ignored, reduction)

    @pytest.mark.parametrize("backend,device", device_backends())
    @pytest.mark.parametrize("layout", NON_CONTIGUOUS_LAYOUTS)
    def test_non_contiguous_scores(self, backend, device, layout):
        base, target = self.inputs(6, 90, torch.float32, device)
        assert_matches_oracle(self.call(), backend, (non_contiguous(base, layout), target))

    @pytest.mark.parametrize("backend,device", device_backends())
    def test_autocast_gives_fp32_loss(self, backend, device):
        inputs = self.inputs(4, 40, torch.bfloat16, device)
        assert_autocast_gives_fp32_loss(self.call(), backend, inputs, device)

    @pytest.mark.parametrize("backend,device", device_backends())
    def test_no_gradient_path(self, backend, device):
        assert_no_grad_matches_oracle(self.call(), backend,
                                      self.inputs(4, 40, torch.float32, device))

    @pytest.mark.parametrize("backend,device", device_backends())
    def test_second_backward_recomputes_the_spent_gradient(self, backend, device):
        assert_second_backward_scales(self.call(reduction="none"), backend,
                                      self.inputs(4, 40, torch.float32, device))

    def test_auto_backend_picks_cpu_for_cpu_tensors(self):
        assert_auto_backend_is_cpu(self.call(), self.inputs(3, 10, torch.float32))

    def test_empty_batch_behaves_like_cross_entropy(self):
        scores = torch.rand(0, 5, requires_grad=True)
        target = torch.zeros(0, dtype=torch.long)
        assert_empty_batch_like_cross_entropy(
            lambda reduction: self.call(reduction=reduction)("auto", scores, target))
