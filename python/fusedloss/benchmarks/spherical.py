"""The spherical op family in the benchmark (family "spherical", not in the default run):
the linear spherical Z-loss against the logits users form today, and one SGD step of the
output layer. Registered with the engine, fusedloss.bench."""
import dataclasses
from typing import List, Optional

import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.bench import DTYPES, SHORT, Contender, Family, compiled, family, grid


# --------------------------------------------------------------------------------------
# Family: the spherical Z-loss of the output layer (fusedloss.linear_spherical_z_loss)
# against the code users write today: form the logits, then mean, spread, z and softplus.
# Not in the default run (`--family spherical` / `--suite spherical`).
# --------------------------------------------------------------------------------------

def spherical_linear_baseline(h, w, t, bias=None, a=1.0, b=0.0):
    """The linear spherical Z-loss as users write it today, in the inputs' dtype: the
    N x C outputs, their row mean and (population) spread, z of the target output, then
    softplus(a (b - z)) / a, mean over rows."""
    o = h @ w.T
    if bias is not None:
        o = o + bias
    mu = o.mean(1)
    sigma = (o - mu[:, None]).pow(2).mean(1).sqrt()
    z = (o.gather(1, t[:, None]).squeeze(1) - mu) / sigma
    return (F.softplus(a * (b - z)) / a).mean()


def _spherical_inputs(case: dict, device: str) -> dict:
    """hidden [N, d], weight [C, d] normal / sqrt(d), bias [C] normal * 0.1, all leaves;
    random targets; seeded; built in place (no temporaries to inflate the RSS peak)."""
    g = torch.Generator(device=device)
    g.manual_seed(2718 + case["C"] + case["N"])
    dt = DTYPES[case["dtype"]]
    h = torch.empty(case["N"], case["D"], dtype=dt, device=device).normal_(generator=g)
    w = torch.empty(case["C"], case["D"], dtype=dt, device=device).normal_(generator=g)
    bias = torch.empty(case["C"], dtype=dt, device=device).normal_(generator=g)
    h.mul_(case["D"] ** -0.5)
    w.mul_(case["D"] ** -0.5)
    bias.mul_(0.1)
    t = torch.randint(0, case["C"], (case["N"],), generator=g, device=device)
    for leaf in (h, w, bias):
        leaf.requires_grad_(True)
    return {"h": h, "w": w, "bias": bias, "target": t, "leaves": [h, w, bias]}


def _spherical_contender(kind: str) -> Contender:
    """kind "fusedloss" (linear_spherical_z_loss, backend "auto"), "eager" or "compile"
    (`spherical_linear_baseline`); forward + backward w.r.t. hidden, weight and bias."""

    def build(case, inputs):
        if kind == "fusedloss":
            def f(h, w, t, bias, a, b):
                return fusedloss.linear_spherical_z_loss(h, w, t, bias, a=a, b=b, backend="auto")
        else:
            f = spherical_linear_baseline
            if kind == "compile":
                f = compiled(f)
        h, w, bias, t = inputs["h"], inputs["w"], inputs["bias"], inputs["target"]
        a, b = case["a"], case["b"]

        def step():
            loss = f(h, w, t, bias, a, b)
            loss.backward()
            return loss.detach()

        return step

    return build


def _flops_spherical(case: dict) -> int:
    """The matmul work of the factored op, forward + backward: the Gram matrix of the
    augmented weight (2·C·D²), the weight-gradient update A [G; p] (2·C·D²), the row
    quadratic forms and G (about 2·N·D² each); D = d + 2 (bias and the ones column)."""
    D = case["D"] + 2
    return 4 * case["C"] * D * D + 4 * case["N"] * D * D


# One plain-SGD step of the output layer (issue 6 item 7): forward + backward + update.
_SGD_LR = 0.1


def _sgd_inputs(case: dict, device: str) -> dict:
    """hidden h [m, d] normal / sqrt(d), a leaf requiring grad (the layer's backward runs as
    it does under a network), random targets; seeded. Each contender builds its own layer
    from `_sgd_weights`, so that every one starts from the same weight and bias."""
    g = torch.Generator(device=device)
    g.manual_seed(3141 + case["C"] + case["N"])
    h = torch.empty(case["N"], case["D"], dtype=DTYPES[case["dtype"]], device=device)
    h.normal_(generator=g).mul_(case["D"] ** -0.5)
    t = torch.randint(0, case["C"], (case["N"],), generator=g, device=device)
    h.requires_grad_(True)
    return {"h": h, "target": t, "leaves": [h]}


def _sgd_weights(case: dict, device: str):
    """weight [C, d] normal / sqrt(d), bias [C] normal * 0.1; seeded, built in place."""
    g = torch.Generator(device=device)
    g.manual_seed(1618 + case["C"])
    dt = DTYPES[case["dtype"]]
    w = torch.empty(case["C"], case["D"], dtype=dt, device=device).normal_(generator=g)
    bias = torch.empty(case["C"], dtype=dt, device=device).normal_(generator=g)
    return w.mul_(case["D"] ** -0.5), bias.mul_(0.1)


class _NaiveSphericalLinear(torch.nn.Module):
    """A dense output layer whose loss forms the logits: `spherical_linear_baseline`."""

    def __init__(self, weight, bias, a, b):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
        self.a, self.b = a, b

    def forward(self, h, t):
        return spherical_linear_baseline(h, self.weight, t, self.bias, self.a, self.b)


def _sgd_contender(kind: str) -> Contender:
    """One training step of the output layer: kind "factored" (`FactoredSphericalLinear`:
    `layer(h, t).backward()` applies the SGD step itself), "dense" (`SphericalLinear`, loss
    through `linear_spherical_z_loss`) or "naive" (logits, then the Z-loss in plain torch),
    the dense ones trained with torch.optim.SGD(lr, no momentum)."""

    def build(case, inputs):
        device = inputs["h"].device
        lr, a, b = case["lr"], case["a"], case["b"]
        w, bias = _sgd_weights(case, str(device))
        h, t = inputs["h"], inputs["target"]
        if kind == "factored":
            from fusedloss.nn import FactoredSphericalLinear

            layer = FactoredSphericalLinear(case["D"], case["C"], lr, a=a, b=b, bias=True,
                                            device=device, dtype=w.dtype)
            layer.load_dense(w, bias)
            del w, bias

            def step():
                loss = layer(h, t)
                loss.backward()
                return loss.detach()

            return step
        if kind == "dense":
            from fusedloss.nn import SphericalLinear

            layer = SphericalLinear(case["D"], case["C"], a=a, b=b, device=device, dtype=w.dtype)
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(bias)
            del w, bias
        else:
            layer = _NaiveSphericalLinear(w, bias, a, b)
        opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.0)

        def step():
            loss = layer(h, t)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)  # at the end: no weight gradient held between steps
            return loss.detach()

        return step

    return build


_SGD_NAMES = {"factored": "factored-sgd (FactoredSphericalLinear)",
              "dense": "dense-sgd (linear_spherical_z_loss)",
              "naive": "dense-sgd (naive logits)"}


def _spherical_case_view(fam: Family, case: dict) -> Family:
    """The SGD-step cases: their own inputs and contenders; the ratio columns are against
    the naive dense step ("eager") and the linear_spherical_z_loss dense step ("compile")."""
    if case.get("variant") != "sgd-step":
        return fam
    kinds = ["factored", "dense", "naive"]
    return dataclasses.replace(
        fam, make_inputs=_sgd_inputs, fused=(), flops=lambda case: None,
        contenders={_SGD_NAMES[k]: _sgd_contender(k) for k in kinds},
        baselines=(_SGD_NAMES["naive"], _SGD_NAMES["dense"]))


@family("spherical", default=False)
def spherical_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    dtypes = dtypes or ["float32"]
    D = 256
    Cs = [100_000] + ([300_000] if large else [])
    cases = grid([2048], Cs, dtypes, D=D, variant="linear-spherical", a=1.0, b=0.0)
    for c in cases:
        c["label"] = f"linear spherical Z {SHORT[c['dtype']]} N={c['N']} d={D} C={c['C']:,}"
    notes = ["spherical: `linear_spherical_z_loss(h, w, t, bias, a=1, b=0)` (backend \"auto\", "
             "the factored op: Gram matrix of the centred weight, no N x C outputs) on hidden "
             "h [N, d], weight w [C, d] and bias [C], all three leaves requiring grad; baseline = "
             "`spherical_linear_baseline`, the code users write today: `o = h @ w.T + bias; "
             "mu = o.mean(1); sigma = (o - mu[:, None]).pow(2).mean(1).sqrt()`, "
             "z = (o_c - mu) / sigma, loss = mean softplus(a (b - z)) / a, fp32, eager and under "
             "torch.compile(dynamic=False). TFLOP/s (fusedloss) = (4·C·D² + 4·N·D²) / time with "
             "D = d + 2; the baseline's matmuls are 6·N·C·d. Inputs: h, w normal / sqrt(d), "
             "bias normal * 0.1, random targets, fixed seed."]
    sgd = grid([128], [100_000, 1_000_000], dtypes, D=D, variant="sgd-step", a=1.0, b=0.0,
                lr=_SGD_LR)
    for c in sgd:
        c["label"] = f"SGD step {SHORT[c['dtype']]} m={c['N']} d={D} C={c['C']:,}"
    cases += sgd
    notes.append(
        "spherical, SGD step cases: ONE plain-SGD training step of the output layer (forward + "
        f"backward + weight update, lr {_SGD_LR}, no momentum) on hidden h [m, d] (a leaf "
        "requiring grad, so dL/dh is computed as under a network), fp32. Contenders: "
        "`factored-sgd (FactoredSphericalLinear)`: `loss = layer(h, t); loss.backward()` (the "
        "backward applies the exact factored SGD update, O(m D² + m² D + m³), independent of "
        "C; its periodic O(C D²) stabilisation, every 1000 steps, does not occur in these runs); "
        "`dense-sgd (linear_spherical_z_loss)`: `fusedloss.nn.SphericalLinear(d, C)`, loss "
        "through `linear_spherical_z_loss` (no m x C outputs, but the weight gradient and the "
        "update are O(C d) and its Gram matrix O(C d²)), then `torch.optim.SGD.step()` and "
        "`zero_grad(set_to_none=True)`; `dense-sgd (naive logits)`: the same with the loss "
        "`spherical_linear_baseline` (`o = h @ W.T + b`, then the Z-loss in plain torch). All "
        "three start from the same weight (normal / sqrt(d)) and bias (normal * 0.1); each "
        "timed run is a further step of the same layer. Columns \"x vs eager\" / \"x vs "
        "compile\" here = time of the naive / linear_spherical_z_loss dense step over the "
        "contender's; the loss check is against the naive dense step (first step, same "
        "weights). Peak extra memory counts the weight gradient and the update's temporaries "
        "(the layers' weights are built before the base). No memory or time target.")
    contenders = {
        "fusedloss": _spherical_contender("fusedloss"),
        "baseline-eager": _spherical_contender("eager"),
        "baseline-compile": _spherical_contender("compile"),
    }
    return Family(
        name="spherical", cases=cases, make_inputs=_spherical_inputs, contenders=contenders,
        fused=("fusedloss",), flops=_flops_spherical, notes=notes, mem_factor=6.0,
        case_view=_spherical_case_view,
        targets=[{"case": {"variant": "linear-spherical", "dtype": "float32", "N": 2048,
                           "D": 256, "C": 100_000},
                  "contender": "fusedloss", "time_vs_eager": 0.1, "memory_vs_eager": 0.05}])
