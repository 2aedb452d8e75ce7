"""The pairs op family in the benchmark (family "pairs", not in the default run:
``--family pairs``): the pair losses with mining against their dense reference, in eager
mode and under torch.compile, and against pytorch-metric-learning (PML), the miner + loss
pair as a PML user writes it. Registered with the engine, fusedloss.bench.

A case's ``C`` is the number of references M, the columns of the N x M similarity matrix
(M = N when the batch is its own reference), so the engine's "x N·C·4B" column is a multiple
of one N x M fp32 matrix, the thing the fused kernels never store.
"""
import importlib.metadata
import importlib.util
from typing import Callable, List, NamedTuple, Optional

import torch

from fusedloss.bench import (DTYPES, SHORT, Contender, Family, NotInstalled, Unavailable, api,
                             compiled, family, kernel_check)

_PML = "pytorch-metric-learning"


class _Loss(NamedTuple):
    function: str  # the fusedloss function
    keywords: tuple  # its keyword arguments, taken from the case
    title: str  # in the case labels


_LOSSES = {
    "ms": _Loss("multi_similarity_loss", ("alpha", "beta", "base", "epsilon"), "MS+miner"),
    "ms-bank": _Loss("multi_similarity_loss", ("alpha", "beta", "base", "epsilon"),
                     "MS+miner, memory bank"),
    "supcon": _Loss("supcon_loss", ("temperature",), "SupCon"),
    "info_nce": _Loss("info_nce_loss", ("temperature", "symmetric"), "InfoNCE symmetric"),
    "contrastive": _Loss("contrastive_loss", ("pos_margin", "neg_margin", "distance"),
                         "contrastive"),
    "triplet": _Loss("batch_hard_triplet_loss", ("margin", "distance"), "batch-hard triplet"),
}
_HYPER = {
    "ms": dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1),
    "supcon": dict(temperature=0.1),
    "info_nce": dict(temperature=0.07, symmetric=True),
    "contrastive": dict(pos_margin=0.0, neg_margin=1.0, distance="euclidean"),
    "triplet": dict(margin=0.05, distance="euclidean"),
}
_HYPER["ms-bank"] = _HYPER["ms"]

# PML's NTXentLoss weighs every positive pair against a [positive pairs x negative pairs]
# matrix: N x N(N - 1) floats for InfoNCE, cubic in N. Above this size it is not run.
_PML_NTXENT_MAX_BYTES = 2 << 30


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------

def _normal(shape, g, device, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device).normal_(generator=g)


def _clustered(labels, centres, g) -> torch.Tensor:
    """centres[labels] plus noise of the same spread: after normalisation a positive pair has
    similarity about 0.5 and a negative one about 0, so that mining keeps some of each."""
    x = _normal((labels.numel(), centres.shape[1]), g, centres.device, centres.dtype)
    return x.add_(centres[labels])


def pair_inputs(case: dict, device: str) -> dict:
    """The tensors of a case, seeded. ``args`` are the positional arguments of the fusedloss
    function: (embeddings, labels) for a batch that is its own reference, (embeddings,
    labels, bank, bank_labels) with a memory bank (detached, as a bank is), (query, key) for
    InfoNCE. Labels: ``per_class`` samples of each class in the batch; a bank holds
    ``per_class`` samples of each of M / per_class classes, the batch's among them."""
    g = torch.Generator(device=device)
    g.manual_seed(5151 + case["N"] + case["C"])
    dt = DTYPES[case["dtype"]]
    n, m, d, k = case["N"], case["C"], case["D"], case["per_class"]
    if case["variant"] == "info_nce":
        shared = _normal((n, d), g, device, dt)
        query = _clustered(torch.arange(n, device=device), shared, g).requires_grad_(True)
        key = _clustered(torch.arange(n, device=device), shared, g).requires_grad_(True)
        return {"args": (query, key), "leaves": [query, key]}
    classes = max(n, m) // k
    centres = _normal((classes, d), g, device, dt)
    batch_classes = torch.randperm(classes, generator=g, device=device)[: n // k]
    labels = batch_classes.repeat_interleave(k)
    emb = _clustered(labels, centres, g).requires_grad_(True)
    args = (emb, labels)
    if case["variant"] == "ms-bank":
        bank_labels = torch.arange(m, device=device) % classes
        args += (_clustered(bank_labels, centres, g), bank_labels)
    return {"args": args, "leaves": [emb]}


# --------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------

def _hyper(case: dict) -> dict:
    return {k: case[k] for k in _LOSSES[case["variant"]].keywords}


def _step(loss_of: Callable, inputs: dict):
    args = inputs["args"]

    def step():
        loss = loss_of(*args)
        loss.backward()
        return loss.detach()

    return step


def fusedloss_loss(case: dict, backend: str) -> Callable:
    """``loss_of(*inputs["args"])``: the case's fusedloss function with one backend
    ("reference": the dense oracle, the baseline) and the case's hyperparameters."""
    fn, hyper = api(_LOSSES[case["variant"]].function), _hyper(case)

    def loss_of(*args):
        return fn(*args, backend=backend, **hyper)

    return loss_of


def _fusedloss_contender(backend: str, compile_it: bool = False) -> Contender:
    """fusedloss_loss, eager or compiled."""

    def build(case, inputs):
        if backend != "reference":
            kernel_check(backend, "pair_row_stats", inputs["args"][0].device)
        loss_of = fusedloss_loss(case, backend)
        return _step(compiled(loss_of) if compile_it else loss_of, inputs)

    return build


def pml_loss(case: dict, drop_in: bool = False) -> Callable:
    """``loss_of(*inputs["args"])``: the case's loss as a PML user writes it; with `drop_in`,
    the same code on fusedloss.pml's losses and miners (the import changed)."""
    from pytorch_metric_learning import distances, losses, miners
    if drop_in:
        from fusedloss.pml import losses, miners  # noqa: F811

    v, h = case["variant"], _hyper(case)
    if v in ("ms", "ms-bank"):
        miner = miners.MultiSimilarityMiner(epsilon=h["epsilon"])
        ms = losses.MultiSimilarityLoss(alpha=h["alpha"], beta=h["beta"], base=h["base"])

        def loss_of(emb, labels, ref=None, ref_labels=None):
            pairs = miner(emb, labels, ref, ref_labels)
            return ms(emb, labels, pairs, ref, ref_labels)

        return loss_of
    if v == "supcon":
        return losses.SupConLoss(temperature=h["temperature"])
    if v == "info_nce":
        n = case["N"]
        need = 4 * n * n * (n - 1)
        if need > _PML_NTXENT_MAX_BYTES:
            raise Unavailable(f"PML's NTXentLoss forms an N x N(N-1) matrix, "
                              f"{need / 2**30:.0f} GiB here")
        nt_xent = losses.NTXentLoss(temperature=h["temperature"])

        def loss_of(query, key):
            # Each row its own label: the diagonal pairs are the positives. The reference
            # labels must be another tensor object: PML drops the diagonal as self-pairs when
            # `ref_labels is labels`.
            ids = torch.arange(query.shape[0], device=query.device)
            ref_ids = ids.clone()
            forward = nt_xent(query, ids, ref_emb=key, ref_labels=ref_ids)
            if not h["symmetric"]:
                return forward
            return (forward + nt_xent(key, ids, ref_emb=query, ref_labels=ref_ids)) / 2

        return loss_of
    distance = (distances.LpDistance() if h["distance"] == "euclidean"
                else distances.CosineSimilarity())
    if v == "contrastive":
        return losses.ContrastiveLoss(pos_margin=h["pos_margin"], neg_margin=h["neg_margin"],
                                      distance=distance)
    miner = miners.BatchHardMiner(distance=distance)
    triplet = losses.TripletMarginLoss(margin=h["margin"], distance=distance)

    def loss_of(emb, labels):
        return triplet(emb, labels, miner(emb, labels))

    return loss_of


def _pml_contender(case, inputs, drop_in=False):
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        raise NotInstalled(_PML)
    try:
        import pytorch_metric_learning.losses  # noqa: F401
    except Exception as ex:  # noqa: BLE001 - installed but not importable here
        raise Unavailable(f"{_PML} not importable: {type(ex).__name__}: {ex}")
    return _step(pml_loss(case, drop_in), inputs)


def _pml_drop_in_contender(case, inputs):
    return _pml_contender(case, inputs, drop_in=True)


# --------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------

def _flops_pairs(case: dict) -> int:
    """The similarity matmuls of one forward + backward, as a dense computation does them
    once: S (2·N·M·D), dL/dx (2·N·M·D), and dL/dr (2·N·M·D) where the references take a
    gradient (not a detached bank). Recomputed tiles are not counted."""
    passes = 2 if case["variant"] == "ms-bank" else 3
    return 2 * passes * case["N"] * case["C"] * case["D"]


def cases_of(variant: str, Ns, D: int, dtypes, Ms=None) -> List[dict]:
    """Every dtype x N (x M, for a bank of M references; else the batch is its own
    reference, M = N), with the variant's hyperparameters."""
    title = _LOSSES[variant].title
    cases = []
    for dt in dtypes:
        for n in Ns:
            for m in Ms or [n]:
                label = (f"{title} {SHORT[dt]} D={D} N=M={n:,}" if Ms is None
                         else f"{title} {SHORT[dt]} N={n} D={D} M={m:,}")
                cases.append(dict(N=n, C=m, dtype=dt, variant=variant, D=D, per_class=4,
                                  label=label, **_HYPER[variant]))
    return cases


def _auto_note(device: str) -> str:
    try:
        chosen = kernel_check("auto", "pair_row_stats", torch.device(device))
    except Unavailable as e:
        chosen = f"unavailable ({e})"
    return f"pairs: fusedloss = backend \"auto\", here {chosen!r} for the pair kernels."


def _pml_version() -> str:
    try:
        return f"{_PML} {importlib.metadata.version(_PML)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{_PML} not installed"


@family("pairs", default=False)
def pairs_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    dtypes = dtypes or ["float32"]
    if device == "cuda":
        # one case per loss (the GPU run has minutes): the sizes where PML's N x M matrices
        # and the dense reference's start to cost
        ms_n, other_n, bank_n = [8192] + ([32768] if large else []), [8192], 1024
        bank_m = [262_144] + ([1_048_576] if large else [])
    else:
        ms_n, other_n, bank_n = [1024, 2048, 4096], [1024, 4096], 256
        bank_m = [8192, 65_536] + ([262_144] if large else [])
        if large:
            ms_n, other_n = ms_n + [8192], other_n + [8192]
    cases = cases_of("ms", ms_n, 512, dtypes)
    for variant in ("supcon", "info_nce", "contrastive", "triplet"):
        Ns = other_n
        if variant == "info_nce" and device == "cpu":
            Ns = [512] + other_n[1:]  # where PML's cubic NTXentLoss still fits
        cases += cases_of(variant, Ns, 128, dtypes)
    cases += cases_of("ms-bank", [bank_n], 128, dtypes, Ms=bank_m)
    contenders = {
        "fusedloss": _fusedloss_contender("auto"),
        "baseline-eager": _fusedloss_contender("reference"),
        "baseline-compile": _fusedloss_contender("reference", compile_it=True),
        "pml": _pml_contender,
        "fusedloss.pml": _pml_drop_in_contender,
    }
    fused = ("fusedloss",)
    if device == "cuda":
        contenders["fusedloss-triton"] = _fusedloss_contender("triton")
        fused += ("fusedloss-triton",)
    notes = [
        "pairs: the pair losses of fusedloss (`multi_similarity_loss` with mining, "
        "`supcon_loss`, `info_nce_loss(symmetric=True)`, `contrastive_loss`, "
        "`batch_hard_triplet_loss`, and `multi_similarity_loss` against a memory bank), "
        "normalize=True, forward + backward w.r.t. the embeddings (and the keys for InfoNCE; a "
        "bank is detached). Baseline = the same function with backend=\"reference\" (the dense "
        "oracle, which forms the N x M similarity matrix and masks), eager and under "
        "torch.compile(dynamic=False). pml = " + _pml_version() + " as its users write it: "
        "`MultiSimilarityMiner(epsilon)` then `MultiSimilarityLoss(alpha, beta, base)` (with "
        "ref_emb/ref_labels for the bank), `SupConLoss(temperature)`, `NTXentLoss(temperature)` "
        "with each row its own label and the keys as ref_emb, averaged over both directions "
        "(not run where its N x N(N-1) pair matrix would pass 2 GiB), `ContrastiveLoss(0, 1)`, "
        "`BatchHardMiner` + `TripletMarginLoss(margin)`, euclidean distances (LpDistance). "
        "fusedloss.pml = the same PML code with `from fusedloss.pml import losses, miners` "
        "(the drop-ins: PML's explicit miner indices, then the fused loss).",
        "pairs: hyperparameters MS alpha 2, beta 50, base 0.5, epsilon 0.1; SupCon temperature "
        "0.1; InfoNCE temperature 0.07; contrastive margins 0 / 1; triplet margin 0.05. "
        "Inputs: labels with 4 samples per class; embeddings = class centre + noise of the "
        "same spread (normal), so positives have similarity about 0.5 and negatives about 0; "
        "a bank holds 4 samples of each of M / 4 classes, the batch's among them; fixed seed. "
        "C = M, the references (M = N without a bank): \"x N·C·4B\" is in units of one N x M "
        "fp32 matrix. TFLOP/s (fusedloss) = the dense similarity matmuls of forward + "
        "backward, 6·N·M·D (4·N·M·D with a detached bank), recomputed tiles not counted.",
        _auto_note(device),
    ]
    targets = [
        {"case": {"variant": "ms", "dtype": "float32", "N": 2048, "D": 512},
         "contender": "fusedloss", "baseline": "pml", "time_vs_eager": 0.33,
         "memory_vs_eager": 0.2},
        {"case": {"variant": "ms-bank", "dtype": "float32", "N": 256, "D": 128, "C": 65_536},
         "contender": "fusedloss", "baseline": "pml", "time_vs_eager": 0.1,
         "memory_vs_eager": 0.1},
    ]
    return Family(name="pairs", cases=cases, make_inputs=pair_inputs, contenders=contenders,
                  fused=fused, flops=_flops_pairs, notes=notes, mem_factor=16.0,
                  targets=targets, x_label="number of references M (= N without a bank)",
                  plot_along=("N",))


# --------------------------------------------------------------------------------------
# Orthogonal Projection Loss: its own family ("opl"), against the authors' dense formula
# --------------------------------------------------------------------------------------

def opl_authors_formula(features: torch.Tensor, labels: torch.Tensor, gamma: float,
                        absolute: bool) -> torch.Tensor:
    """OPL as the authors' loss.py computes it, dense: the N x N cosine matrix, a float mask of
    the same-label pairs off the diagonal and one of the different-label pairs, each mean
    over its mask (count + 1e-6), |S| on the negatives in the absolute variant."""
    normed = torch.nn.functional.normalize(features, p=2, dim=1)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(same.shape[0], dtype=torch.bool, device=same.device)
    positive = same.masked_fill(eye, False).to(normed.dtype)
    negative = (~same).to(normed.dtype)
    cosines = normed @ normed.t()
    pos_mean = (positive * cosines).sum() / (positive.sum() + 1e-6)
    negative_terms = negative * cosines
    if absolute:
        negative_terms = negative_terms.abs()
    neg_mean = negative_terms.sum() / (negative.sum() + 1e-6)
    return (1.0 - pos_mean) + gamma * neg_mean


def _opl_contender(kind: str) -> Contender:
    """"fusedloss" / "triton": orthogonal_projection_loss with backend auto / triton;
    "eager" / "compile": the authors' formula."""

    def build(case, inputs):
        opts = dict(gamma=case["gamma"], absolute=case["absolute"])
        if kind in ("fusedloss", "triton"):
            backend = "auto" if kind == "fusedloss" else "triton"
            kernel_check(backend, "pair_row_stats", inputs["args"][0].device)
            fn = api("orthogonal_projection_loss")
            return _step(lambda emb, labels: fn(emb, labels, backend=backend, **opts), inputs)
        formula = compiled(opl_authors_formula) if kind == "compile" else opl_authors_formula
        return _step(lambda emb, labels: formula(emb, labels, **opts), inputs)

    return build


@family("opl", default=False)
def opl_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    dtypes = dtypes or ["float32"]
    Ns = [4096] + ([16_384] if large or device == "cuda" else [])
    cases = []
    for dt in dtypes:
        for n in Ns:
            for absolute in (False, True):
                cases.append(dict(N=n, C=n, D=128, dtype=dt, variant="opl", per_class=4,
                                  gamma=0.5, absolute=absolute,
                                  label=f"OPL{' |S|' if absolute else ''} {SHORT[dt]} D=128 "
                                        f"N={n:,}"))
    contenders = {
        "fusedloss": _opl_contender("fusedloss"),
        "baseline-eager": _opl_contender("eager"),
        "baseline-compile": _opl_contender("compile"),
    }
    fused = ("fusedloss",)
    if device == "cuda":
        contenders["fusedloss-triton"] = _opl_contender("triton")
        fused += ("fusedloss-triton",)
    notes = [
        "opl: `orthogonal_projection_loss(x, labels, gamma=0.5, absolute=...)` (backend "
        "\"auto\": pair_row_stats kind 3, one tiled pass for the sums and pair counts, the "
        "backward recomputing the tiles), forward + backward w.r.t. the embeddings; baseline = "
        "the authors' dense formula (their loss.py: normalise, the N x N cosine matrix, float "
        "masks of the positive pairs off the diagonal and of the negative pairs, the two "
        "masked means, |S| on the negatives for absolute), eager and under "
        "torch.compile(dynamic=False). Inputs as the pairs family's (4 samples per class, "
        "class centre + noise). TFLOP/s (fusedloss) = 6·N²·D, as the pairs family counts.",
        _auto_note(device),
    ]
    targets = [{"case": {"variant": "opl", "dtype": "float32", "N": 4096, "D": 128,
                         "absolute": absolute},
                "contender": "fusedloss", "time_vs_eager": 1 / 3, "memory_vs_eager": 0.2}
               for absolute in (False, True)]
    return Family(name="opl", cases=cases, make_inputs=pair_inputs, contenders=contenders,
                  fused=fused, flops=_flops_pairs, notes=notes, mem_factor=8.0,
                  targets=targets, x_label="batch size N (= M)")


# The pair losses across the ranks of a process group: their own family, "pairs_ranks".
from fusedloss.benchmarks import pairs_ranks  # noqa: E402,F401  (registers the family)


# --------------------------------------------------------------------------------------
# The UNPG head: its own family ("unpg"), against the authors' formulation
# --------------------------------------------------------------------------------------

_UNPG_MARGIN = 0.4  # the cosface preset of fusedloss.nn.PRESETS (scale 64)
_UNPG_SCALE = 64.0


def unpg_authors_head(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      whisker: float) -> torch.Tensor:
    """The UNPG CosFace head as the authors' code computes it: the cosine logits of the
    normalised embeddings and class centres with the margin at the target, the negative-pair
    cosines of the batch (the N x N cosine matrix, the upper-triangle pairs of different
    labels, a full sort, Tukey's fences at the values of index int(L / 4) and int(3 L / 4))
    appended as columns to every row, the scale, cross-entropy: an N x (C + L) matrix."""
    normed = torch.nn.functional.normalize(embeddings)
    cosine = normed @ torch.nn.functional.normalize(weight).t()
    logits = cosine - _UNPG_MARGIN * torch.nn.functional.one_hot(labels, cosine.shape[1])
    different = (labels[:, None] != labels[None, :]).triu(diagonal=1)
    values = (normed @ normed.t())[different].sort()[0]
    count = values.shape[0]
    lower, upper = values[int(0.25 * count)], values[int(0.75 * count)]
    spread = upper - lower
    kept = values[(values >= lower - whisker * spread) & (values <= upper + whisker * spread)]
    joined = torch.cat([logits, kept.expand(logits.shape[0], -1)], dim=1)
    return torch.nn.functional.cross_entropy(_UNPG_SCALE * joined, labels)


def unpg_inputs(case: dict, device: str) -> dict:
    """Embeddings [N, D] and a MarginSoftmaxHead(D, C, "cosface", unpg=True) whose weight is
    the other leaf; labels of 4 samples per class (N / 4 classes of the C), seeded."""
    g = torch.Generator(device=device)
    g.manual_seed(6161 + case["C"])
    dt = DTYPES[case["dtype"]]
    n, c, d = case["N"], case["C"], case["D"]
    emb = torch.empty(n, d, dtype=dt, device=device).normal_(generator=g).requires_grad_(True)
    head = api("nn").MarginSoftmaxHead(d, c, loss="cosface", unpg=True,
                                       unpg_whisker=case["whisker"], device=device, dtype=dt)
    with torch.no_grad():
        head.weight.normal_(generator=g)
    classes = torch.randperm(c, generator=g, device=device)[: n // 4]
    labels = classes.repeat_interleave(4)
    return {"args": (emb, labels), "head": head, "leaves": [emb, head.weight]}


def _unpg_contender(kind: str) -> Contender:
    """"fusedloss": the head's forward; "eager" / "compile": the authors' formulation on the
    same embeddings and weight."""

    def build(case, inputs):
        emb, labels = inputs["args"]
        head = inputs["head"]
        if kind == "fusedloss":
            kernel_check("auto", "margin_linear_cross_entropy", emb.device)
            return _step(head, inputs)
        formula = compiled(unpg_authors_head) if kind == "compile" else unpg_authors_head
        return _step(lambda e, y: formula(e, head.weight, y, case["whisker"]), inputs)

    return build


def _flops_unpg(case: dict) -> int:
    """The matmuls of one forward + backward as the dense formulation does them once: the
    logits and their two gradients (6·N·C·D) and the pair cosines and their gradient
    (4·N²·D)."""
    n, c, d = case["N"], case["C"], case["D"]
    return 6 * n * c * d + 4 * n * n * d


@family("unpg", default=False)
def unpg_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    dtypes = dtypes or ["float32"]
    Cs = [100_000] + ([1_000_000] if large else [])
    cases = [dict(N=512, C=c, D=512, dtype=dt, variant="unpg", whisker=1.5,
                  label=f"UNPG CosFace head {SHORT[dt]} N=512 D=512 C={c:,}")
             for dt in dtypes for c in Cs]
    notes = [
        "unpg: `nn.MarginSoftmaxHead(D, C, loss=\"cosface\", unpg=True)` (scale 64, m 0.4, "
        "whisker 1.5), forward + backward w.r.t. the embeddings and the weight: "
        "`unpg_negatives` of the batch (blocked upper-triangle cosines, an exact sort of the L "
        "values) joined as shared columns (`extra_negatives`: one log-sum-exp term per row, "
        "O(N + L)) to the fused linear margin loss, which never forms the N x C logits. "
        "Baseline = the authors' formulation (their UNPG code): normalise, linear, the margin, "
        "the N x N pair cosines with the Tukey-filtered negatives concatenated as columns to "
        "every row, cross-entropy on the N x (C + L) matrix, eager and under "
        "torch.compile(dynamic=False). Labels: 4 samples per class (L = 130,048 pairs at "
        "N = 512). TFLOP/s (fusedloss) = 6·N·C·D + 4·N²·D.",
    ]
    contenders = {
        "fusedloss": _unpg_contender("fusedloss"),
        "baseline-eager": _unpg_contender("eager"),
        "baseline-compile": _unpg_contender("compile"),
    }
    targets = [{"case": {"variant": "unpg", "dtype": "float32", "N": 512, "D": 512,
                         "C": 100_000},
                "contender": "fusedloss", "time_vs_eager": 0.6, "memory_vs_eager": 0.15}]
    return Family(name="unpg", cases=cases, make_inputs=unpg_inputs, contenders=contenders,
                  fused=("fusedloss",), flops=_flops_unpg, notes=notes, mem_factor=8.0,
                  targets=targets, x_label="number of classes C")
