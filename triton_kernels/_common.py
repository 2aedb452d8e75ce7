"""Helpers shared by the Triton kernel modules: every kernel module takes what it shares with
another one from here, and none imports another kernel module's private names.

Host side
    check_args           the C++ kernels' argument checks, made by every launcher first
    launch, device_context
                         every kernel launch, on the device of its tensors and that
                         device's current stream
    hi_lo                a Python float as two fp32 kernel arguments, hi + lo
    interpreted          whether a launch runs under the interpreter (CPU tensors)
    row_layout, row_kernel_io, row_block_c, row_num_warps
                         operands, outputs and launch sizes of the row kernels (one program
                         per row of an [N, C] input, BLOCK_C columns at a time)
    uses_angle, asin_terms
                         the launch constants of the margin target logit
    allow_tf32, pow2_clamp, target_programs, split_blocks
                         precision and block sizes of the tiled (tl.dot) kernels, and the
                         split of an inner loop that fills the device
    cap_block, BLOCK_CAPS
                         a user's block_size capped at the largest spill-free tile
Device side (@triton.jit, called from the kernels)
    from_hi_lo           the scalar hi + lo in the accumulation dtype
    wide                 an index as int64, before it multiplies a stride
    nan_max, nan_min (nan_extreme), nan_maximum, nan_minimum
                         reductions and elementwise extrema that propagate NaN
    online_lse_update    one block of a running, max-rescaled log-sum-exp
    row_margins, target_logit (with acos_series, continuation_sign)
                         the margin target logit of csrc/include/fusedloss/margin.h
    load_rows, dot_tile, split_range
                         tiles of the tiled kernels
"""
import contextlib
import functools
import math
import struct
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedloss._ops import accumulation_dtype, triton_interpreted

# ---------------------------------------------------------------------------------------
# Launches

def device_context(device: torch.device):
    """The context that a launch on `device` runs in: for a CUDA device, that device made
    current (torch.cuda.device), since Triton takes the device and the stream of a launch
    from the current CUDA device, never from the tensors; nothing otherwise (CPU tensors
    under the interpreter, meta tensors)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid: Sequence[int], *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) through torch.library.wrap_triton (so that a triton_op
    traces it), inside device_context of the device of its tensor arguments: the launch then
    runs on that device, on that device's current stream, whatever device is current. Every
    launcher of fusedloss.triton_kernels launches through here; check_args has made sure
    that the tensors share one device."""
    device = next(a.device for a in args if isinstance(a, Tensor))
    with device_context(device):
        torch.library.wrap_triton(kernel)[tuple(grid)](*args, **kwargs)


# ---------------------------------------------------------------------------------------
# Argument checks

_MAX_TARGET = 1 << 62  # sharded.cpp kMaxTarget: class ids and class_start below 2^62
_NUM_STATS = {0: 2, 1: 3, 2: 4, 3: 4}  # pairs.h num_stats(kind): the columns of pair_row_stats
_NUM_HYPER = {0: 4, 1: 1, 2: 2, 3: 1}  # pairs.h num_hyper(kind)
_HYPER_NAMES = {0: "(alpha, beta, base, epsilon)", 1: "(temperature)",
                2: "(pos_margin, neg_margin)", 3: "(absolute)"}


def _shape(t: Tensor) -> list:
    return list(t.shape)


def _value(ok: bool, op: str, *message) -> None:
    if not ok:
        raise ValueError(f"{op}: " + "".join(str(m) for m in message))


def _type(ok: bool, op: str, *message) -> None:
    if not ok:
        raise TypeError(f"{op}: " + "".join(str(m) for m in message))


def _indices(op: str, name: str, t: Tensor, n: int, what: str = "") -> None:
    _value(t.dim() == 1 and t.shape[0] == n, op, name, " must have shape [", n, "]", what,
           ", got ", _shape(t))


def _row_tensor(op: str, name: str, t: Optional[Tensor], n: int, acc: torch.dtype) -> None:
    """An optional per-row tensor (row_m2, row_m3, row_grad): [N], in the accumulation dtype
    (margin_row.h check_row_tensor)."""
    if t is None:
        return
    _value(t.dim() == 1 and t.shape[0] == n, op, name, " must have shape [", n, "], got ",
           _shape(t))
    _type(t.dtype == acc, op, name, " must be ", acc, ", got ", t.dtype)


def _floating(op: str, name: str, t: Tensor) -> None:
    _type(t.is_floating_point(), op, name, " must be a floating tensor, got ", t.dtype)


def check_args(op: str, **args) -> None:
    """The argument checks of the C++ kernels of fusedloss::<op> (csrc/cpu/*.cpp,
    margin_row.h, linear_blocks.h, and the device rules of csrc/cuda/bindings.cpp), made by
    every launcher before anything else, with the same exception types and messages: a bad
    shape or value ValueError, a bad dtype TypeError, a bad device RuntimeError.

    Arguments go by their schema names (python/fusedloss/_schemas.py); each one given is
    checked as the C++ kernel of `op` checks it, so a launcher passes those that its kernel
    checks. The leading matrix fixes N, the dtype and the device: cos or logits [N, C],
    embeddings [N, D] with weight [C, D], or x [N, D] with ref [M, D]. Tensor values are not
    read (that would be a device-to-host copy in every call): a target outside [0, C) that is
    not ignore_index gets a NaN row from the kernels, as their contract says."""
    tensors = {k: v for k, v in args.items() if isinstance(v, Tensor)}
    sharded = op.startswith("sharded_")
    if "cos" in args or "logits" in args:  # the row ops: [N, C]
        name = "cos" if "cos" in args else "logits"
        rows = args[name]
        _value(rows.dim() == 2, op, name, " must be 2-D [N, ", "C_local" if sharded else "C",
               "], got ", _shape(rows))
        _floating(op, name, rows)
        n = rows.shape[0]
    elif "embeddings" in args:  # the linear ops: embeddings [N, D], weight [C, D]
        name, rows, w = "embeddings", args["embeddings"], args["weight"]
        _value(rows.dim() == 2, op, "embeddings must be 2-D [N, D], got ", _shape(rows))
        _value(w.dim() == 2, op, "weight must be 2-D [C, D], got ", _shape(w))
        _floating(op, "embeddings", rows)
        _type(w.dtype == rows.dtype, op, "embeddings and weight must share a dtype, got ",
              rows.dtype, " and ", w.dtype)
        _value(w.shape[1] == rows.shape[1], op,
               "embeddings [N, D] and weight [C, D] must share D, got ", _shape(rows), " and ",
               _shape(w))
        n = rows.shape[0]
    else:  # the pair ops: x [N, D], ref [M, D]
        name, rows, ref = "x", args["x"], args["ref"]
        _value(rows.dim() == 2, op, "x must be 2-D [N, D], got shape ", _shape(rows))
        _value(ref.dim() == 2, op, "ref must be 2-D [M, D], got shape ", _shape(ref))
        _floating(op, "x", rows)
        _type(ref.dtype == rows.dtype, op, "x and ref must share a dtype, got ", rows.dtype,
              " and ", ref.dtype)
        _value(ref.shape[1] == rows.shape[1], op,
               "x [N, D] and ref [M, D] must share D, got ", _shape(rows), " and ", _shape(ref))
        n = rows.shape[0]
        _indices(op, "labels", args["labels"], n, " (one per row of x)")
        _indices(op, "ref_labels", args["ref_labels"], ref.shape[0], " (one per row of ref)")
        _type(args["labels"].dtype == torch.int64 and args["ref_labels"].dtype == torch.int64,
              op, "labels and ref_labels must be int64, got ", args["labels"].dtype, " and ",
              args["ref_labels"].dtype)
    if "target" in args:
        _indices(op, "target", args["target"], n)
        _type(args["target"].dtype == torch.int64, op, "target must be int64, got ",
              args["target"].dtype)

    # One device for every tensor, a CUDA one (a CPU one under TRITON_INTERPRET=1).
    device = rows.device
    for other, t in tensors.items():
        if t.device != device:
            raise RuntimeError(f"{op}: {other} is on {t.device} but {name} is on {device}")
    if device.type not in ("cuda", "meta") and not (device.type == "cpu" and triton_interpreted()):
        raise RuntimeError(f"{op}: the Triton kernels take CUDA tensors (CPU tensors only "
                           f"under TRITON_INTERPRET=1), got {name} on {device}")

    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    for per_row in ("row_m2", "row_m3", "row_grad"):
        if per_row in args:
            _row_tensor(op, per_row, args[per_row], n, acc)
    if "coef" in args:  # sharded.cpp check_coef
        coef = args["coef"]
        _value(coef.dim() == 2 and _shape(coef) == [n, 4], op, "coef must have shape [", n,
               ", 4] (lse, a, b, d per row), got ", _shape(coef))
        _type(coef.dtype == acc, op, "coef must be ", acc, ", got ", coef.dtype)
    if "label_smoothing" in args:
        eps = args["label_smoothing"]
        _value(0.0 <= eps <= 1.0, op, "label_smoothing must lie in [0, 1], got ", eps)
    if "logits" in args:  # spherical.cpp
        _value(rows.shape[1] >= 2, op, "needs C >= 2 classes (the spread of one output is zero "
               "by definition), got logits of shape ", _shape(rows))
    if "a" in args:
        _value(math.isfinite(args["a"]) and args["a"] > 0, op, "a must be > 0 and finite, got ",
               args["a"])
    if "b" in args:
        _value(math.isfinite(args["b"]), op, "b must be finite, got ", args["b"])
    if "class_start" in args:  # sharded.cpp check_shard, check_scale
        _value(0 <= args["class_start"] < _MAX_TARGET, op,
               "class_start must be in [0, 2^62), got ", args["class_start"])
    if "scale" in args:
        _value(args["scale"] > 0, op, "scale must be > 0, got ", args["scale"])
    if "distance" in args:  # pairs.cpp check_pair_inputs
        _value(args["distance"] in (0, 1), op,
               "distance must be 0 (similarity) or 1 (euclidean), got ", args["distance"])
    if "self_offset" in args:
        _value(args["self_offset"] >= -1, op,
               "self_offset must be -1 (no excluded column) or >= 0, got ", args["self_offset"])
    if "block_size" in args:
        _value(args["block_size"] >= 0, op, "block_size must be >= 0 (0: the kernel chooses), "
               "got ", args["block_size"])
    if "kind" in args:  # pairs.cpp check_kind, check_thresholds, check_stats_tensor
        kind, hyper = args["kind"], list(args["hyper"])
        _value(kind in _NUM_STATS, op, "kind must be 0 (multi-similarity), 1 (supcon / "
               "info-nce), 2 (contrastive) or 3 (orthogonal projection), got ", kind)
        _value(len(hyper) == _NUM_HYPER[kind], op, "kind ", kind, " takes hyper = ",
               _HYPER_NAMES[kind], ", got ", len(hyper), " values")
        _value(all(math.isfinite(h) for h in hyper), op, "hyper ", _HYPER_NAMES[kind],
               " must be finite, got ", hyper)
        if kind == 0:
            _value(hyper[0] > 0 and hyper[1] > 0, op, "multi-similarity needs alpha > 0 and "
                   "beta > 0, got alpha = ", hyper[0], ", beta = ", hyper[1])
        elif kind == 1:
            _value(hyper[0] > 0, op, "temperature must be > 0, got ", hyper[0])
        elif kind == 3:
            _value(hyper[0] in (0, 1), op, "orthogonal projection takes absolute = 0 or 1, "
                   "got ", hyper[0])
        thresholds = args.get("thresholds")
        if thresholds is not None:
            _value(kind == 0, op, "thresholds apply to kind 0 (multi-similarity) only, got "
                   "kind ", kind)
            _value(thresholds.dim() == 2 and _shape(thresholds) == [n, 2], op,
                   "thresholds must have shape [", n, ", 2] (max_neg, min_pos per row), got ",
                   _shape(thresholds))
            _floating(op, "thresholds", thresholds)
        for stat in ("grad_stats", "stats"):
            if stat in args:
                t = args[stat]
                _value(t.dim() == 2 and _shape(t) == [n, _NUM_STATS[kind]], op, stat,
                       " must have shape [", n, ", ", _NUM_STATS[kind], "], got ", _shape(t))
                _floating(op, stat, t)


# ---------------------------------------------------------------------------------------
# Scalars

def hi_lo(x: float) -> tuple[float, float]:
    """(hi, lo), both exactly representable in fp32, with hi + lo = x to about 48 significant
    bits: Triton passes a Python float as an fp32 kernel argument, and `from_hi_lo` rebuilds
    it in the accumulation dtype."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


@triton.jit
def from_hi_lo(hi, lo, ACC: tl.constexpr):
    """hi + lo, each cast to ACC before the addition (the inverse of `hi_lo`)."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


# ---------------------------------------------------------------------------------------
# Indices and extrema

@triton.jit
def wide(index):
    """`index` as int64: every row or column index (a program id times a block size, a
    target, an offset into a split) goes through here before it multiplies a stride or a row
    length, so that the pointer offset cannot wrap at 2^31 elements."""
    return tl.cast(index, tl.int64)


# Whether the kernels run under TRITON_INTERPRET=1 (decided when Triton defines them).
_INTERPRETER = tl.constexpr(triton_interpreted())


@triton.jit
def nan_maximum(a, b):
    """max(a, b) elementwise, NaN when either is NaN (as torch.maximum). tl.maximum's default
    drops NaN (maxnum; max.f32 on the GPU, numpy's fmax under the interpreter)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_minimum(a, b):
    """min(a, b) elementwise, NaN when either is NaN (as torch.minimum)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_extreme(x, axis: tl.constexpr, LARGEST: tl.constexpr):
    """max (LARGEST) or min of x along `axis`, NaN when any entry is NaN (as torch.amax and
    torch.amin). tl.max and tl.min drop NaN: max.f32 / min.f32 on the GPU, numpy's nanmax /
    nanmin under the interpreter. Compiled, a reduction whose combine is the NaN-propagating
    maximum or minimum (arith.maximumf, max.NaN.f32 on sm_80+); under the interpreter, which
    runs such a combine once per entry in Python, the same value as tl.max / tl.min with NaN
    put back where the row holds one (a sum over its NaN entries)."""
    if _INTERPRETER:
        poison = tl.sum(tl.where(x != x, x, 0.0), axis=axis)
        if LARGEST:
            plain = tl.max(x, axis=axis)
        else:
            plain = tl.min(x, axis=axis)
        return tl.where(poison != poison, poison, plain)
    elif LARGEST:
        return tl.reduce(x, axis, nan_maximum)
    else:
        return tl.reduce(x, axis, nan_minimum)


@triton.jit
def nan_max(x, axis: tl.constexpr):
    return nan_extreme(x, axis, True)


@triton.jit
def nan_min(x, axis: tl.constexpr):
    return nan_extreme(x, axis, False)


# ---------------------------------------------------------------------------------------
# Online log-sum-exp

@triton.jit
def online_lse_update(m_run, s_run, z, AXIS: tl.constexpr):
    """The running log-sum-exp lse = m + log s, with the block z folded in along AXIS:

        m' = max(m, max_AXIS z),   r = m' (0 while m' = -inf),
        s' = s exp(m - r) + sum_AXIS exp(z - r).

    m_run and s_run have the shape of z reduced over AXIS (a scalar for a 1-D z); z = -inf
    marks an entry left out. The reference r is 0 while every entry so far is left out, so
    that -inf - -inf never arises: an empty sum stays (m, s) = (-inf, 0). NaN in z makes
    both m and s NaN from that block on (the maxima propagate NaN, as torch's do)."""
    m_new = nan_maximum(m_run, nan_max(z, AXIS))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s_new = s_run * tl.exp(m_run - m_ref) + tl.sum(tl.exp(z - tl.expand_dims(m_ref, AXIS)),
                                                  axis=AXIS)
    return m_new, s_new


# ---------------------------------------------------------------------------------------
# Launch settings

def interpreted(device: torch.device) -> bool:
    """True when a launch on `device` runs under the Triton interpreter (CPU tensors, or
    TRITON_INTERPRET=1): launchers then pick small blocks, so that small test shapes span
    several blocks and splits."""
    return device.type == "cpu" or triton_interpreted()


def row_block_c(num_classes: int, device: torch.device) -> int:
    """BLOCK_C of a row kernel: next_power_of_2(C) in [16, 4096] on the GPU, in [16, 128]
    under the interpreter."""
    cap = 128 if interpreted(device) else 4096
    return max(min(triton.next_power_of_2(num_classes), cap), 16)


def row_num_warps(block_c: int) -> int:
    """num_warps of a row kernel: BLOCK_C / 256 in [1, 16]."""
    return max(1, min(block_c // 256, 16))


def row_layout(rows: Tensor) -> Tensor:
    """`rows` [N, C] itself when its columns have unit stride (any row stride; any layout of
    a single column), else a contiguous copy."""
    return rows if rows.stride(1) == 1 or rows.shape[1] <= 1 else rows.contiguous()


def row_kernel_io(rows: Tensor, target: Tensor, compute_grad: bool):
    """The operands and outputs of a row kernel (one program per row of `rows` [N, C]):
    (`rows` in row_layout, a contiguous `target`, the per-row loss [N] in the accumulation
    dtype, the gradient [N, C] contiguous in the dtype of `rows` (empty unless compute_grad),
    the pointer to pass for the gradient: `loss` when there is none, since the COMPUTE_GRAD
    constexpr removes every use of it)."""
    rows = row_layout(rows)
    n, c = rows.shape
    loss = torch.empty(n, dtype=accumulation_dtype(rows), device=rows.device)
    grad = torch.empty((n, c), dtype=rows.dtype, device=rows.device) if compute_grad \
        else rows.new_empty(0)
    return rows, target.contiguous(), loss, grad, grad if compute_grad else loss


def uses_angle(row_m2: Optional[Tensor], m1: float, m2: float) -> bool:
    """USE_ANGLE of the target logit: whether theta = acos(c_y) enters it (m1 != 1, m2 != 0,
    or per-row m2); else z_y = s (c_y - m3)."""
    return row_m2 is not None or m1 != 1.0 or m2 != 0.0


def asin_terms(acc: torch.dtype) -> int:
    """ASIN_TERMS of acos_series: terms of the asin series that reach the rounding of the
    accumulation dtype (fp64: 25, fp32: 10)."""
    return 25 if acc == torch.float64 else 10


def allow_tf32() -> bool:
    """Whether fp32 tl.dot operands go through tf32, as torch.backends.cuda.matmul says."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch refuses the legacy flag once fp32_precision has been set
        return getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32"


def pow2_clamp(n: int, low: int, high: int) -> int:
    """next_power_of_2(n) clamped to [low, high]."""
    return min(max(triton.next_power_of_2(n), low), high)


# The largest block that a user's block_size may set, per tile dimension and input dtype: the
# largest power of two whose kernel variants all compile for sm_90 without register spills
# beyond those of the launchers' own sizes (ptxas -v; tests/test_triton_aot.py compiles
# block_size 128 and 256 in every dtype). Each equals the launchers' own size: a block_size
# can make the tiles smaller, never larger.
#   linear_rows    BLOCK_N of margin_linear's forward tiles (embedding rows)
#   linear_grad_x  BLOCK_O of its grad_x pass (embedding rows)
#   linear_grad_w  BLOCK_I of its grad_w pass (embedding rows)
#   pair_rows      BLOCK_Q = BLOCK_R of the pair kernels
BLOCK_CAPS = {
    "linear_rows": {torch.float64: 64, torch.float32: 128, torch.float16: 128,
                    torch.bfloat16: 128},
    "linear_grad_x": {torch.float64: 32, torch.float32: 64, torch.float16: 64,
                      torch.bfloat16: 64},
    "linear_grad_w": {torch.float64: 32, torch.float32: 32, torch.float16: 32,
                      torch.bfloat16: 32},
    "pair_rows": {torch.float64: 32, torch.float32: 64, torch.float16: 64, torch.bfloat16: 64},
}


def cap_block(block: int, dtype: torch.dtype, tile: str) -> int:
    """A user's block size for the tile dimension `tile` (a key of BLOCK_CAPS) of kernels whose
    inputs have `dtype`: min(block, the cap). One rule on every device, so that a block_size
    tiles alike under the interpreter and on the GPU."""
    return min(block, BLOCK_CAPS[tile][dtype])


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The number of SMs of the CUDA device `device`."""
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def target_programs(device: torch.device) -> int:
    """How many programs a grid should have before its inner loops are split: twice the
    number of SMs on the GPU, 4 under the interpreter (tests then take several splits)."""
    if interpreted(device):
        return 4
    return 2 * sm_count(device)


def split_blocks(outer_programs: int, inner_blocks: int, target: int) -> tuple[int, int]:
    """(number of splits, inner blocks per split): enough contiguous splits of an inner loop
    of `inner_blocks` blocks that outer_programs * splits reaches `target`, every split
    non-empty."""
    want = max(1, min(inner_blocks, triton.cdiv(target, max(outer_programs, 1))))
    per = triton.cdiv(inner_blocks, want)
    return triton.cdiv(inner_blocks, per), per


# ---------------------------------------------------------------------------------------
# Margin target logit (csrc/include/fusedloss/margin.h target_logit)

_PI = tl.constexpr(math.pi)
_THETA_EPS = tl.constexpr(0.01)  # margin.h kThetaEps
_SIN_THETA_EPS = tl.constexpr(math.sin(0.01))


@triton.jit
def acos_series(x, ASIN_TERMS: tl.constexpr):
    """arccos for x in [-1, 1] (NaN passes through) from +, *, / and sqrt only.

    Neither tl.math (Triton 3.9) nor the interpreter offers acos or atan, and
    libdevice.acos does not run under TRITON_INTERPRET=1. Range reduction keeps the
    asin argument u within [-1/2, 1/2]:
        |x| <= 1/2:  acos x = pi/2 - asin x
        x > 1/2:     acos x = 2 asin sqrt((1 - x) / 2)
        x < -1/2:    acos x = pi - 2 asin sqrt((1 + x) / 2)
    1 - |x| is exact for |x| >= 1/2, so acos stays accurate to a few ulp next to
    x = +-1, where acos x ~ sqrt(2 (1 - x)). asin u = sum_n b_n u^(2n+1) / (2n+1) with
    b_0 = 1, b_n = b_(n-1) (2n - 1) / (2n): all terms positive, the n-th below 4^-n u,
    so 10 terms reach fp32 and 25 fp64 rounding.
    """
    ax = tl.abs(x)
    big = ax > 0.5
    u = tl.where(big, tl.sqrt((1.0 - ax) * 0.5), x)
    u2 = u * u
    term = u
    asin_u = u
    for n in tl.static_range(1, ASIN_TERMS):
        term = term * u2 * ((2 * n - 1) / (2 * n))
        asin_u = asin_u + term * (1.0 / (2 * n + 1))
    return tl.where(big, tl.where(x > 0, 2.0 * asin_u, _PI - 2.0 * asin_u), 0.5 * _PI - asin_u)


@triton.jit
def continuation_sign(phi):
    """(-1)^k and k for k = floor(phi / pi): the piece of psi that phi falls in."""
    k = tl.floor(phi / _PI)
    half = k * 0.5
    return tl.where(half == tl.floor(half), 1.0, -1.0), k


@triton.jit
def target_logit(c_y, scale, m1, m2, m3, USE_ANGLE: tl.constexpr, DETACH_MARGIN: tl.constexpr,
                 ASIN_TERMS: tl.constexpr):
    """z_y and dz_y/dc_y (margin.h target_logit) in the dtype of c_y, elementwise: c_y may be
    a scalar or a block (one entry per row); m2 and m3 scalars or blocks like c_y.

        theta = acos(clamp(c_y, -1, 1)),  phi = m1 theta + m2,  k = floor(phi / pi)
        z_y = s ((-1)^k cos(phi) - 2k - m3)                       (s (c_y - m3) without USE_ANGLE)
        dz_y/dc_y = s m1 (-1)^k' sin(phi') / sin(theta'),  theta' = clamp(theta, 0.01, pi - 0.01),
                    phi' = m1 theta' + m2, k' = floor(phi' / pi)    (s with DETACH_MARGIN or
                                                                     without USE_ANGLE)
    """
    ACC = c_y.dtype
    if USE_ANGLE:
        c_cl = tl.where(c_y < -1.0, -1.0, tl.where(c_y > 1.0, 1.0, c_y))  # keeps NaN
        theta = acos_series(c_cl, ASIN_TERMS)
        phi = m1 * theta + m2
        sign, k = continuation_sign(phi)
        z_y = scale * (sign * tl.cos(phi) - 2.0 * k - m3)
        if DETACH_MARGIN:
            slope = scale
        else:
            # tl.full makes the constants in ACC directly (a Python float in tl.where may
            # be rounded through fp32 first). sin(theta) = sqrt((1 - c)(1 + c)) rather than
            # sin(acos(c)): 1 -+ c is exact next to c = +-1, where fp32 theta ~ pi carries
            # an absolute error that would be relative in sin(theta).
            lo = tl.full([], _THETA_EPS, ACC)
            hi = tl.full([], _PI - _THETA_EPS, ACC)
            clamped = (theta < lo) | (theta > hi)
            theta_c = tl.where(theta < lo, lo, tl.where(theta > hi, hi, theta))
            sin_theta_c = tl.where(clamped, tl.full([], _SIN_THETA_EPS, ACC),
                                   tl.sqrt((1.0 - c_cl) * (1.0 + c_cl)))
            phi_c = m1 * theta_c + m2
            sign_c, k_c = continuation_sign(phi_c)
            slope = scale * m1 * sign_c * tl.sin(phi_c) / sin_theta_c
    else:
        z_y = scale * (c_y - m3)
        slope = scale
    return z_y, slope


@triton.jit
def row_margins(rows, row_ok, row_m2_ptr, row_m3_ptr, m2_hi, m2_lo, m3_hi, m3_lo,
                HAS_ROW_M2: tl.constexpr, HAS_ROW_M3: tl.constexpr, ACC: tl.constexpr):
    """m2 and m3 of `rows` (a row index or a block of them, read where row_ok): their
    ElasticFace draws row_m2[rows], row_m3[rows] where given, else the shared scalars from
    their fp32 hi + lo pairs; in ACC."""
    if HAS_ROW_M2:
        m2 = tl.load(row_m2_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    else:
        m2 = from_hi_lo(m2_hi, m2_lo, ACC)
    if HAS_ROW_M3:
        m3 = tl.load(row_m3_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    else:
        m3 = from_hi_lo(m3_hi, m3_lo, ACC)
    return m2, m3


# ---------------------------------------------------------------------------------------
# Tiles of the tiled (tl.dot) kernels

@triton.jit
def load_rows(ptr, rows, n_rows, cols, n_cols, row_stride, UPCAST: tl.constexpr):
    """Tile [len(rows), len(cols)] of a row-major matrix; zero outside [0, n_rows) x [0, n_cols).
    UPCAST (interpreter only, whose tl.dot multiplies bf16 as raw bits) widens it to fp32,
    which is exact."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tile = tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def dot_tile(a_ptr, b_ptr, a_rows, b_rows, n_a, n_b, D, a_stride, b_stride,
             BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
             ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """[BLOCK_A, BLOCK_B] tile of a b^T over the whole of D (BLOCK_D at a time, in order),
    accumulated in ACC; rows outside [0, n_a) or [0, n_b) give 0."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], ACC)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        a = load_rows(a_ptr, a_rows, n_a, ks, D, a_stride, UPCAST)
        b = load_rows(b_ptr, b_rows, n_b, ks, D, b_stride, UPCAST)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def split_range(split, blocks_per_split, BLOCK: tl.constexpr, total):
    """[begin, end): the part of an inner loop over [0, total) that split `split` walks
    (blocks_per_split blocks of BLOCK; see split_blocks), as 32-bit loop bounds: formed in
    int64 and clamped to total (a 32-bit argument) before they are narrowed."""
    begin = wide(split) * blocks_per_split * BLOCK
    end = begin + wide(blocks_per_split) * BLOCK
    return tl.minimum(begin, total).to(tl.int32), tl.minimum(end, total).to(tl.int32)
