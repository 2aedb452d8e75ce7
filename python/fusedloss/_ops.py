"""The op machinery: loading fusedloss._C, choosing a backend, registering each op once.

Adding an op takes one schema in python/fusedloss/_schemas.py, one kernel per backend, and
one `Op(...)` made in its family module, which gives it fake (meta) kernels for
torch.compile, autograd for every backend, and a Triton twin on first use. The schemas are
defined before _C is loaded, so all of this holds without the C++ kernels too: the
reference and Triton backends then run, and the compiled ones say why they cannot.
"""
import functools
import importlib
import importlib.util
import os
from typing import Callable, NamedTuple, Optional

import torch

from . import _schemas

try:
    from . import _C  # noqa: F401  (loading it registers the C++ kernels on the schemas)

    _C_ERROR = None
except ImportError as exc:  # the package is importable for its reference and Triton backends
    _C = None
    _C_ERROR = str(exc) or type(exc).__name__

try:
    from . import _build_info
except ImportError:
    _build_info = None

BACKENDS = ("reference", "cpu", "cuda", "triton")


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def _cpp_status() -> BackendStatus:
    if _C is None:
        return BackendStatus(False, f"fusedloss._C failed to load ({_C_ERROR}); reinstall with "
                                    "`pip install --no-build-isolation .` against this torch")
    return BackendStatus(True, "C++ kernels built")


def _cuda_status() -> BackendStatus:
    if _C is None:  # the CUDA kernels live in _C too
        return _cpp_status()
    if not _C.with_cuda:
        why = _build_info.CUDA_REASON if _build_info else "unknown"
        return BackendStatus(False, f"fusedloss was built without CUDA kernels ({why}); rebuild with "
                                    "FUSEDLOSS_CUDA=1 and a CUDA-enabled torch")
    if not torch.cuda.is_available():
        return BackendStatus(False, "CUDA kernels built, but no CUDA device is visible")
    return BackendStatus(True, "CUDA kernels built and a device is visible")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "Triton is not installed; `pip install triton`")
    if triton_interpreted():
        return BackendStatus(True, "Triton installed; TRITON_INTERPRET=1 runs it on CPU tensors")
    if not torch.cuda.is_available():
        return BackendStatus(False, "Triton is installed, but there is no CUDA device "
                                    "(set TRITON_INTERPRET=1 to run it on CPU tensors, slowly)")
    return BackendStatus(True, "Triton installed and a CUDA device is visible")


def backends() -> dict:
    """Which backends can run here, and why not: {name: BackendStatus(available, reason)}."""
    return {
        "reference": BackendStatus(True, "plain PyTorch, always available"),
        "cpu": _cpp_status(),
        "cuda": _cuda_status(),
        "triton": _triton_status(),
    }


def kernel_backends(op_name: str) -> frozenset:
    """The C++ backends ("cpu", "cuda") that fusedloss::<op_name> has a kernel for."""
    if _C is None:
        return frozenset()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(b for b in ("cpu", "cuda") if has(f"fusedloss::{op_name}", b.upper()))


def _missing_kernel(name: str) -> Callable:
    def kernel(*args, **kwargs):
        raise RuntimeError(f"fusedloss::{name} has no cpu or cuda kernel here: {_cpp_status().reason}")
    return kernel


if _C is None:
    # A direct call of torch.ops.fusedloss.<op> on CPU or CUDA tensors then says why there is
    # no kernel, instead of the dispatcher's generic NotImplementedError.
    for _name in _schemas.SCHEMAS:
        for _key in ("CPU", "CUDA"):
            _schemas.LIBRARY.impl(_name, _missing_kernel(_name), _key)


def _op_status(backend: str, op_name: Optional[str]) -> BackendStatus:
    """backends()[backend], narrowed to whether the C++ op `op_name` has a kernel there."""
    status = backends()[backend]
    if status.available and op_name and backend in ("cpu", "cuda"):
        if backend not in _KERNELS.get(op_name, frozenset()):
            return BackendStatus(False, f"{op_name} has no {backend} kernel")
    return status


def resolve_backend(requested: str, device: torch.device, op_name: Optional[str] = None) -> str:
    """The backend that runs op `op_name` on `device`: `requested`, checked, or the auto choice."""
    if requested not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {requested!r}; expected one of {('auto',) + BACKENDS}")
    if requested == "auto":
        order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        return next((name for name in order if _op_status(name, op_name).available), "reference")
    if requested == "reference":
        return requested
    status = _op_status(requested, op_name)
    if not status.available:
        raise RuntimeError(f"backend {requested!r} is not available: {status.reason}")
    wanted = {"cpu": ("cpu",), "cuda": ("cuda",),
              "triton": ("cuda", "cpu") if triton_interpreted() else ("cuda",)}[requested]
    if device.type not in wanted:
        raise ValueError(f"backend {requested!r} runs on {' or '.join(wanted)} tensors, "
                         f"got tensors on {device}")
    return requested


_KERNELS = {}  # op name -> kernel_backends(op name), filled when each Op is made
OPS = {}  # op name -> its Op, filled when each Op is made (importing fusedloss makes them all)


class Op:
    """One fusedloss op: the op of fusedloss._schemas (its CPU and CUDA kernels from _C, when
    loaded) and its lazily made Triton twin."""

    def __init__(self, family: str, name: str, *, fake: Callable,
                 setup_context: Optional[Callable] = None, backward: Optional[Callable] = None):
        self.family = family
        self.name = name
        OPS[name] = self
        _KERNELS[name] = kernel_backends(name)
        self._backward = backward
        self._setup_context = setup_context
        torch.library.register_fake(f"fusedloss::{name}")(fake)
        self._register_autograd(f"fusedloss::{name}", self.cpp)

    def _register_autograd(self, qualname: str, op) -> None:
        """Autograd for `op`; its setup_context leaves `op` on ctx for backward to recompute with.
        An op made without backward is not differentiable: its outputs never require grad
        (indices, statistics whose gradient another op computes)."""
        if self._backward is None:
            torch.library.register_autograd(qualname, _no_gradient,
                                            setup_context=_outputs_not_differentiable)
            return

        def setup_context(ctx, inputs, output):
            ctx.op = op
            self._setup_context(ctx, inputs, output)

        torch.library.register_autograd(qualname, self._backward, setup_context=setup_context)

    @property
    def cpp(self):
        return getattr(torch.ops.fusedloss, self.name).default

    @functools.cached_property
    def triton(self):
        """fusedloss::<name>_triton: the launcher in fusedloss.triton_kernels.<family> as a triton_op.

        Defined on first use so that importing fusedloss imports neither Triton nor dynamo.
        It takes the op's schema (fusedloss._schemas), so every backend shares one signature.
        """
        module = importlib.import_module(f"fusedloss.triton_kernels.{self.family}")
        launcher = getattr(module, self.name)
        schema = _schemas.SCHEMAS[self.name]
        schema = schema[schema.index("("):]
        op = torch.library.triton_op(f"fusedloss::{self.name}_triton", launcher,
                                     mutates_args=(), schema=schema)
        self._register_autograd(f"fusedloss::{self.name}_triton", op)
        return op

    def for_backend(self, backend: str):
        return self.triton if backend == "triton" else self.cpp


def _outputs_not_differentiable(ctx, inputs, output):
    ctx.num_inputs = len(inputs)
    outputs = output if isinstance(output, tuple) else (output,)
    ctx.mark_non_differentiable(*(t for t in outputs if isinstance(t, torch.Tensor)))


def _no_gradient(ctx, *grads):
    return (None,) * ctx.num_inputs


def compiling() -> bool:
    """True while torch.compile traces: checks that read tensor values are skipped then."""
    return torch.compiler.is_compiling()


def keep_fused_grads(ctx, grads, saved) -> None:
    """setup_context of an op whose kernel writes the gradient of each row's loss during
    forward (`grads`, non-differentiable outputs), with `saved` the inputs backward needs.

    Eager: the gradients stay off save_for_backward, so that backward may scale them in
    place (no second copy) and a later backward through the same graph (retain_graph=True,
    gradcheck) finds them spent and recomputes them. Traced (torch.compile, opcheck): they
    are ordinary saved tensors, scaled out of place."""
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)  # else autograd makes full-size zero "gradients" for them
    ctx.in_place = all(type(g) is torch.Tensor for g in grads) and not torch.compiler.is_compiling()
    if ctx.in_place:
        ctx.fused_grads = tuple(grads)
        ctx.save_for_backward(*saved)
    else:
        ctx.fused_grads = None
        ctx.save_for_backward(*saved, *grads)
    ctx.num_saved = len(saved)


def fused_grads(ctx):
    """(saved inputs, fused gradients or None) in backward; in eager mode the gradients are
    handed out once, and None afterwards."""
    saved = ctx.saved_tensors
    if ctx.in_place:
        grads, ctx.fused_grads = ctx.fused_grads, None
        return saved, grads
    return saved[:ctx.num_saved], tuple(saved[ctx.num_saved:]) or None


def scale_fused(ctx, grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad * scale: in place in eager mode, out of place (in grad's dtype) when traced."""
    return scale_in_place(grad, scale) if ctx.in_place else (grad * scale).to(grad.dtype)


_SCALE_CHUNK_BYTES = 4 << 20


def scale_in_place(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad *= scale (a scalar or one entry per row), in place, rounded once to grad's dtype.

    When the dtypes differ (an fp16 / bf16 gradient, an fp32 scale), an in-place mul_ on CPU
    computes into a temporary of the common dtype as large as grad (twice its bytes) and
    copies it back; rows go in chunks of about 4 MiB instead, so the temporary stays small."""
    if grad.dtype == scale.dtype or grad.numel() == 0:
        return grad.mul_(scale)
    rows = max(1, _SCALE_CHUNK_BYTES // max(1, grad[0].numel() * grad.element_size()))
    per_row = scale.dim() > 0 and scale.shape[0] == grad.shape[0] and scale.shape[0] > 1
    for start in range(0, grad.shape[0], rows):
        part = scale[start:start + rows] if per_row else scale
        grad[start:start + rows].mul_(part)
    return grad


def row_grad_autograd(num_tensors: int):
    """(setup_context, backward) of an op `(t_1, ..., t_k, hyper..., compute_grad) -> (loss [N],
    grad)` whose kernel writes grad[i] = d loss_i / d t_1[i] during forward (k = num_tensors
    tensor inputs, backward needs all of them). Backward scales that gradient by the
    incoming one, recomputing it with the op when it is spent or was never made."""

    def setup_context(ctx, inputs, output):
        ctx.hyper = tuple(inputs[num_tensors:-1])
        keep_fused_grads(ctx, output[1:], inputs[:num_tensors])

    def backward(ctx, grad_loss, _unused):
        nones = (None,) * (num_tensors + len(ctx.hyper))  # every input but the first
        if grad_loss is None:
            return (None,) + nones
        saved, grads = fused_grads(ctx)
        scale = grad_loss.unsqueeze(1)
        if grads is None or grads[0].shape != saved[0].shape:
            grad = scale_in_place(ctx.op(*saved, *ctx.hyper, True)[1], scale)
        else:
            grad = scale_fused(ctx, grads[0], scale)
        return (grad,) + nones

    return setup_context, backward


def reduce_rows(loss_rows: torch.Tensor, valid: torch.Tensor, reduction: str,
                dtype: torch.dtype) -> torch.Tensor:
    """Per-row losses to the result of `reduction`, as F.cross_entropy: "mean" divides by the
    number of rows that are not ignored (NaN when there is none), "sum" adds, "none" keeps."""
    if reduction == "none":
        return loss_rows.to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        # NaN when every row is ignored, with zero (not NaN) gradients, as cross_entropy.
        count = valid.sum()
        total = torch.where(count > 0, total / count.clamp(min=1), torch.nan)
    return total.to(dtype)


def result_dtype(x: torch.Tensor) -> torch.dtype:
    """The loss dtype: the input's, or fp32 under autocast, as F.cross_entropy."""
    if (x.dtype in (torch.float16, torch.bfloat16) and torch.amp.is_autocast_available(x.device.type)
            and torch.is_autocast_enabled(x.device.type)):
        return torch.float32
    return x.dtype


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the kernels accumulate in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def row_grad_op(family: str, name: str, num_tensors: int) -> Op:
    """The Op of a kernel `(rows [N, C], t_2, ..., t_k, hyper..., compute_grad) -> (loss [N],
    grad)` that writes the gradient of each row's loss with respect to `rows` during forward
    (autograd: row_grad_autograd(k), k = num_tensors). Its fake outputs: the loss in the
    accumulation dtype, the gradient shaped like `rows`, or empty when not computed."""

    def fake(rows, *inputs):
        compute_grad = inputs[-1]
        grad = rows.new_empty(rows.shape) if compute_grad else rows.new_empty(0)
        return rows.new_empty(rows.shape[0], dtype=accumulation_dtype(rows)), grad

    setup_context, backward = row_grad_autograd(num_tensors)
    return Op(family, name, fake=fake, setup_context=setup_context, backward=backward)


def row_grad_loss(op: Op, backend: str, rows: torch.Tensor, target: torch.Tensor, hyper: tuple,
                  ignore_index: int, reduction: str) -> torch.Tensor:
    """The reduced loss of a row_grad_op's kernel on `rows` and `target` (then the other
    inputs, `hyper`); the kernel writes the gradient only when autograd will ask for it."""
    compute_grad = rows.requires_grad and torch.is_grad_enabled()
    loss_rows, _ = op.for_backend(backend)(rows, target, *hyper, compute_grad)
    return reduce_rows(loss_rows, target != ignore_index, reduction, result_dtype(rows))
