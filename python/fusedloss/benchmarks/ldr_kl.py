"""The LDR-KL family in the benchmark (family "ldr_kl", not in the default run): LDR-KL on
logits, LDRLoss_V1's defaults, against the eager PyTorch a user writes from the formula and its
torch.compile. Registered with the engine, fusedloss.bench."""
import math
from typing import List, Optional

import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.bench import Family, compiled, family, grid

from .margin import cos_inputs


def ldr_kl_eager(z, t, lam=1.0, margin=2.0):
    """LDR-KL as written from the paper: a margin on every non-target logit, a temperature, a
    log-mean-exp."""
    shift = margin * (1.0 - F.one_hot(t, z.shape[1]).to(z.dtype))
    inner = (z - z.gather(1, t[:, None]) + shift) / lam
    return (lam * (torch.logsumexp(inner, dim=1) - math.log(z.shape[1]))).mean()


def _contender(fn):
    def build(case, inputs):
        z, t = inputs["cos"], inputs["target"]

        def step():
            loss = fn(z, t)
            loss.backward()
            return loss.detach()

        return step

    return build


def _fused(z, t):
    return fusedloss.ldr_kl_loss(z, t)


@family("ldr_kl", default=False)
def ldr_kl_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    cases = grid([1024], [10_000, 100_000], dtypes or ["float32"])
    for c in cases:
        c.update(label=f"LDR-KL N={c['N']} C={c['C']:,}")
    return Family(
        name="ldr_kl", cases=cases, make_inputs=cos_inputs,
        contenders={"fusedloss": _contender(_fused),
                    "baseline-eager": _contender(ldr_kl_eager),
                    "baseline-compile": lambda case, inputs: _contender(
                        compiled(ldr_kl_eager))(case, inputs)},
        fused=("fusedloss",), mem_factor=8.0,
        notes=["ldr_kl: LDR-KL (lam 1, margin 2) on logits uniform in (-0.8, 0.8); baseline = "
               "`ldr_kl_eager` (one-hot margin, log-mean-exp), eager and compiled."])
