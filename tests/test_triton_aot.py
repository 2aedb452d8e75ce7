"""Ahead-of-time compilation, for sm_90 and without a GPU, of the Triton kernel variants that the
launchers make (marker `aot`; DESIGN.md, "Testing").

Launches (tests/triton_capture.py's `capture`: the launchers run on CPU tensors and choose as
on an H100, 132 SMs, GPU block sizes; their kernels are recorded, not run):

    modes   every sample of every OpSpec with a Triton backend (every op, dtype and mode, with
            the edge shapes N = 1, C = 1, strided and column-major inputs), forward and
            backward, tf32 off
    edges   per op and dtype, its first sample of that dtype with the inner dimension of its
            2-D inputs widened: C = 4100 for the row ops (BLOCK_C = 4096, the row kernels'
            largest, over two chunks), D = 520 for the tiled ops, those whose schema takes
            block_size (the largest BLOCK_DO of every dtype, over several D blocks), these
            launched as on a GPU of LOOP_SMS = 1 SM, so that every split of an inner loop
            holds several blocks: the loop code of a large problem, whose trip count is a
            kernel argument, where small shapes on 132 SMs get one block per split, a
            constant; fp32 also with tf32 on
    blocks  per tiled op and dtype, the widened sample with block_size = 128 and 256 passed
            to every op that takes one, as a user's `block_size=` reaches them; the launchers
            cap it (triton_kernels/_common.py cap_block)

A variant is what Triton compiles once: the kernel, its signature (pointer dtypes; integers
specialised as == 1 or divisible by 16, as a CUDA launch of the same shapes sees them),
constexprs and options (tests/triton_capture.py, Launch.key). To stay within minutes on two
cores, variants that differ only in the divisibility-by-16 attributes are compiled once, the
first seen (`configuration`); bench/triton_aot_table.py --every-alignment compiles each.
Each is compiled with triton.compile for GPUTarget("cuda", 90, 32) in worker processes, and
its PTX goes once more through Triton's bundled ptxas with the options Triton passes it, with
-v: registers, stack and spill bytes of every function (the kernel and its noinline callees).
Those logs are kept on disk beside Triton's cache (keyed by the PTX), so that a second run
costs the cache look-ups only.

Checks: every variant compiles; its shared memory is within sm_90's 227 KB per block; no
variant spills registers, whether its block sizes are the launchers' own (default) or a
user's block_size after the cap, except the default configurations of KNOWN_DEFAULT_SPILLS,
each within the bytes recorded there. bench/triton_aot_table.py writes the per-kernel table
(bench/results/triton_aot_sm90.md) from the same functions.
"""
import contextlib
import functools
import hashlib
import importlib
import json
import os
import re
import subprocess
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import pytest
import torch

pytest.importorskip("triton")

import fusedloss  # noqa: E402,F401  (makes every Op)
from fusedloss import _ops  # noqa: E402
from fusedloss.specs import Sample, registry  # noqa: E402

import triton_capture as tc  # noqa: E402

pytestmark = pytest.mark.aot

SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may opt in to on sm_90
WIDE_SCORES = 4100  # C of the "edges" launches of the row ops: BLOCK_C = 4096, two chunks
WIDE_EMBEDDINGS = 520  # D of the "edges" launches of the tiled ops: the largest BLOCK_DO
LOOP_SMS = 1  # the SM count of the tiled ops' "edges" launches: several blocks per split
USER_BLOCKS = (128, 256)  # the user block sizes of the "blocks" launches
KERNEL_MODULES = ("margin", "margin_linear", "pairs", "sharded", "spherical")


# ---------------------------------------------------------------------------------------
# Launches


class Call(NamedTuple):
    """One public call whose launches are recorded: `run()` makes it (forward and backward);
    `user_block` is the block_size forced on the ops that take one (None: the launchers'
    choice); `tf32` the tl.dot precision of fp32; `sms` the SM count the launchers see."""
    origin: str
    kind: str  # "modes", "edges" or "blocks" (module docstring)
    run: Callable[[], object]
    user_block: Optional[int]
    tf32: bool
    sms: int = tc.H100_SMS


class Recorded(NamedTuple):
    launch: tc.Launch
    call: Call


def _block_size_ops() -> Dict[str, int]:
    """{op name: position of its block_size argument} for the ops whose schema has one."""
    found = {}
    for name, op in _ops.OPS.items():
        arguments = [a.name for a in op.cpp._schema.arguments]
        if "block_size" in arguments:
            found[name] = arguments.index("block_size")
    return found


@contextlib.contextmanager
def user_block_size(block: int):
    """Within the block, every Triton op that takes block_size gets `block`, whatever its
    caller passed: what `block_size=block` of a public function hands to the launchers."""
    replaced = {}
    for name, position in _block_size_ops().items():
        op = _ops.OPS[name]
        triton_op = op.triton

        def forced(*args, _op=triton_op, _position=position, **kwargs):
            args = list(args)
            args[_position] = block
            return _op(*args, **kwargs)

        replaced[name] = triton_op
        op.__dict__["triton"] = forced  # Op.triton is a cached_property: the instance wins
    try:
        yield
    finally:
        for name, triton_op in replaced.items():
            _ops.OPS[name].__dict__["triton"] = triton_op


def widened(sample: Sample, width: int) -> Sample:
    """`sample` with the inner dimension of its 2-D floating inputs (the columns of its first
    one, and of every other one with as many) repeated out to `width` columns, contiguous;
    a keyword `num_classes` equal to the old width (a single shard's class count) follows."""
    floats = [t for t in sample.inputs
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2]
    inner = floats[0].shape[1]

    def widen(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2 \
                and t.shape[1] == inner:
            return t.repeat(1, -(-width // inner))[:, :width].contiguous()
        return t

    kwargs = dict(sample.kwargs)
    if kwargs.get("num_classes") == inner:
        kwargs["num_classes"] = width
    return Sample(f"{sample.id}, {width} wide", tuple(widen(t) for t in sample.inputs), kwargs,
                  sample.names)


def _triton_specs():
    return [spec for spec in registry() if "triton" in spec.backends]


def _first_per_dtype(samples: List[Sample]) -> List[Sample]:
    seen = {}
    for sample in samples:
        seen.setdefault(sample.dtype, sample)
    return list(seen.values())


def _uses_block_size(spec) -> bool:
    return bool(set(spec.ops) & set(_block_size_ops()))


def calls() -> List[Call]:
    """The public calls of the module docstring: edges and blocks, then modes."""
    out, modes = [], []
    for spec in _triton_specs():
        samples = spec.samples("cpu")
        modes += [Call(f"{spec.name}[{sample.id}]", "modes",
                       functools.partial(tc.run_sample, spec, sample), None, False)
                  for sample in samples]
        tiled = _uses_block_size(spec)
        for sample in _first_per_dtype(samples):
            wide = widened(sample, WIDE_EMBEDDINGS if tiled else WIDE_SCORES)
            name = f"{spec.name}[{wide.id}]"
            run = functools.partial(tc.run_sample, spec, wide)
            sms = LOOP_SMS if tiled else tc.H100_SMS
            out.append(Call(name, "edges", run, None, False, sms))
            if wide.dtype == torch.float32:
                out.append(Call(name + " tf32", "edges", run, None, True, sms))
            if tiled:
                out += [Call(f"{name} block_size={b}", "blocks", run, b, False, sms)
                        for b in USER_BLOCKS]
    return out + modes


def _record(call: Call) -> List[tc.Launch]:
    # Run the launches (under the interpreter) only where the code after a launch indexes with
    # its output (pair_extrema's indices); else record them alone, which is much faster.
    for execute in (False, True):
        forced = user_block_size(call.user_block) if call.user_block else contextlib.nullcontext()
        try:
            with forced, tc.capture(sms=call.sms, tf32=call.tf32, execute=execute) as found:
                call.run()
            return found
        except (IndexError, RuntimeError):
            if execute:
                raise
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=None)
def recorded() -> Tuple[Recorded, ...]:
    """Every launch of every call of `calls()`, with the call that made it."""
    out = []
    for call in calls():
        try:
            found = _record(call)
        except Exception as exc:
            raise RuntimeError(f"{call.origin}: {exc!r}") from exc
        out += [Recorded(launch, call) for launch in found]
    return tuple(out)


class Variant(NamedTuple):
    """A compiled variant: one of its launches, the calls that launch it, whether any of them
    left the block sizes to the launchers (default), and their kinds."""
    launch: tc.Launch
    origins: Tuple[str, ...]
    default: bool
    kinds: frozenset = frozenset()


def configuration(launch: tc.Launch) -> str:
    """The launch's variant less Triton's divisibility-by-16 attributes of pointers and
    integers: its kernel, signature (with integers == 1 as constants), constexprs and options."""
    return repr((launch.name, sorted(launch.signature.items()),
                 sorted((k, str(v)) for k, v in launch.constexprs.items()),
                 sorted(launch.options.items())))


def variants(records=None, every_alignment: bool = False) -> List[Variant]:
    """The variants to compile among `records` (default: `recorded()`), first seen first: one
    per configuration (its first launch), or with `every_alignment` one per Launch.key (every
    divisibility specialisation that the calls produced)."""
    group = (lambda launch: launch.key) if every_alignment else configuration
    launches: Dict[str, tc.Launch] = {}
    origins: Dict[str, List[str]] = defaultdict(list)
    default: Dict[str, bool] = defaultdict(bool)
    kinds: Dict[str, set] = defaultdict(set)
    for launch, call in (recorded() if records is None else records):
        key = group(launch)
        launches.setdefault(key, launch)
        origins[key].append(call.origin)
        default[key] |= call.user_block is None
        kinds[key].add(call.kind)
    return [Variant(launches[k], tuple(origins[k]), default[k], frozenset(kinds[k]))
            for k in launches]


# ---------------------------------------------------------------------------------------
# ptxas -v


class FunctionUse(NamedTuple):
    """ptxas -v of one function of a compiled kernel."""
    function: str
    registers: int
    stack: int  # bytes of stack frame per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes


_PTXAS_FUNCTION = re.compile(
    r"(?:Compiling entry function|Function properties for) '?([^'\s]+)'?")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def _function_name(symbol: str) -> str:
    """A Triton noinline function's name from its symbol ("fusedloss_$_triton_kernels_$_pairs_$_
    _near_pair_pass__Pfp32_..." -> "_near_pair_pass"); other symbols as they are."""
    if "_$_" not in symbol:
        return symbol
    return symbol.split("_$_")[-1].split("__")[0]


def parse_ptxas(log: str) -> List[FunctionUse]:
    """The functions of a `ptxas -v` log: for each, its stack frame, spill bytes and (for the
    functions that report one) register count."""
    uses: Dict[str, list] = {}
    current = None
    for line in log.splitlines():
        m = _PTXAS_FUNCTION.search(line)
        if m:
            current = _function_name(m.group(1))
            uses.setdefault(current, [0, 0, 0, 0])
            continue
        m = _PTXAS_FRAME.search(line)
        if m and current is not None:
            uses[current][1:] = [int(g) for g in m.groups()]
            continue
        m = _PTXAS_REGISTERS.search(line)
        if m and current is not None:
            uses[current][0] = int(m.group(1))
    return [FunctionUse(name, *numbers) for name, numbers in uses.items()]


def _ptxas_command(ptx_path: str, compiled) -> List[str]:
    """Triton 3.9's ptxas invocation for a cubin (backends/nvidia/compiler.py make_cubin), with
    -v: its bundled ptxas for the target, --fmad=false where the kernel has fp fusion off."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    arch = compiled.metadata["target"][1]
    fmad = [] if compiled.metadata.get("enable_fp_fusion", True) else ["--fmad=false"]
    return [get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}", ptx_path, "-o", ptx_path + ".cubin"]


def _ptxas_cache_dir() -> str:
    from triton import knobs

    path = os.path.join(knobs.cache.dir, "fusedloss-aot-ptxas")
    os.makedirs(path, exist_ok=True)
    return path


def ptxas_log(compiled) -> str:
    """`ptxas -v` of the compiled variant's PTX (cached on disk by PTX and command)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        command = _ptxas_command(ptx_path, compiled)
        key = hashlib.sha256((compiled.asm["ptx"] + " ".join(command[1:])).encode()).hexdigest()
        cached = os.path.join(_ptxas_cache_dir(), key + ".json")
        if os.path.exists(cached):
            with open(cached) as f:
                return json.load(f)["log"]
        with open(ptx_path, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run(command, check=True, capture_output=True, text=True).stderr
    with open(cached + ".tmp", "w") as f:
        json.dump({"log": log}, f)
    os.replace(cached + ".tmp", cached)
    return log


# ---------------------------------------------------------------------------------------
# Compilation


class Result(NamedTuple):
    """A compiled variant: its shared memory (bytes per block) and ptxas -v per function."""
    variant: Variant
    shared: int
    functions: Tuple[FunctionUse, ...]

    @property
    def registers(self) -> int:
        return max(f.registers for f in self.functions)

    @property
    def spills(self) -> int:
        """Bytes of spill stores and loads over all functions, per thread."""
        return sum(f.spill_stores + f.spill_loads for f in self.functions)

    def spill_text(self) -> str:
        return ", ".join(f"{f.function}: {f.spill_stores} B stores, {f.spill_loads} B loads"
                         for f in self.functions if f.spill_stores or f.spill_loads)


def compile_variants(found: List[Variant], target=tc.SM90) -> List[Result]:
    """Every variant compiled once for `target` (in parallel worker processes), then its ptxas
    -v (in parallel threads)."""
    kernels = tc.compile_all([v.launch for v in found], target)
    compiled = [kernels[v.launch.key] for v in found]
    with ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 16))) as threads:
        logs = list(threads.map(ptxas_log, compiled))
    return [Result(v, c.metadata["shared"], tuple(parse_ptxas(log)))
            for v, c, log in zip(found, compiled, logs)]


def table(results: List[Result]) -> str:
    """Markdown: per kernel, its variants, the largest register count, shared memory and spill
    of any of them, and how many spill; then every spilling variant."""
    rows = defaultdict(list)
    for r in results:
        rows[r.variant.launch.name].append(r)
    lines = ["| kernel | variants | default | max registers | max shared memory (B) | "
             "max spill (B, stores + loads) | variants with spills |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in sorted(rows):
        rs = rows[name]
        lines.append(f"| `{name}` | {len(rs)} | {sum(r.variant.default for r in rs)} | "
                     f"{max(r.registers for r in rs)} | {max(r.shared for r in rs)} | "
                     f"{max(r.spills for r in rs)} | {sum(r.spills > 0 for r in rs)} |")
    lines.append(f"| all | {len(results)} | {sum(r.variant.default for r in results)} | "
                 f"{max(r.registers for r in results)} | {max(r.shared for r in results)} | "
                 f"{max(r.spills for r in results)} | {sum(r.spills > 0 for r in results)} |")
    spilling = [r for r in results if r.spills]
    if spilling:
        lines += ["", "Variants that spill:", ""]
        lines += [f"- {r.variant.launch.describe()} "
                  f"({'default' if r.variant.default else 'user block_size'}; "
                  f"{r.spill_text()}; from {r.variant.origins[0]})" for r in spilling]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def results() -> List[Result]:
    return compile_variants(variants())


# ---------------------------------------------------------------------------------------
# Tests


def _kernels_of(module_name: str) -> List[str]:
    """The kernels (jit functions named *_kernel) of a module of fusedloss.triton_kernels."""
    module = importlib.import_module(f"{tc.PACKAGE}.{module_name}")
    return [f"{module_name}.{name}" for name, value in vars(module).items()
            if name.endswith("_kernel") and callable(getattr(value, "fn", None))]


def test_every_kernel_is_launched():
    kernels = {k for m in KERNEL_MODULES for k in _kernels_of(m)}
    launched = {r.launch.name for r in recorded()}
    assert kernels - launched == set(), "kernels that no recorded call launches"


def test_every_variant_compiles_within_the_sm90_shared_memory(results):
    too_big = [f"{r.variant.launch.describe()}: {r.shared} B" for r in results
               if r.shared > SMEM_LIMIT]
    assert not too_big, f"shared memory above {SMEM_LIMIT} B per block:\n" + "\n".join(too_big)


# Default configurations that spill on sm_90 with Triton 3.9 and its ptxas: (kernel, the
# constexprs that select them, the most bytes of spill stores + loads per thread allowed over
# all functions). Removing them means new block sizes, warps or stages for these kernels, a
# choice to make from time measured on a GPU (fewer D columns per gradient program, say,
# multiplies the recomputed matmul work). A default variant outside this list must not
# spill, none in it may spill more, and an entry that selects no spilling variant must go.
KNOWN_DEFAULT_SPILLS = [
    # fp32 fused linear gradients at BLOCK_DO = 256 (~40 B ieee, ~90 B tf32)
    ("margin_linear._grad_kernel", dict(BLOCK_DO=256), 100),
    # euclidean pair gradients: mostly in the noinline near-pair pass (_near_pair_pass)
    ("pairs._grad_kernel", dict(DISTANCE=1), 700),
    # fp32 without tf32: SupCon statistics
    ("pairs._row_stats_kernel", dict(KIND=1, PRECISION="ieee"), 24),
    # fused linear statistics without normalisation at BLOCK_D = 32, found by the
    # linear_ldr_kl_loss sample N = 1, C = 1, D = 1 (4 B stores, 4 B loads)
    ("margin_linear._lse_kernel", dict(NORMALIZE=False, BLOCK_D=32), 8),
]


def _known_spill(launch: tc.Launch) -> Optional[int]:
    """The allowance of the first KNOWN_DEFAULT_SPILLS entry that selects `launch`, or None."""
    for index, (name, constexprs, _) in enumerate(KNOWN_DEFAULT_SPILLS):
        if launch.name == name and all(
                name_ in launch.arg_names and (launch.arg_names.index(name_),) in
                launch.constexprs and launch.constexpr(name_) == value
                for name_, value in constexprs.items()):
            return index
    return None


def _unexpected_spills(results: List[Result]) -> Tuple[List[str], set]:
    """Messages for the results that spill outside KNOWN_DEFAULT_SPILLS or beyond its bytes,
    and the indices of the entries that some result used."""
    messages, used = [], set()
    for r in results:
        if not r.spills:
            continue
        known = _known_spill(r.variant.launch)
        if known is not None:
            used.add(known)
        if known is None or r.spills > KNOWN_DEFAULT_SPILLS[known][2]:
            messages.append(f"{r.variant.launch.describe()}: {r.spill_text()} "
                            f"(from {r.variant.origins[0]})")
    return messages, used


def test_no_register_spills_in_default_configurations(results):
    spilling, used = _unexpected_spills([r for r in results if r.variant.default])
    assert not spilling, "default configurations that spill registers:\n" + "\n".join(spilling)
    stale = [KNOWN_DEFAULT_SPILLS[i] for i in range(len(KNOWN_DEFAULT_SPILLS)) if i not in used]
    assert not stale, f"KNOWN_DEFAULT_SPILLS entries that select no spilling variant: {stale}"


def test_user_block_sizes_are_capped_to_spill_free_blocks(results):
    """block_size = 128 and 256 launch only variants that spill no more than the default
    configurations: the cap brings them back to the launchers' own tiles."""
    blocks = [r for r in results if "blocks" in r.variant.kinds]
    assert blocks, "no variant of a block_size call was compiled"
    spilling, _ = _unexpected_spills(blocks)
    assert not spilling, "user block sizes that spill after the cap:\n" + "\n".join(spilling)


def test_ptxas_log_parsing():
    log = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
           "ptxas info    : Function properties for _k\n"
           "    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 128 registers, used 1 barriers, 16 bytes cumulative stack size\n"
           "ptxas info    : Function properties for _near_pair_pass\n"
           "    40 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    assert parse_ptxas(log) == [FunctionUse("_k", 128, 16, 12, 8),
                                FunctionUse("_near_pair_pass", 0, 40, 0, 0)]
