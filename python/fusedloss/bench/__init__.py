"""The benchmark engine behind ``python -m fusedloss.bench``: its registry of loss families.

The engine knows no loss. A *family* is one function, registered with ``@family("name")``,
that returns a :class:`Family`: its cases (plain dicts of shape parameters), a function
building the inputs of a case, its contenders (name -> function ``(case, inputs) -> step``;
``step()`` runs forward and backward and returns the loss), and everything the report says
of it (notes, targets, what its GB/s and TFLOP/s count). The families live in
``fusedloss.benchmarks``, one module per op family; :func:`load_families` imports the
modules that the op registry names (``fusedloss.specs.benchmark_families``). Adding a loss
family is one new function there; the timing, the memory measurement, the ratios, the
tables, the json and the plot come from the engine.

The package, by concern:

- this module: the registry and what the family modules use (Family, family, grid,
  compiled, peers, api, kernel_check, Unavailable, NotInstalled, DTYPES, SHORT, MiB);
- ``timing``: the timed, interleaved runs of a case's contenders (:func:`timing.run_case`);
- ``memory``: peak memory of one forward + backward (CPU: a fresh subprocess per case and
  contender, ``python -m fusedloss.bench.memory``; CUDA: ``max_memory_allocated``);
- ``report``: the machine, the derived figures, the targets, the markdown, the plot;
- ``__main__``: the command line, ``python -m fusedloss.bench --help``.

Importing this module imports neither the family modules, nor matplotlib, nor triton.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
from typing import Callable, Dict, List, Optional, Union

import torch

MiB = 1 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class Unavailable(Exception):
    """A contender that cannot run here (backend not built, library not installed)."""


class NotInstalled(Unavailable):
    """A peer library that is not installed: its row stays in the table, "not installed"."""

    def __init__(self, dist: str):
        super().__init__(f"{dist} not installed")


Step = Callable[[], torch.Tensor]
Contender = Callable[[dict, dict], Step]  # (case, inputs) -> step; raises Unavailable


@dataclasses.dataclass
class Family:
    """What a loss family gives the engine.

    cases: dicts with at least ``N``, ``C``, ``dtype`` (a key of DTYPES) and ``label``
        (a short human name of the case); the plot draws one line per contender against
        ``C`` for the cases that agree in everything but ``C`` and the keys in
        ``plot_along``, titled with the label less its part from " C=" on (or less its
        last word when it has no " C="), and the family's name; a case with ``plot_x`` (a
        key of the case) and ``plot_x_label`` is drawn against that key instead of ``C``.
    make_inputs(case, device) -> dict: built once per case and shared by its contenders;
        ``inputs["leaves"]`` lists the tensors whose ``.grad`` the engine resets to None;
        ``inputs["report"]``, when present, maps a contender to what its steps measured
        themselves (``memory`` of processes the engine does not see, ``details``: lines for
        the notes, any json-able figures), merged into its record after the timing; a record
        that has ``memory`` then is not measured again.
    contenders: name -> (case, inputs) -> step. ``step()`` runs forward and backward and
        returns the loss. Names in ``fused`` get a bandwidth figure, ``baselines`` =
        (eager name, compiled name) are the references of the ratio columns.
    bytes_moved(case) -> int or None: the bytes the fused kernels read and write, for GB/s.
    flops(case) -> int or None: the floating-point operations of one forward + backward of
        a fused contender, for TFLOP/s (matmul-bound families, where GB/s says little).
        A family that gives either says in its notes what it counts.
    notes: lines of the report's notes (the same line from two families is shown once).
    mem_factor: rough peak bytes of the hungriest contender in units of N*C*itemsize,
        inputs included; a case that would not fit in the free memory is skipped.
    case_view(family, case) -> Family or None: the family as one case sees it, for a family
        whose cases differ in inputs or contenders (None: every case sees the family).
    targets: goals to report (never to assert), each a dict with ``case`` (the key/values a
        case must match), ``contender``, and ``time_vs_eager`` / ``memory_vs_eager``: the
        largest acceptable contender / eager-baseline ratio of time / peak extra memory;
        with ``baseline`` (a contender name) the ratios are to that contender instead.
    x_label: what ``C`` is, for the plot's x axis.
    plot_along: case keys besides ``C`` that vary along one plotted line (a family whose
        ``N`` grows with ``C``).
    """

    name: str
    cases: List[dict]
    make_inputs: Callable[[dict, str], dict]
    contenders: Dict[str, Contender]
    baselines: tuple = ("baseline-eager", "baseline-compile")
    fused: tuple = ()
    bytes_moved: Callable[[dict], Optional[int]] = lambda case: None
    flops: Callable[[dict], Optional[int]] = lambda case: None
    notes: List[str] = dataclasses.field(default_factory=list)
    mem_factor: float = 8.0
    case_view: Optional[Callable[["Family", dict], "Family"]] = None
    targets: List[dict] = dataclasses.field(default_factory=list)
    x_label: str = "number of classes C"
    plot_along: tuple = ()

    def seen_by(self, case: dict) -> "Family":
        """The family as `case` sees it (see case_view)."""
        return self.case_view(self, case) if self.case_view is not None else self


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

FamilyFn = Callable[..., Family]  # (device, large, dtypes or None) -> Family
DefaultRule = Union[bool, Callable[[str], bool]]

FAMILIES: Dict[str, FamilyFn] = {}
# name -> whether the family runs when --family is not given: True, False, or a predicate of
# the device, whose docstring says when (for --help).
DEFAULTS: Dict[str, DefaultRule] = {}


def family(name: str, default: DefaultRule = True):
    """Register ``fn(device, large, dtypes) -> Family`` under ``name``. ``default``: whether
    the run without --family includes it: True, False, or ``default(device) -> bool``."""

    def register(fn):
        FAMILIES[name] = fn
        DEFAULTS[name] = default
        return fn

    return register


def default_families(device: str) -> List[str]:
    """The families of a run without --family on `device`, in registration order."""
    return [name for name, rule in DEFAULTS.items()
            if (rule(device) if callable(rule) else rule)]


def load_families() -> Dict[str, FamilyFn]:
    """Import the family modules that the op registry names (registration order = the order
    of the default run); they import this module, so it imports them only here."""
    from fusedloss.specs import benchmark_families

    for module in benchmark_families():
        importlib.import_module(f"fusedloss.benchmarks.{module}")
    return FAMILIES


# --------------------------------------------------------------------------------------
# What the families use
# --------------------------------------------------------------------------------------

def compiled(fn: Callable) -> Callable:
    """torch.compile for a baseline: static shapes, so each case gets its own graph, as a
    training run with fixed shapes would. The engine resets dynamo between cases."""
    return torch.compile(fn, dynamic=False)


def grid(Ns, Cs, dtypes, **params) -> List[dict]:
    """Cases: every dtype x N x C, with ``params`` in each."""
    return [dict(N=n, C=c, dtype=d, **params) for d in dtypes for n in Ns for c in Cs]


def peers() -> Dict[str, str]:
    """Installed peer libraries of the cross-entropy families: name -> version (import-guarded,
    nothing imported)."""
    found = {}
    for dist, mod in (("liger-kernel", "liger_kernel"), ("cut-cross-entropy", "cut_cross_entropy")):
        if importlib.util.find_spec(mod) is not None:
            try:
                found[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                found[dist] = "?"
    return found


def api(name: str) -> Callable:
    """The public function ``fusedloss.<name>``; Unavailable where this build lacks it."""
    import fusedloss

    fn = getattr(fusedloss, name, None)
    if fn is None:
        raise Unavailable(f"fusedloss.{name} is not in this build")
    return fn


def kernel_check(backend: str, op: str, device: torch.device) -> str:
    """The backend that `backend` resolves to for `op` on `device`; Unavailable where it
    cannot run there (backend missing, or no kernel of `op` for it)."""
    from fusedloss._ops import resolve_backend

    try:
        return resolve_backend(backend, device, op)
    except (RuntimeError, ValueError) as exc:
        raise Unavailable(str(exc)) from exc
