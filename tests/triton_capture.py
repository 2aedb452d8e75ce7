"""The Triton launches that the real launchers make, captured without running them, and their
compilation for a GPU target without a GPU. Used by tests/test_triton_int64.py,
tests/test_triton_launch.py and tests/test_triton_aot.py.

    with capture() as launches:              # a GPU's launch choices forced; nothing runs
        fusedloss.margin_cross_entropy(cos, target, backend="triton")  # CPU tensors
    variants = unique(launches)
    texts = ttir_all(variants)               # {key: TTIR for sm_90}, compiled in parallel
    kernels = compile_all(variants)          # {key: Compiled (asm: ttir .. ptx, cubin; metadata)}

How it works:
- `capture()` records every launch of a kernel of fusedloss.triton_kernels (JITFunction.run and
  InterpretedFunction.run patched) instead of running it, and makes the launchers choose as on
  a GPU: in every kernel module, `interpreted` answers False (GPU block sizes, no bf16
  widening), `sm_count` answers `sms` (the split of inner loops) and `allow_tf32` answers
  `tf32`. The launchers then run on CPU tensors as they would on CUDA ones; the kernels'
  outputs stay uninitialised, which the torch code after a launch (combines only) tolerates.
- A Launch holds what JITFunction.run would compile: the kernel's module and name, its
  signature, constexprs and specialization attributes, from Triton's own binder (16-byte
  alignment of pointers; divisibility by 16 and == 1 of integers: a CUDA launch of the same
  shapes sees the same, both allocators aligning to at least 64 bytes), and the launch
  options (num_warps, num_stages). Equal `key`s compile to the same code.
- Compilation runs in worker processes started with TRITON_INTERPRET=0: once a process has
  imported Triton under the interpreter, triton.language's own jit helpers (tl.zeros, the
  reductions' combine functions) are interpreted functions that the compiler cannot take.
  Results are cached by (key, target) for the session; Triton's file cache
  (~/.triton/cache) serves later sessions.
"""
import atexit
import concurrent.futures
import contextlib
import importlib
import os
import pickle
import queue
import subprocess
import sys
import threading
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional

SM90 = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp_size) as a plain tuple
SM80 = ("cuda", 80, 32)
H100_SMS = 132  # SMs of an H100 SXM and of an H200

PACKAGE = "fusedloss.triton_kernels"
MODULES = ("_common", "margin", "margin_linear", "pairs", "sharded", "spherical")
FORCED = ("interpreted", "sm_count", "allow_tf32")  # the launch choices `capture` forces

_lock = threading.RLock()


# ---------------------------------------------------------------------------------------
# Launches

_NOT_OPTIONS = ("debug", "instrumentation_mode", "fpsan_homomorphic_casts")


class Launch:
    """One kernel launch as JITFunction.run would compile it.

    module, kernel_name: where the kernel lives ("fusedloss.triton_kernels.pairs",
    "_extrema_kernel"); name: "pairs._extrema_kernel"; arg_names: its parameters in order;
    signature {arg: type}, constexprs {path: value}, attrs {path: specialization}
    (ASTSource's arguments); options: the launch options (num_warps, num_stages) that
    triton.compile parses per target; grid: the launch grid; key: names the variant."""

    def __init__(self, kernel, args: tuple, kwargs: dict, grid):
        from triton.compiler import make_backend
        from triton.backends.compiler import GPUTarget
        from triton.runtime.jit import JITFunction, create_function_from_signature

        jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
        self.module = jit.fn.__module__
        self.kernel_name = jit.fn.__name__
        self.name = f"{self.module.rsplit('.', 1)[-1]}.{self.kernel_name}"
        self.arg_names = list(jit.arg_names)
        self.grid = tuple(grid)
        backend = make_backend(GPUTarget(*SM90))
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        kwargs = dict(kwargs)
        kwargs.setdefault("debug", False)
        bound, specialization, _ = binder(*args, **kwargs)
        _, self.signature, self.constexprs, self.attrs = jit._pack_args(
            backend, kwargs, bound, specialization, None)
        self.options = {k: v for k, v in kwargs.items()
                        if k not in self.arg_names and k not in _NOT_OPTIONS}
        self.key = repr((self.name, sorted(self.signature.items()),
                         sorted((k, _plain(v)) for k, v in self.constexprs.items()),
                         sorted(self.attrs.items()), sorted(self.options.items())))

    def constexpr(self, name: str):
        """The value of the constexpr parameter `name`."""
        return self.constexprs[(self.arg_names.index(name),)]

    def describe(self) -> str:
        """"pairs._extrema_kernel[DISTANCE=1, BLOCK_Q=64, ..., num_warps=8]" (the constexprs
        and options of the variant)."""
        consts = [f"{self.arg_names[p[0]]}={_plain(v)}" for p, v in self.constexprs.items()
                  if len(p) == 1]
        opts = [f"{k}={v}" for k, v in sorted(self.options.items())]
        return f"{self.name}[{', '.join(consts + opts)}]"

    def job(self) -> tuple:
        return (self.module, self.kernel_name, self.signature, self.constexprs, self.attrs,
                self.options)

    def __repr__(self):
        return f"Launch({self.describe()})"


def _plain(v):
    return v if isinstance(v, (int, float, bool, str, type(None))) else str(v)


@contextlib.contextmanager
def capture(sms: int = H100_SMS, tf32: bool = False,
            execute: bool = False) -> Iterator[List[Launch]]:
    """Within the block, every launch of a fusedloss.triton_kernels kernel is recorded as a
    Launch in the yielded list, and the kernel modules choose as on a GPU with `sms` SMs
    (tl.dot in tf32 for fp32 when `tf32`). The launches are not run, unless `execute`: then
    they run too (under the interpreter for CPU tensors, at the GPU's block sizes), so that
    code after a launch that reads its outputs (indices, say) gets real values. One thread
    at a time."""
    from torch._library.triton import set_wrap_triton_enabled
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: List[Launch] = []
    original = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            launches.append(Launch(self, args, kwargs, grid))
        if execute:
            return original[type(self)](self, *args, grid=grid, warmup=warmup, **kwargs)

    forced = dict(interpreted=lambda device: False, sm_count=lambda device: sms,
                  allow_tf32=lambda: tf32)
    with _lock:
        patched = []
        try:
            for name in MODULES:
                module = importlib.import_module(f"{PACKAGE}.{name}")
                for attr, value in forced.items():
                    if hasattr(module, attr):
                        patched.append((module, attr, getattr(module, attr)))
                        setattr(module, attr, value)
            for cls in (JITFunction, InterpretedFunction):
                patched.append((cls, "run", cls.run))
                cls.run = run
            with set_wrap_triton_enabled(False):  # launch eagerly, as a triton_op does
                yield launches
        finally:
            for owner, attr, value in reversed(patched):
                setattr(owner, attr, value)


def unique(launches: Iterable[Launch]) -> List[Launch]:
    """The distinct variants among `launches`, first occurrence first."""
    seen: Dict[str, Launch] = {}
    for launch in launches:
        seen.setdefault(launch.key, launch)
    return list(seen.values())


def run_sample(spec, sample, backend: str = "triton"):
    """Forward and backward of one OpSpec sample on `backend`, every floating input a leaf;
    the outputs (a tensor, or a tuple for the miner)."""
    import torch

    inputs = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor)
              and t.is_floating_point() else t for t in sample.inputs]
    out = spec.call(sample)(backend, *inputs)
    outputs = out if isinstance(out, tuple) else (out,)
    grads = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if grads:
        torch.autograd.backward(grads, [torch.ones_like(t) for t in grads])
    return out


def spec_launches(device: Optional[str] = None, sms: int = H100_SMS, tf32: bool = False,
                  specs: Optional[Iterable] = None) -> List[Launch]:
    """The launches of forward and backward of every sample of every OpSpec with a Triton
    backend (fusedloss.specs.registry(), or `specs`), captured with a GPU's choices. The
    launches run (capture's `execute`): the pair losses index with pair_extrema's output. On
    `device`: by default CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py sets it
    without a GPU), CUDA tensors otherwise."""
    import torch

    from fusedloss._ops import triton_interpreted
    from fusedloss.specs import registry

    if device is None:
        device = "cuda" if torch.cuda.is_available() and not triton_interpreted() else "cpu"

    launches: List[Launch] = []
    for spec in (registry() if specs is None else specs):
        if "triton" not in spec.backends:
            continue
        for sample in spec.samples(device):
            with capture(sms=sms, tf32=tf32, execute=True) as found:
                try:
                    run_sample(spec, sample)
                except Exception as exc:
                    raise RuntimeError(f"{spec.name}[{sample.id}] under capture: {exc!r}") \
                        from exc
            launches.extend(found)
    return launches


# ---------------------------------------------------------------------------------------
# Compilation in worker processes, cached by (variant, target) for the session

class Compiled(NamedTuple):
    """A compiled variant: asm {stage: text} (ttir, ttgir, llir, ptx; cubin as bytes) and the
    metadata that Triton writes beside it (shared: bytes of shared memory, num_warps, ...)."""
    name: str
    asm: dict
    metadata: dict


_compiled: Dict[tuple, Compiled] = {}
_ttir: Dict[tuple, str] = {}
_idle: queue.Queue = queue.Queue()
_workers: List["_Worker"] = []

_WORKER_MAIN = r"""
import os, pickle, sys, traceback
sys.path.insert(0, sys.argv[1])
results = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)  # whatever the compiler prints goes to stderr; stdout carries the results
from triton_capture import _work
while True:
    try:
        task = pickle.load(sys.stdin.buffer)
    except EOFError:
        break
    try:
        answer = (True, _work(task))
    except BaseException:
        answer = (False, traceback.format_exc())
    pickle.dump(answer, results)
    results.flush()
"""


class _Worker:
    """A Python process that compiles variants, started with TRITON_INTERPRET=0 (module
    docstring): tasks and results pickled over its stdin and stdout."""

    def __init__(self):
        env = dict(os.environ, TRITON_INTERPRET="0")
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN,
                                      os.path.dirname(os.path.abspath(__file__))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def run(self, task):
        pickle.dump(task, self.proc.stdin)
        self.proc.stdin.flush()
        try:
            ok, answer = pickle.load(self.proc.stdout)
        except EOFError:
            raise RuntimeError(f"compile worker died (exit code {self.proc.wait()})") from None
        if not ok:
            raise RuntimeError(f"compiling {task[0][0]}.{task[0][1]} failed in the worker:\n"
                               f"{answer}")
        return answer

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def _close_workers():
    for worker in _workers:
        worker.close()
    _workers.clear()


def _pool_size() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


def _map(tasks: list) -> list:
    """_work over `tasks` in the worker processes (started on first use, kept for the
    session), results in order."""
    with _lock:
        if not _workers:
            for _ in range(_pool_size()):
                worker = _Worker()
                _workers.append(worker)
                _idle.put(worker)
            atexit.register(_close_workers)

    def one(task):
        worker = _idle.get()
        try:
            return worker.run(task)
        finally:
            _idle.put(worker)

    with concurrent.futures.ThreadPoolExecutor(len(_workers)) as threads:
        return list(threads.map(one, tasks))


def _run_jobs(launches: List[Launch], target: tuple, stage: str, cache: dict) -> dict:
    todo = unique(launch for launch in launches if (launch.key, target) not in cache)
    if todo:
        results = _map([(launch.job(), target, stage) for launch in todo])
        for launch, result in zip(todo, results):
            cache[(launch.key, target)] = result
    return {launch.key: cache[(launch.key, target)] for launch in launches}


def compile_all(launches: Iterable[Launch], target: tuple = SM90) -> Dict[str, Compiled]:
    """{key: Compiled} of every variant among `launches`, compiled with triton.compile for
    `target` (a (backend, arch, warp_size) tuple), in parallel, each variant once."""
    return _run_jobs(list(launches), target, "cubin", _compiled)


def compile_launch(launch: Launch, target: tuple = SM90) -> Compiled:
    return compile_all([launch], target)[launch.key]


def ttir_all(launches: Iterable[Launch], target: tuple = SM90) -> Dict[str, str]:
    """{key: TTIR text} of every variant among `launches` for `target`: the IR after Triton's
    TTIR passes (inlining, canonicalisation, combine, CSE, loop unrolling), without the later
    stages (fast). Taken from a full compilation when one is cached."""
    launches = list(launches)
    done = {l.key: _compiled[(l.key, target)].asm["ttir"] for l in launches
            if (l.key, target) in _compiled}
    rest = [l for l in launches if l.key not in done]
    done.update(_run_jobs(rest, target, "ttir", _ttir))
    return done


def ttir(launch: Launch, target: tuple = SM90) -> str:
    return ttir_all([launch], target)[launch.key]


def _work(task):
    """In a worker: compile one variant up to `stage` ("ttir" or "cubin")."""
    (module, name, signature, constexprs, attrs, options), target, stage = task
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel = getattr(importlib.import_module(module), name)
    src = ASTSource(kernel, signature, constexprs, attrs)
    gpu = GPUTarget(*target)
    if stage == "ttir":
        from triton._C.libtriton import ir

        backend = make_backend(gpu)
        opts = backend.parse_options(dict(options, **src.parse_options()))
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        module_ir = src.make_ir(gpu, opts, backend.get_codegen_implementation(opts),
                                backend.get_module_map(), context)
        stages: dict = {}
        backend.add_stages(stages, opts, src.language)
        return str(stages["ttir"](module_ir, {"target": gpu, **opts.__dict__}))
    compiled = triton.compile(src, target=gpu, options=options)
    metadata = compiled.metadata._asdict()
    metadata["target"] = tuple(target)
    return Compiled(f"{module.rsplit('.', 1)[-1]}.{name}", dict(compiled.asm), metadata)
