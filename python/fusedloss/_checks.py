"""Argument checks shared by every public function: each raises before any kernel runs."""
import math

import torch

from ._ops import compiling

REDUCTIONS = ("mean", "sum", "none")
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def floating_tensor(fn: str, name: str, x, ndim: int) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{fn}: {name} must be a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATING:
        raise TypeError(f"{fn}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {tuple(x.shape)}")


def target_tensor(fn: str, target, n: int) -> None:
    if not torch.is_tensor(target):
        raise TypeError(f"{fn}: target must be a tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{fn}: target must hold integer class indices, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"{fn}: target must have shape [{n}] (one class per row), "
                         f"got {tuple(target.shape)}")


def same_device(fn: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise RuntimeError(f"{fn}: all tensors must be on one device, got {listing}")


def target_values(fn: str, target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Every target is in [0, C) or is ignore_index.

    On CPU tensors the values are read and a bad target raises a ValueError that names its
    row. On any other device the check runs on that device, with no host synchronisation (a
    loss call never waits for the GPU, and CUDA-graph capture works): `torch._assert_async`
    fails at the device's next synchronisation with the message below, as the device-side
    assertion of F.cross_entropy does; on CUDA that error leaves the process's CUDA context
    unusable, as any device-side assertion does. Under torch.compile the kernels guard
    themselves (the CPU kernels raise; the CUDA and Triton row kernels give an out-of-range
    target's row a NaN loss, never an out-of-bounds read)."""
    if compiling() or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if target.device.type != "cpu":
        torch._assert_async(~bad.any(), f"{fn}: a target is outside [0, {num_classes}) and is "
                                        f"not ignore_index ({ignore_index})")
        return
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{fn}: target[{row}] = {int(target[row])} is outside [0, {num_classes}) "
                         f"and is not ignore_index ({ignore_index})")


def finite(fn: str, **values) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{fn}: {name} must be a finite number, got {v!r}")


def positive(fn: str, **values) -> None:
    finite(fn, **values)
    for name, v in values.items():
        if v <= 0:
            raise ValueError(f"{fn}: {name} must be > 0, got {v}")


def at_least(fn: str, lower: float, **values) -> None:
    finite(fn, **values)
    for name, v in values.items():
        if v < lower:
            raise ValueError(f"{fn}: {name} must be >= {lower}, got {v}")


def in_range(fn: str, lo: float, hi: float, **values) -> None:
    finite(fn, **values)
    for name, v in values.items():
        if not lo <= v <= hi:
            raise ValueError(f"{fn}: {name} must lie in [{lo}, {hi}], got {v}")


def choice(fn: str, name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{fn}: unknown {name} {value!r}; expected one of {tuple(options)}")


def integer(fn: str, **values) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")


def embeddings_and_weight(fn: str, embeddings, weight, target, weight_name: str = "weight",
                          rows: str = "C", name: str = "embeddings") -> None:
    """embeddings [N, D] (called `name`), weight [rows, D] of the same dtype, target [N], all
    on one device."""
    floating_tensor(fn, name, embeddings, ndim=2)
    floating_tensor(fn, weight_name, weight, ndim=2)
    target_tensor(fn, target, embeddings.shape[0])
    same_device(fn, **{name: embeddings, "target": target, weight_name: weight})
    if weight.dtype != embeddings.dtype:
        raise TypeError(f"{fn}: {name} and {weight_name} must share a dtype, got "
                        f"{embeddings.dtype} and {weight.dtype}")
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(f"{fn}: {name} [N, D] and {weight_name} [{rows}, D] must share D, "
                         f"got {tuple(embeddings.shape)} and {tuple(weight.shape)}")


def rows_and_target(fn: str, name: str, rows, target) -> None:
    """rows [N, C] of a floating dtype and target [N] of class indices, on one device."""
    floating_tensor(fn, name, rows, ndim=2)
    target_tensor(fn, target, rows.shape[0])
    same_device(fn, **{name: rows, "target": target})
