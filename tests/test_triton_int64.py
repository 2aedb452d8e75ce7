"""What the compiled Triton kernels must hold that the interpreter cannot show: pointer
offsets in int64 wherever a product can pass 2^31, and maxima and minima that propagate NaN
as torch's do. With these, the NaN behaviour of the kernels under the interpreter, as on CPU.

64-bit offsets. Every kernel variant that the launchers produce for a matrix of ops, dtypes and
modes (with a GPU's launch choices: tests/triton_capture.py) is compiled to TTIR for sm_90,
and the TTIR of each is checked by `wrapping_products`:

    For every tt.addptr, the backward slice of its offset is walked through the integer ops
    that define it (arith, splat / broadcast / expand_dims, extsi / trunci, select, the bounds
    of the scf.for loops whose induction variable it uses, the values yielded into loop-carried
    variables). Each value gets an interval: constants, tt.make_range, program ids (axis 0
    below 2^31, axes 1 and 2 below 2^16), the interval arithmetic of its op; anything else
    (kernel arguments, loads, reductions, call results) the whole range of its type. The check
    fails on an arith.muli (or shli) on i32 in such a slice whose product interval leaves
    [-2^31, 2^31): a 32-bit multiply feeding an address that the compiler cannot show to be in
    range. A multiply whose bounds prove it small (program_id(1) * BLOCK, a row index times 2
    when the row index is an int64) passes; one by an unknown stride, row length or split
    count fails.

This is stronger than looking for a constant operand: `2 * N` with N a kernel argument fails.
Sums are not flagged: the i32 sums in these kernels are a position below a dimension (an i32
argument, so below 2^31) plus an offset within one block, which passes 2^31 only for a single
dimension within one block of 2^31 elements. Multiplies in int64 are not flagged either.

The launches are made with shapes whose sizes, strides and split counts are not 1 (Triton
specialises an integer argument equal to 1 into a constant, which would hide a product), at
two SM counts: 132 (one split where the grid is full) and 1 (several splits, each of several
blocks).

NaN. tl.max / tl.min and tl.maximum / tl.minimum by default lower to arith.maxnumf /
minnumf, which drop NaN (max.f32 on the GPU); the interpreter's numpy behaves otherwise, so
only the compiled code shows it. The TTIR of every variant must hold no maxnumf / minnumf
(every float extremum, elementwise or a reduction's combine, is maximumf / minimumf), and the
PTX of pair_extrema and of the margin row kernel must carry it through: max.NaN / min.NaN for
fp32, a NaN test (setp.nan) beside every max / min for fp64. The interpreter tests then
check the behaviour: a NaN candidate wins pair_extrema (torch.min's rule, first NaN column),
a NaN input gives NaN statistics and losses where the CPU kernels give them.
"""
import re
from typing import Dict, List, Optional, Tuple

import pytest
import torch

import fusedloss  # noqa: F401  (makes every Op)
from fusedloss import _ops

import triton_capture as tc

pytestmark = [pytest.mark.triton,
              # numpy's nanmax under the interpreter, on the all-NaN rows of the NaN tests
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")]

I32 = (-(1 << 31), (1 << 31) - 1)
I64 = (-(1 << 63), (1 << 63) - 1)
_RANGES = {"i1": (0, 1), "i8": (-128, 127), "i16": (-(1 << 15), (1 << 15) - 1), "i32": I32,
           "i64": I64}


# ---------------------------------------------------------------------------------------
# The TTIR check

class _Value:
    """An SSA value of one function: its defining op, operands, result type, extra
    dependencies (loop bounds, yielded values) and the line it is defined on."""

    def __init__(self, op: str, operands: List[str], type_: str, rest: str, loc: str):
        self.op, self.operands, self.type, self.rest, self.loc = op, operands, type_, rest, loc
        self.deps: List[str] = []
        self.forced: Optional[Tuple[int, int]] = None  # an interval fixed at parse time


_DEF = re.compile(r"^\s*(%[\w.$-]+(?::\d+)?(?:\s*,\s*%[\w.$-]+)*)\s*=\s*([\w.]+)(.*)$")
_NAME = re.compile(r"%[\w.$-]+(?:#\d+)?")
_LOC = re.compile(r"\s*loc\((#loc\d*|[^()]*(?:\([^()]*\))*)\)\s*$")


def _element(type_: str) -> str:
    """The element type of `type_` ("i32" of "tensor<64x32xi32>")."""
    type_ = type_.strip()
    match = re.match(r"tensor<(?:[\d?]+x)*([^>]+)>", type_)
    return match.group(1) if match else type_


def _result_type(op: str, rest: str) -> str:
    if op in ("arith.extsi", "arith.extui", "arith.trunci", "tt.splat", "tt.broadcast",
              "tt.expand_dims", "tt.reshape", "ttg.convert_layout", "tt.trans", "arith.bitcast"):
        parts = re.split(r"\bto\b|->", rest)
        return parts[-1].strip() if len(parts) > 1 else rest.rsplit(":", 1)[-1].strip()
    if ":" not in rest:
        return ""
    return rest.rsplit(":", 1)[-1].strip()


def _locations(text: str) -> Dict[str, str]:
    raw = dict(re.findall(r"^(#loc\d*) = loc\((.*)\)\s*$", text, re.M))

    def resolve(ref: str, depth: int = 0) -> str:
        body = raw.get(ref, ref)
        if depth > 20:
            return "?"
        match = re.match(r'"([^"]+)":(\d+):\d+', body)
        if match:
            return f"{match.group(1).rsplit('/', 1)[-1]}:{match.group(2)}"
        match = re.match(r"callsite\((#loc\d*) at (#loc\d*)\)", body)
        if match:
            return f"{resolve(match.group(1), depth + 1)} <- {resolve(match.group(2), depth + 1)}"
        match = re.match(r'"[^"]*"\((#loc\d*)\)', body)
        if match:
            return resolve(match.group(1), depth + 1)
        return "?"

    return {ref: resolve(ref) for ref in raw}


def _functions(text: str) -> List[Tuple[str, Dict[str, _Value], List[_Value]]]:
    """(name, {ssa name: value}, [tt.addptr values]) of each tt.func of a TTIR module."""
    locs = _locations(text)
    functions = []
    values: Dict[str, _Value] = {}
    addptrs: List[_Value] = []
    regions: List[Optional[Tuple[List[str], List[str]]]] = []  # (loop-carried, results)
    name = None
    for line in text.splitlines():
        loc_match = _LOC.search(line)
        loc = locs.get(loc_match.group(1), "?") if loc_match else "?"
        body = _LOC.sub("", line).rstrip()
        stripped = body.strip()
        if stripped.startswith("tt.func"):
            if name is not None:
                functions.append((name, values, addptrs))
            name = re.search(r"@([\w$.]+)", stripped).group(1)
            values, addptrs, regions = {}, [], []
            for arg, type_ in re.findall(r"(%[\w.$-]+): ([^\s,{)]+(?:<[^>]*>)?)", stripped):
                values[arg] = _Value("arg", [], type_, "", "argument")
            regions.append(None)
            continue
        if name is None:
            continue
        if stripped.startswith("}"):
            if regions:
                top = regions.pop()
                if stripped.endswith("{"):  # "} else {": a second region of the same op
                    regions.append(top)
            continue
        if stripped.startswith("scf.yield") or stripped.startswith("scf.condition"):
            if regions and regions[-1] is not None:
                carried, results = regions[-1]
                yielded = _NAME.findall(stripped.split(":")[0])
                for target in carried + results:
                    if target in values:
                        values[target].deps.extend(yielded)
            if stripped.endswith("{"):
                regions.append(None)
            continue
        match = _DEF.match(body)
        region: Optional[Tuple[List[str], List[str]]] = None
        if match:
            lhs, op, rest = match.groups()
            results = []
            for part in lhs.split(","):
                part = part.strip()
                if ":" in part:
                    base, count = part.split(":")
                    results += [f"{base}#{i}" for i in range(int(count))]
                    results.append(base)
                else:
                    results.append(part)
            operands = _NAME.findall(rest.split("{")[0] if op != "scf.for" else rest)
            value = _Value(op, operands, _result_type(op, rest), rest, loc)
            for result in results:
                values[result] = value
            if op == "tt.addptr":
                addptrs.append(value)
            if op in ("scf.for", "scf.if", "scf.while"):
                carried = []
                if op == "scf.for":
                    head = re.match(r"\s*(%[\w.$-]+) = (%[\w.$-]+) to (%[\w.$-]+) step (%[\w.$-]+)",
                                    rest)
                    iv, lb, ub, step = head.groups()
                    induction = _Value("induction", [], "", "", loc)
                    induction.deps = [lb, ub, step]
                    values[iv] = induction
                    for arg, init in re.findall(r"(%[\w.$-]+) = (%[\w.$-]+(?:#\d+)?)",
                                                rest.split("iter_args", 1)[-1]
                                                if "iter_args" in rest else ""):
                        carried_value = _Value("carried", [], "", "", loc)
                        carried_value.deps = [init]
                        values[arg] = carried_value
                        carried.append(arg)
                region = (carried, results)
            if op in ("tt.reduce", "tt.scan"):
                region = None
        if stripped.endswith("{"):
            regions.append(region)
        elif stripped.endswith("({"):
            regions.append(None)
    if name is not None:
        functions.append((name, values, addptrs))
    return functions


def _full(type_: str) -> Tuple[int, int]:
    return _RANGES.get(_element(type_), I64)


def _interval(name: str, values: Dict[str, _Value], memo: dict, depth: int = 0) -> Tuple[int, int]:
    """An interval holding every value the SSA value `name` may take (module docstring)."""
    if name in memo:
        return memo[name]
    value = values.get(name)
    if value is None or depth > 200:
        return I64
    memo[name] = _full(value.type)  # cycles (loop-carried values) end at the full range
    op, rest = value.op, value.rest

    def of(i: int) -> Tuple[int, int]:
        return _interval(value.operands[i], values, memo, depth + 1)

    result = _full(value.type)
    if op == "arith.constant":
        number = re.match(r"\s*(?:dense<)?(-?\d+)(?:>)?\s*:", rest)
        if number and _element(value.type).startswith("i"):
            result = (int(number.group(1)), int(number.group(1)))
    elif op == "tt.make_range":
        start = int(re.search(r"start = (-?\d+)", rest).group(1))
        end = int(re.search(r"end = (-?\d+)", rest).group(1))
        result = (start, end - 1)
    elif op in ("tt.get_program_id", "tt.get_num_programs"):
        low = 0 if op == "tt.get_program_id" else 1
        result = (low, (1 << 31) - 1) if re.match(r"\s*x\b", rest) else (low, (1 << 16) - 1)
    elif op == "induction":
        lb = _interval(value.deps[0], values, memo, depth + 1)
        ub = _interval(value.deps[1], values, memo, depth + 1)
        result = (lb[0], max(lb[0], ub[1] - 1))
    elif op in ("arith.addi", "arith.subi", "arith.muli", "arith.shli"):
        (a0, a1), (b0, b1) = of(0), of(1)
        exact = _exact(op, (a0, a1), (b0, b1))
        low, high = _full(value.type)
        result = exact if low <= exact[0] and exact[1] <= high else (low, high)
    elif op in ("arith.extsi", "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape",
                "ttg.convert_layout", "tt.trans"):
        result = of(0)
    elif op == "arith.trunci":
        low, high = _full(value.type)
        inner = of(0)
        result = inner if low <= inner[0] and inner[1] <= high else (low, high)
    elif op == "arith.minsi":
        (a0, a1), (b0, b1) = of(0), of(1)
        result = (min(a0, b0), min(a1, b1))
    elif op == "arith.maxsi":
        (a0, a1), (b0, b1) = of(0), of(1)
        result = (max(a0, b0), max(a1, b1))
    elif op == "arith.select":
        (a0, a1), (b0, b1) = of(1), of(2)
        result = (min(a0, b0), max(a1, b1))
    elif op == "arith.remsi":
        (a0, _), (d0, d1) = of(0), of(1)
        if d0 > 0:
            result = (0 if a0 >= 0 else -(d1 - 1), d1 - 1)
    elif op == "arith.divsi":
        (a0, a1), (d0, _) = of(0), of(1)
        if d0 > 0:
            bound = max(abs(a0), abs(a1))
            result = (-bound, bound)
    memo[name] = result
    return result


def _exact(op: str, a: Tuple[int, int], b: Tuple[int, int]) -> Tuple[int, int]:
    if op == "arith.addi":
        return a[0] + b[0], a[1] + b[1]
    if op == "arith.subi":
        return a[0] - b[1], a[1] - b[0]
    if op == "arith.shli":
        b = (1 << max(b[0], 0), 1 << min(max(b[1], 0), 64))
    corners = [x * y for x in a for y in b]
    return min(corners), max(corners)


def _plain_name(ssa: str) -> str:
    """%other_n_165 -> other_n, %c32_i32 -> 32: the source name of an SSA value."""
    match = re.match(r"%c(-?\d+)_i\d+$", ssa)
    if match:
        return match.group(1)
    return ssa if re.match(r"%\d+$", ssa) else re.sub(r"(_\d+)+$", "", ssa.lstrip("%"))


def wrapping_products(ttir_text: str) -> List[str]:
    """The i32 multiplies of a TTIR module that feed a pointer offset and may leave
    [-2^31, 2^31) (module docstring), as "function: product at file:line ..." lines."""
    found = []
    for function, values, addptrs in _functions(ttir_text):
        memo: dict = {}
        seen = set()
        for addptr in addptrs:
            stack = list(addptr.operands[1:2])
            while stack:
                name = stack.pop()
                if name in seen or name not in values:
                    continue
                seen.add(name)
                value = values[name]
                if value.op in ("arith.muli", "arith.shli") and _element(value.type) == "i32":
                    a = _interval(value.operands[0], values, memo)
                    b = _interval(value.operands[1], values, memo)
                    low, high = _exact(value.op, a, b)
                    if low < I32[0] or high > I32[1]:
                        factors = " * ".join(_plain_name(o) for o in value.operands)
                        found.append(f"{function.split('__')[0].rsplit('.', 1)[-1]}: "
                                     f"{value.op} {factors} (i32) at {value.loc}")
                if value.op in ("tt.load", "tt.call", "tt.reduce", "arg"):
                    continue  # their values are not computed from other indices here
                stack.extend(value.operands)
                stack.extend(value.deps)
    return sorted(set(found))


# ---------------------------------------------------------------------------------------
# The launches: a matrix of ops, dtypes and modes with sizes that are not 1

N, C_ROW, C_LIN, D, M = 40, 5000, 300, 48, 70
MARGIN = (64.0, 1.0, 0.5, 0.0)  # scale, m1, m2, m3 (arcface)
SPHERE = (64.0, 1.35, 0.0, 0.0)
MS_HYPER = [2.0, 50.0, 0.5, 0.1]
KIND_HYPER = {0: MS_HYPER, 1: [0.1], 2: [0.5, 1.2]}
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors: the interpreter


def _on(*tensors):
    return [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in tensors]


def _op(name: str):
    """The Triton twin of fusedloss::<name>, called with its tensors moved to DEVICE."""
    op = _ops.OPS[name].triton
    return lambda *args: op(*_on(*args))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_calls(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    cos = (torch.rand(N, C_ROW, generator=gen) * 2 - 1).to(dtype)
    target = torch.randint(0, C_ROW, (N,), generator=gen)
    m2 = torch.full((N,), 0.5, dtype=_acc(dtype))
    for row_m2, (scale, m1, mm2, m3), smoothing, lam, grad in [
            (None, MARGIN, 0.0, 0.0, True), (m2, MARGIN, 0.1, 1e-4, True),
            (None, SPHERE, 0.0, 0.0, False), (None, (64.0, 1.0, 0.0, 0.35), 0.0, 0.0, True)]:
        _op("margin_cross_entropy")(cos, target, row_m2, row_m2, scale, m1, mm2, m3, False,
                                    smoothing, lam, -100, grad)
    logits = cos.float().to(dtype) * 3
    for grad in (True, False):
        _op("spherical_z_loss")(logits, target, 1.5, 0.5, -100, grad)
        _op("spherical_z_loss")(logits[:, :300], target % 300, 1.5, 0.5, -100, grad)
    coef = torch.rand(N, 4, dtype=_acc(dtype), generator=gen)
    _op("sharded_margin_stats")(cos, target, m2, None, *MARGIN, 1000, -100)
    _op("sharded_margin_grad")(cos, target, None, m2, coef, *MARGIN, False, 1000, -100)


def _linear_calls(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=gen).to(dtype)
    w = torch.randn(C_LIN, D, generator=gen).to(dtype)
    target = torch.randint(0, C_LIN, (N,), generator=gen)
    acc = _acc(dtype)
    row = torch.rand(N, dtype=acc, generator=gen)
    for normalize, block_size, row_m2, smoothing in [(True, 0, None, 0.0), (False, 0, row, 0.1),
                                                      (True, 128, None, 0.0)]:
        _op("margin_linear_cross_entropy")(x, w, target, row_m2, None, row, *MARGIN, False,
                                           smoothing, 0.0, -100, normalize, block_size, False,
                                           True)
    coef = torch.rand(N, 4, dtype=acc, generator=gen)
    for normalize in (True, False):
        _op("sharded_margin_linear_stats")(x, w, target, None, None, *MARGIN, normalize, 100,
                                           -100, 0)
        _op("sharded_margin_linear_grad")(x, w, target, row, None, coef, *MARGIN, False,
                                          normalize, 100, -100, 0)


def _pair_calls(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, D, generator=gen).to(dtype)
    ref = torch.randn(M, D, generator=gen).to(dtype)
    labels = torch.randint(0, 4, (N,), generator=gen)
    ref_labels = torch.randint(0, 4, (M,), generator=gen)
    acc = _acc(dtype)
    thresholds = torch.rand(N, 2, dtype=acc, generator=gen)
    for distance in (0, 1):
        _op("pair_extrema")(x, labels, ref, ref_labels, distance, 3, 0)
        for kind in (0, 1, 2):
            for thr in ((None, thresholds) if kind == 0 else (None,)):
                k = {0: 2, 1: 3, 2: 4}[kind]
                _op("pair_row_stats")(x, labels, ref, ref_labels, thr, kind, distance,
                                      KIND_HYPER[kind], 3, 0)
                stats = torch.rand(N, k, dtype=acc, generator=gen)
                _op("pair_row_stats_backward")(stats, stats, x, labels, ref, ref_labels, thr,
                                               kind, distance, KIND_HYPER[kind], 3, 0, True,
                                               True)


def int64_launches() -> List[tc.Launch]:
    """The distinct variants of the matrix, at 132 SMs and at 1 SM."""
    launches: List[tc.Launch] = []
    for sms in (tc.H100_SMS, 1):
        for dtype in DTYPES:
            with tc.capture(sms=sms) as found:
                _row_calls(dtype)
                _linear_calls(dtype)
                _pair_calls(dtype)
            launches.extend(found)
    return tc.unique(launches)


@pytest.fixture(scope="module")
def ttir_of_variants():
    launches = int64_launches()
    return launches, tc.ttir_all(launches)


def test_every_kernel_is_in_the_matrix(ttir_of_variants):
    launches, _ = ttir_of_variants
    names = {launch.name for launch in launches}
    kernels = {f"{m}.{k}" for m in tc.MODULES[1:] for k, v in
               vars(__import__(f"fusedloss.triton_kernels.{m}", fromlist=["x"])).items()
               if k.endswith("_kernel") and hasattr(v, "fn")}
    assert kernels <= names, f"kernels the matrix never launches: {sorted(kernels - names)}"
    # Integer arguments equal to 1 become constants: the matrix must also launch each kernel
    # with its split arguments above 1.
    for kernel in ("margin_linear._lse_kernel", "margin_linear._grad_kernel",
                   "pairs._extrema_kernel", "pairs._row_stats_kernel", "pairs._grad_kernel"):
        split_args = {name for launch in launches if launch.name == kernel
                      for name, type_ in launch.signature.items()
                      if name in ("blocks_per_split", "num_splits") and type_ != "constexpr"}
        assert "blocks_per_split" in split_args, f"{kernel} always had blocks_per_split = 1"


def test_no_pointer_offset_from_a_32_bit_product(ttir_of_variants):
    launches, texts = ttir_of_variants
    bad = {}
    for launch in launches:
        for line in wrapping_products(texts[launch.key]):
            bad.setdefault(line, launch.describe())
    assert not bad, "32-bit products feeding pointer offsets (first variant with each):\n" + \
        "\n".join(f"{line}\n    in {variant}" for line, variant in sorted(bad.items()))


_SAMPLE = """
  tt.func public @k(%p: !tt.ptr<f32> {tt.divisibility = 16 : i32}, %n: i32, %s: i32) {
    %c2_i32 = arith.constant 2 : i32
    %c64_i32 = arith.constant 64 : i32
    %a = tt.get_program_id x : i32
    %b = tt.get_program_id y : i32
    %small = arith.muli %b, %c64_i32 : i32
    %q = tt.addptr %p, %small : !tt.ptr<f32>, i32
    %big = arith.muli %c2_i32, %n : i32
    %r = tt.addptr %p, %big : !tt.ptr<f32>, i32
    %w = arith.extsi %a : i32 to i64
    %s64 = arith.extsi %s : i32 to i64
    %wide = arith.muli %w, %s64 : i64
    %t = tt.addptr %p, %wide : !tt.ptr<f32>, i64
    %u:1 = scf.for %i = %c2_i32 to %n step %c64_i32 iter_args(%acc = %c2_i32) -> (i32)  : i32 {
      %v = arith.muli %i, %s : i32
      %x = tt.addptr %p, %v : !tt.ptr<f32>, i32
      scf.yield %acc : i32
    }
    tt.return
  }
"""


def test_the_check_sees_what_it_should():
    found = wrapping_products(_SAMPLE)
    assert any("arith.muli 2 * n" in line for line in found), found  # 2 N, N unknown
    assert any("arith.muli i * s" in line for line in found), found  # loop index times stride
    assert len(found) == 2, found  # not program_id(1) * 64, not the int64 product


# ---------------------------------------------------------------------------------------
# NaN: the compiled lowering

def test_no_nan_dropping_extremum_in_any_variant(ttir_of_variants):
    launches, texts = ttir_of_variants
    bad = sorted({launch.describe() for launch in launches
                  if re.search(r"arith\.(maxnumf|minnumf)", texts[launch.key])})
    assert not bad, "NaN-dropping float max / min (tl.max, tl.min, tl.maximum, tl.minimum " \
        "without propagate_nan; use _common.nan_max and friends) in:\n" + "\n".join(bad)


def _ptx_extrema(ptx: str) -> dict:
    """{instruction: count} of the floating max / min instructions of a PTX listing."""
    found: dict = {}
    for op in re.findall(r"\b((?:max|min)(?:\.[A-Za-z]+)*\.f(?:16|32|64)(?:x2)?)\b", ptx):
        found[op] = found.get(op, 0) + 1
    return found


def test_pair_extrema_and_the_row_lse_propagate_nan_in_ptx(ttir_of_variants):
    launches, _ = ttir_of_variants
    wanted = [launch for launch in launches
              if launch.name == "pairs._extrema_kernel"
              or (launch.name == "margin._margin_ce_kernel" and launch.constexpr("COMPUTE_GRAD"))]
    picked = tc.unique(wanted)
    kernels = tc.compile_all(picked)
    seen = set()
    for launch in picked:
        ptx = kernels[launch.key].asm["ptx"]
        extrema = _ptx_extrema(ptx)
        seen |= set(extrema)
        dropping = {op: n for op, n in extrema.items()
                    if (op.endswith(".f32") or op.endswith(".f16")) and ".NaN" not in op}
        assert not dropping, f"{launch.describe()}: NaN-dropping {dropping}"
        f64 = sum(n for op, n in extrema.items() if op.endswith(".f64"))
        assert len(re.findall(r"setp\.nan\.f64", ptx)) >= f64, \
            f"{launch.describe()}: {f64} fp64 max / min, fewer NaN tests"
    assert "min.NaN.f32" in seen and "max.NaN.f32" in seen, seen


# ---------------------------------------------------------------------------------------
# NaN: the behaviour, under the interpreter (or on the GPU)

NAN = float("nan")


def _pair_inputs(dtype=torch.float32):
    """x [37, 20] and ref [70, 20] spanning several blocks and splits, with NaN in x row 3
    (every candidate of that row is NaN), in ref rows 7 and 50 (a NaN candidate in every
    other row), and a row 11 of x whose only NaN candidates come from ref."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(37, 20, generator=gen, dtype=dtype)
    ref = torch.randn(70, 20, generator=gen, dtype=dtype)
    labels = torch.randint(0, 4, (37,), generator=gen)
    ref_labels = torch.randint(0, 4, (70,), generator=gen)
    x[3, 4] = NAN
    ref[7, 0] = NAN
    ref[50, 19] = NAN
    return x, labels, ref, ref_labels


def _nan_keeping_extrema(x, labels, ref, ref_labels, distance):
    """pair_extrema by its contract (csrc/include/fusedloss/pairs.h: NaN stays NaN in the
    scores; torch.min / max: a NaN candidate wins, first NaN column), dense."""
    from fusedloss.reference import pairs as reference

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    values = reference.scores(x, ref, distance)
    values = torch.where((x.to(acc) @ ref.to(acc).T).isnan(), NAN, values)
    pos, neg = reference.pair_masks(labels, ref_labels, -1)
    largest = distance == reference.EUCLIDEAN
    pos_value, pos_index = reference._masked_extreme(values, pos, largest)
    neg_value, neg_index = reference._masked_extreme(values, neg, not largest)
    return torch.stack([pos_value, neg_value], 1), torch.stack([pos_index, neg_index], 1)


@pytest.mark.parametrize("distance", [0, 1])
def test_a_nan_candidate_wins_pair_extrema(distance):
    x, labels, ref, ref_labels = _pair_inputs()
    values, index = _ops.OPS["pair_extrema"].triton(*_on(x, labels, ref, ref_labels), distance,
                                                    -1, 0)
    want_values, want_index = _nan_keeping_extrema(x, labels, ref, ref_labels, distance)
    torch.testing.assert_close(values.cpu(), want_values, equal_nan=True, rtol=2e-5, atol=2e-5)
    assert torch.equal(index.cpu(), want_index)
    assert values[3].isnan().all() and (index[3] >= 0).all()  # all-NaN row: NaN, a column
    if distance == 0:  # the oracle keeps NaN similarities as they are
        from fusedloss.reference import pairs as reference

        oracle_values, oracle_index = reference.pair_extrema(x, labels, ref, ref_labels, 0, -1)
        torch.testing.assert_close(values.cpu(), oracle_values, equal_nan=True, rtol=2e-5,
                                   atol=2e-5)
        assert torch.equal(index.cpu(), oracle_index)


def _cpu_kernel(op: str):
    if "cpu" not in _ops.kernel_backends(op):
        pytest.skip(f"fusedloss::{op} has no CPU kernel here (fusedloss._C not built)")
    return _ops.OPS[op].cpp


def _assert_same(triton_out, cpu_out, what):
    torch.testing.assert_close(triton_out.cpu(), cpu_out, equal_nan=True, rtol=2e-5, atol=2e-5,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("distance", [0, 1])
@pytest.mark.parametrize("kind", [0, 1, 2])
def test_pair_row_stats_with_nan_as_the_cpu_kernel(kind, distance):
    x, labels, ref, ref_labels = _pair_inputs()
    args = (None, kind, distance, KIND_HYPER[kind], -1, 0)
    want = _cpu_kernel("pair_row_stats")(x, labels, ref, ref_labels, *args)
    got = _ops.OPS["pair_row_stats"].triton(*_on(x, labels, ref, ref_labels), *args)
    assert want[3, 0].isnan() and want.isnan().any(1).sum() > 10, want  # row 3: all NaN
    _assert_same(got, want, f"kind {kind}, distance {distance}")


def _row_case():
    gen = torch.Generator().manual_seed(6)
    cos = torch.rand(6, 300, generator=gen) * 2 - 1
    target = torch.randint(0, 300, (6,), generator=gen)
    cos[1, 17] = NAN  # a row with NaN off its target
    cos[2, target[2]] = NAN  # NaN at the target
    cos[4, 3] = NAN  # an ignored row with NaN
    target[4] = -100
    return cos, target


def test_row_ops_with_nan_as_the_cpu_kernels():
    cos, target = _row_case()
    for op, args in [
            ("margin_cross_entropy", (cos, target, None, None, 64.0, 1.0, 0.5, 0.0, False, 0.1,
                                      1e-4, -100, True)),
            ("spherical_z_loss", (cos, target, 1.5, 0.5, -100, True)),
            ("sharded_margin_stats", (cos, target, None, None, 64.0, 1.0, 0.5, 0.0, 100,
                                      -100))]:
        want = _cpu_kernel(op)(*args)
        got = _ops.OPS[op].triton(*_on(*args))
        loss = got[0] if isinstance(got, tuple) else got
        if op != "sharded_margin_stats":
            assert loss[[1, 2]].isnan().all() and not loss[[0, 3, 4, 5]].isnan().any(), \
                f"{op}: {loss}"
            assert loss[4] == 0, op
        for k, (g, w) in enumerate(zip(got if isinstance(got, tuple) else (got,),
                                       want if isinstance(want, tuple) else (want,))):
            _assert_same(g, w, f"{op} output {k}")
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(6, 24, generator=gen), torch.randn(300, 24, generator=gen)
    x[1, 5] = NAN
    x[4, 0] = NAN
    args = (x, w, target, None, None, None, 64.0, 1.0, 0.5, 0.0, False, 0.1, 1e-4, -100, True,
            0, False, True)
    got = _ops.OPS["margin_linear_cross_entropy"].triton(*_on(*args))
    want = _cpu_kernel("margin_linear_cross_entropy")(*args)
    assert got[0][1].isnan() and got[0][4] == 0 and not got[0][[0, 2, 3, 5]].isnan().any()
    _assert_same(got[0], want[0], "margin_linear_cross_entropy loss")


PAIR_LOSSES = [("multi_similarity_loss", {}), ("multi_similarity_loss", dict(mining=False)),
               ("info_nce_loss", {}), ("contrastive_loss", dict(distance="cosine")),
               ("contrastive_loss", dict(distance="euclidean")),
               ("batch_hard_triplet_loss", dict(distance="cosine")),
               ("batch_hard_triplet_loss", dict(distance="euclidean"))]


@pytest.mark.parametrize("name,options", PAIR_LOSSES,
                         ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}"
                              for n, o in PAIR_LOSSES])
def test_pair_losses_with_a_nan_embedding_are_nan(name, options):
    """One NaN coordinate in one embedding (normalised: its whole row, and every similarity
    with it) makes the loss NaN on the Triton backend."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(20, 12, generator=gen)
    labels = torch.randint(0, 3, (20,), generator=gen)
    x[5, 2] = NAN
    fn = getattr(fusedloss, name)
    if name == "info_nce_loss":
        loss = fn(*_on(x, x.flip(0)), backend="triton", **options)
    else:
        loss = fn(*_on(x, labels), backend="triton", **options)
    assert loss.isnan(), f"{name}({options}) = {float(loss)}"
