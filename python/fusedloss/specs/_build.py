"""Builders that the specs share: the OpSpec of a row op, empty batches, and bad inputs.

A spec's bad inputs are calls of its public function on good inputs `make(device)` (a tuple
of tensors) changed by `alter(*inputs) -> inputs`, with extra keywords, each with the
exception and a fragment of the message it must raise. Most of them are the cases of the
argument checks of fusedloss._checks, which every public function runs on its tensors and
options; the builders below write each such case once, as a `Case` tuple that a spec's
`bad` (see `bad_calls`) turns into a BadInput."""
from typing import Callable, List, Sequence, Tuple

import torch

import fusedloss
from . import BACKENDS, BadInput, OpSpec, _draw, on


def empty_batch(function: Callable[[], Callable], *shapes: Tuple[int, ...], **fixed) -> Callable:
    """(backend, device, reduction) -> the loss of ``function()`` on an empty batch: floating
    inputs of `shapes` (0 rows where an input has one per row), then no class targets, with
    the keywords `fixed`."""
    return lambda backend, device, reduction: function()(
        *on(device, *(torch.rand(shape) for shape in shapes), torch.zeros(0).long()),
        backend=backend, reduction=reduction, **fixed)


def row_op_spec(name: str, family: str, oracle: Callable, **parts) -> OpSpec:
    """The OpSpec of public function `name`, a loss of scores [N, C] and class targets that one
    row op of the same name runs on every backend (cpu, cuda and triton), its empty batch
    being [0, 7] scores; `parts` are the rest of the spec."""
    return OpSpec(name, family, oracle, ops=(name,), backends=BACKENDS,
                  empty_batch=empty_batch(lambda: getattr(fusedloss, name), (0, 7)), **parts)

# (id, alter, kwargs, exception, message fragment[, devices where it raises at the call])
Case = tuple


def bad_calls(function: Callable[[], Callable], make: Callable, **fixed) -> Callable:
    """bad(id, alter, kwargs, exception, message) -> the BadInput of the call
    ``function()(*alter(*make(device)), backend=backend, **fixed, **kwargs)``, kwargs taking
    precedence over `fixed` (keywords that every call needs, as a shard's class range).
    `function` is a thunk, so that building a spec imports nothing."""
    def bad(id_, alter, kwargs, exc, message, devices=("cpu", "cuda")):
        def call(backend, device):
            return function()(*alter(*make(device)), backend=backend, **{**fixed, **kwargs})
        return BadInput(id_, call, exc, message, devices=devices)
    return bad


def bad_inputs(function: Callable[[], Callable], make: Callable, cases: Sequence[Case],
               **fixed) -> List[BadInput]:
    """The BadInputs of `cases`, as bad_calls(function, make, **fixed) makes them."""
    bad = bad_calls(function, make, **fixed)
    return [bad(*case) for case in cases]


def module_bad(id_: str, build: Callable, exc: type, message: str) -> BadInput:
    """A bad construction or call of a module: build() constructs it (and calls it) with
    tensors on the CPU; a module takes its backend at construction, so the case has none."""
    return BadInput(id_, lambda backend, device: build(), exc, message)


def keep(*inputs):
    """The alter that keeps the good inputs (the case is in its keywords)."""
    return inputs


def at(index: int, change: Callable) -> Callable:
    """The alter that replaces input `index` by change(input)."""
    return lambda *inputs: inputs[:index] + (change(inputs[index]),) + inputs[index + 1:]


def option(id_: str, kwargs: dict, exc: type, message: str) -> Case:
    """A case of bad keywords on the good inputs."""
    return (id_, keep, kwargs, exc, message)


def not_finite(name: str, value: float = float("nan")) -> Case:
    """The case of _checks.finite for keyword `name` = value (nan, inf or -inf)."""
    word = "nan" if value != value else "infinite"
    return option(f"{word} {name}", {name: value}, ValueError,
                  f"{name} must be a finite number, got {value!r}")


def unknown_keyword(name: str) -> Case:
    """A keyword that the function does not take: Python's own TypeError."""
    return option("unknown kw", {name: 0.5}, TypeError, f"unexpected keyword argument '{name}'")


def class_loss_option_cases(unknown: str):
    """The bad keywords that every loss of class targets refuses: an unknown reduction, a float
    ignore_index, and `unknown`, a keyword it does not take."""
    return [
        option("unknown reduction", dict(reduction="avg"), ValueError, "unknown reduction 'avg'"),
        option("float ignore_index", dict(ignore_index=-1.0), TypeError,
               "ignore_index must be an int"),
        unknown_keyword(unknown),
    ]


def floating_matrix(name: str, index: int, shape: Tuple[int, int],
                    cases=("not a tensor", "int", "1-D", "3-D")) -> List[Case]:
    """The cases of _checks.floating_tensor(ndim=2) for input `index`, the [rows, cols] tensor
    `name` of the good inputs: a list, an integer dtype, its first row (1-D), a trailing unit
    dimension (3-D); `cases` picks some of them."""
    rows, cols = shape
    every = {
        "not a tensor": (f"{name} not a tensor", at(index, lambda t: t.tolist()), {}, TypeError,
                         f"{name} must be a tensor, got list"),
        "int": (f"int {name}", at(index, lambda t: t.long()), {}, TypeError,
                f"{name} must be float16, bfloat16, float32 or float64, got torch.int64"),
        "1-D": (f"1-D {name}", at(index, lambda t: t[0]), {}, ValueError,
                f"{name} must be 2-D, got shape ({cols},)"),
        "3-D": (f"3-D {name}", at(index, lambda t: t[:, :, None]), {}, ValueError,
                f"{name} must be 2-D, got shape ({rows}, {cols}, 1)"),
    }
    return [every[case] for case in cases]


def class_target(index: int, rows: int, num_classes: int, where: str = "") -> List[Case]:
    """The cases of _checks.target_tensor and _checks.target_values for the class targets,
    input `index` of good inputs with `rows` rows and `num_classes` classes: float targets,
    two targets, and a last target of `num_classes`. The sharded ops name the rank first
    (`where`) and read their targets on the host to agree on errors across ranks, so theirs
    raises at the call on every device; the others raise at the call on the CPU only (on a
    GPU the range check is queued on the device)."""
    out_of_range = list(range(rows - 1)) + [num_classes]
    return [
        ("float target", at(index, lambda t: t.float()), {}, TypeError,
         "target must hold integer class indices, got torch.float32"),
        ("target length", at(index, lambda t: t[:2]), {}, ValueError,
         f"target must have shape [{rows}] (one class per row), got (2,)"),
        ("target out of range", at(index, lambda t: torch.tensor(out_of_range, device=t.device)),
         {}, ValueError, f"{where}target[{rows - 1}] = {num_classes} is outside "
                         f"[0, {num_classes}) and is not ignore_index",
         ("cpu", "cuda") if where else ("cpu",)),
    ]


def device_mix(index: int, first: str) -> Case:
    """The case of _checks.same_device: input `index` on the meta device, the others where
    they are; `first` is the tensor that the message lists first."""
    return ("device mix", at(index, lambda t: t.to("meta")), {}, RuntimeError,
            f"all tensors must be on one device, got {first} on")


def scores_cases(name: str, where: str = "") -> List[Case]:
    """The tensor cases of a loss of scores `name` [N, C] and class targets [N], on good
    inputs (scores [4, 7], target [4])."""
    return floating_matrix(name, 0, (4, 7)) + class_target(1, 4, 7, where) + [device_mix(1, name)]


def linear_cases(x_name: str, w_name: str, rows: str = "C", dim: str = "D",
                 where: str = "") -> List[Case]:
    """The tensor cases of a loss of x [N, dim] @ w [rows, dim].T and class targets [N], on
    good inputs (x [4, 5], w [7, 5], target [4] of 7 classes): the inputs' types and ranks,
    a w whose dim or dtype differs from x's, the targets, one device."""
    return (floating_matrix(x_name, 0, (4, 5), ("not a tensor", "int", "1-D"))
            + floating_matrix(w_name, 1, (7, 5), ("3-D",)) + [
                (f"{dim} mismatch", at(1, lambda w: w[:, :4]), {}, ValueError,
                 f"{x_name} [N, {dim}] and {w_name} [{rows}, {dim}] must share {dim}, "
                 "got (4, 5) and (7, 4)"),
                ("dtype mismatch", at(1, lambda w: w.double()), {}, TypeError,
                 f"{x_name} and {w_name} must share a dtype, got torch.float32 and "
                 "torch.float64"),
            ] + class_target(2, 4, 7, where) + [device_mix(2, x_name)])



def fuzz_linear_draw(data):
    """The draws that open the fuzz of a loss of x [N, D] @ w [C, D].T: N and C among the
    small sizes around the tiles, D among 1, 3, 16, 17, 33, one floating dtype, a seeded
    generator, and x [N, D] of normal entries in that dtype on the CPU, perhaps strided.
    Returns (n, c, d, dtype, gen, x); the caller draws w from gen next."""
    n = _draw.pick(data, _draw.SMALL_SIZES[:12])
    c = _draw.pick(data, _draw.SMALL_SIZES)
    d = _draw.pick(data, [1, 3, 16, 17, 33])
    dtype = _draw.pick(data, _draw.DTYPES)
    gen = _draw.generator(data)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen).to(dtype)
    return n, c, d, dtype, gen, _draw.strided(x, _draw.flag(data))
