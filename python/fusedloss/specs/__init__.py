"""The op registry: one `OpSpec` per public function and one `ModuleSpec` per public module.

Everything the shared tests and the benchmark engine need to know about an op lives in its
spec, written by its family in `fusedloss/specs/<family>.py` (FAMILIES: margin, spherical,
pairs, sharded, ldr_kl, multilabel). The shared tests (tests/test_specs.py, test_compile.py, test_bad_input.py,
test_fuzz.py, test_robustness.py, test_memcheck_subset.py) iterate `registry()`; none keeps a
list of ops of its own. `python -m fusedloss.bench` finds its families through the specs'
`family`. A public name of `fusedloss` or `fusedloss.nn` with neither a spec nor an entry in
`NO_SPEC` fails tests/test_specs.py.

Adding an op, file by file (the README's contributor section says the same):

1. `python/fusedloss/_schemas.py`: its schema line, with the contract as a comment.
2. Kernels: `csrc/cpu/<family>.cpp` (CPU), `csrc/cuda/<family>.cu` with its binding in
   `csrc/cuda/bindings.cpp` (CUDA), a launcher of the op's name in
   `triton_kernels/<family>.py` (Triton, helpers from `triton_kernels/_common.py`).
3. The oracle: plain PyTorch in `python/fusedloss/reference/<family>.py`.
4. The public function in `python/fusedloss/<family>.py`: argument checks (`_checks`),
   backend choice, the `Op` (fake kernel, autograd); exported in `fusedloss/__init__.py`.
5. Its `OpSpec` in `python/fusedloss/specs/<family>.py`, listed in that file's `SPECS`.
6. `tests/test_<family>.py` for what is particular to it (its math, its variants).

Besides its specs, each family file gives `kernel_arguments(op)` (valid arguments of each
of its ops) and `kernel_value_checks()` (wrong values of the ops' arguments); with the wrong
ranks, dtypes and lengths that `kernel_bad_inputs()` derives from the schemas, they are the
wrong calls of the ops themselves that tests/test_kernel_checks.py runs on every backend's
kernel.

The spec's parts, each a function of the device so that one spec serves CPU and GPU:
samples (public calls compared with the fp64 oracle on every backend), op samples
(`torch.library.opcheck` arguments), a compile sample (`torch.compile(fullgraph=True)`),
bad inputs (exception type and message, per backend), a fuzz strategy (hypothesis), stress
cases (threads and memory growth), an empty batch, GPU memcheck cases, and the benchmark
family. Tensors are made by the functions, never at import, so importing a spec costs
nothing and hypothesis is imported by the fuzz strategies only when they run.
"""
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fusedloss
import fusedloss.nn
from fusedloss import _schemas

FAMILIES = ("margin", "spherical", "pairs", "sharded", "ldr_kl", "multilabel")
BACKENDS = ("cpu", "cuda", "triton")

# Public names that are not ops or modules, with the reason they have no spec.
NO_SPEC = {
    "BackendStatus": "a named tuple returned by backends(), not an op",
    "backends": "reports which backends are available; tested in tests/test_build.py",
    "distributed": "process-group helpers of the sharded ops; tested in tests/test_sharded.py",
    "nn": "the package of the modules, each of which has a ModuleSpec",
}


@dataclass(frozen=True)
class Sample:
    """One call of a public function: `function(*inputs, backend=..., **kwargs)`.

    Floating-point tensors in `inputs` are the leaves whose gradients are compared (tests/
    conftest.py's loss_and_grads); integer tensors and None pass through. `names` labels the
    loss and the gradients in failure messages."""

    id: str
    inputs: tuple
    kwargs: Dict[str, Any] = field(default_factory=dict)
    names: Tuple[str, ...] = ("loss", "grad")

    @property
    def dtype(self) -> torch.dtype:
        return next(t.dtype for t in self.inputs
                    if isinstance(t, torch.Tensor) and t.is_floating_point())


@dataclass(frozen=True)
class BadInput:
    """A wrong call and the error it must raise before any kernel runs: `call(backend, device)`
    makes the call with tensors on `device`; `exception` and a fragment of the message are
    the same on every backend listed in `backends` (all of the spec's when empty) and every
    device in `devices` (a check that reads tensor values runs at the call on the CPU only:
    on a GPU it is queued on the device, see fusedloss._checks.target_values)."""

    id: str
    call: Callable[[str, str], Any]
    exception: type
    message: str
    backends: Tuple[str, ...] = ()
    devices: Tuple[str, ...] = ("cpu", "cuda")


@dataclass(frozen=True)
class KernelBadInput:
    """A wrong call of the op `torch.ops.fusedloss.<op>` itself (the kernels check their
    arguments too, for callers that skip the public function): `bad()` gives the arguments,
    by schema name, that replace the valid ones of the family's `kernel_arguments(op)`; every
    backend's kernel raises `exception` with a message that matches the regex `message`."""

    op: str
    id: str
    bad: Callable[[], Dict[str, Any]]
    exception: type
    message: str


@dataclass(frozen=True)
class FuzzCase:
    """One drawn input: `call(backend)` returns the loss; `leaves` are the inputs whose
    gradients are compared with the fp64 reference; `dtype` the dtype of the result."""

    call: Callable[[str], torch.Tensor]
    leaves: List[torch.Tensor]
    dtype: torch.dtype


@dataclass(frozen=True)
class OpSpec:
    """Everything the shared tests and the benchmark engine know of one public function.

    name: the public name, `fusedloss.<name>`. family: one of FAMILIES
    (its modules in every folder, and its benchmark module `fusedloss.benchmarks.<family>`).
    oracle: the reference function that `backend="reference"` runs. ops: the
    `torch.ops.fusedloss` ops the compiled backends dispatch to. backends: the compiled
    backends that have kernels for it ("cpu", "cuda", "triton"; on CUDA tensors "auto" takes
    "cuda", then "triton").
    samples(device): calls compared with the oracle on every backend (edge shapes, strides,
    dtypes). op_samples(device): (op name, arguments) pairs for torch.library.opcheck, which
    also runs `<op>_triton` on CUDA when the op has a Triton twin. compile_sample(device): one
    call for torch.compile(fullgraph=True) (None: `no_compile` says why). bad_inputs(): wrong
    calls. fuzz(data, device, triton): a hypothesis strategy, drawing one FuzzCase (None:
    `no_fuzz` says why).
    stress(device): fixed calls for the thread and memory-growth tests. empty_batch:
    (backend, device, reduction) -> loss of an empty batch, as F.cross_entropy's (None: not a
    per-row loss). memcheck(): small CPU samples, in the dtypes to check, that the GPU memcheck
    subset moves to CUDA and runs under compute-sanitizer (bench/gpu_check.sh).
    differentiable: False for a function that returns integer tensors (the miner's indices),
    which the tests compare exactly and take no gradient of. host_sync: why the function
    synchronises with the host on a GPU by nature (empty: it must not; tests/
    test_no_host_sync.py).
    """

    name: str
    family: str
    oracle: Callable
    ops: Tuple[str, ...]
    backends: Tuple[str, ...]
    samples: Callable[[str], List[Sample]]
    op_samples: Callable[[str], List[Tuple[str, tuple]]]
    compile_sample: Optional[Callable[[str], Sample]]
    bad_inputs: Callable[[], List[BadInput]]
    fuzz: Optional[Callable[..., FuzzCase]] = None
    no_fuzz: str = ""
    no_compile: str = ""
    differentiable: bool = True
    host_sync: str = ""
    stress: Callable[[str], List[Sample]] = lambda device: []
    empty_batch: Optional[Callable[[str, str, str], torch.Tensor]] = None
    memcheck: Callable[[], List[Sample]] = lambda: []

    @property
    def function(self) -> Callable:
        return getattr(fusedloss, self.name)

    def call(self, sample: Sample) -> Callable:
        """`call(backend, *inputs)` of a sample, as tests/conftest.py's drivers take it."""
        fn, kwargs = self.function, sample.kwargs
        return lambda backend, *inputs: fn(*inputs, backend=backend, **kwargs)


@dataclass(frozen=True)
class ModuleSpec:
    """A public module of `fusedloss.nn`: its bad constructor arguments and bad calls
    (`call(backend, device)` as in BadInput; modules take their backend at construction)."""

    name: str
    family: str
    bad_inputs: Callable[[], List[BadInput]]

    @property
    def cls(self) -> type:
        return getattr(fusedloss.nn, self.name)


def registry() -> List[OpSpec]:
    """Every OpSpec, family by family in FAMILIES order."""
    return [spec for family in FAMILIES for spec in _family(family).SPECS]


def module_registry() -> List[ModuleSpec]:
    return [spec for family in FAMILIES for spec in _family(family).MODULE_SPECS]


def kernel_bad_inputs() -> List[KernelBadInput]:
    """The wrong calls of the ops themselves: for every tensor argument of every op (its valid
    value from kernel_arguments), another rank (a ValueError), an integer dtype, or int32 for
    an int64 one (a TypeError), and, for a 1-D one, a row short (a ValueError), each error
    naming the argument; then each family's checks of values and shapes between arguments
    (`kernel_value_checks()`)."""
    cases = []
    for op in _schemas.SCHEMAS:
        for name, value in kernel_arguments(op).items():
            if isinstance(value, torch.Tensor):
                cases += _tensor_argument_cases(op, name, value)
    return cases + [case for family in FAMILIES for case in _family(family).kernel_value_checks()]


def _tensor_argument_cases(op: str, name: str, t: torch.Tensor) -> List[KernelBadInput]:
    other_rank = t[0] if t.dim() > 1 else t[:, None]
    other_dtype = t.long() if t.is_floating_point() else t.int()
    cases = [KernelBadInput(op, f"{name} {t.dim()}-D to {other_rank.dim()}-D",
                            lambda: {name: other_rank}, ValueError, name),
             KernelBadInput(op, f"{name} {t.dtype} to {other_dtype.dtype}",
                            lambda: {name: other_dtype}, TypeError, f"{name}|int64")]
    if t.dim() == 1:
        cases.append(KernelBadInput(op, f"{name} a row short", lambda: {name: t[:-1]},
                                    ValueError, name))
    return cases


def kernel_arguments(op: str) -> Dict[str, Any]:
    """Valid arguments of fusedloss::<op> by schema name, from the family that owns it."""
    for family in FAMILIES:
        arguments = _family(family).kernel_arguments(op)
        if arguments is not None:
            return arguments
    raise KeyError(f"no family gives valid arguments of fusedloss::{op}")


def spec(name: str) -> OpSpec:
    found = [s for s in registry() if s.name == name]
    if not found:
        raise KeyError(f"no OpSpec named {name!r}")
    return found[0]


def benchmark_families() -> List[str]:
    """The modules of fusedloss.benchmarks, in registry order (one per family)."""
    return list(dict.fromkeys(s.family for s in registry()))


def _family(name: str):
    return importlib.import_module(f"fusedloss.specs.{name}")


def on(device: str, *tensors: Optional[torch.Tensor]) -> tuple:
    """The tensors moved to `device` (None stays None)."""
    return tuple(None if t is None else t.to(device) for t in tensors)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_ignored(target: torch.Tensor, rows: Sequence[int], ignore_index: int = -100):
    target = target.clone()
    target[list(rows)] = ignore_index
    return target
