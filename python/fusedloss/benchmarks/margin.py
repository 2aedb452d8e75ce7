"""The margin op family in the benchmark: margin softmax on logits (family "margin", ArcFace),
plain cross-entropy where the peer libraries compete (family "ce"), and the fused linear
margin softmax (family "margin_linear"). Registered with the engine, fusedloss.bench."""
import dataclasses
import importlib.util
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

import fusedloss
from fusedloss.bench import (DTYPES, SHORT, Contender, Family, NotInstalled, Unavailable, compiled,
                             family, grid, kernel_check, peers)


def _backend_contender(backend: str, **fixed) -> Contender:
    """fusedloss.margin_cross_entropy with one backend; Unavailable if it is not here."""

    def build(case, inputs):
        if backend != "auto":
            status = fusedloss.backends().get(backend)
            if status is None or not status[0]:
                raise Unavailable(status[1] if status is not None else f"no backend {backend!r}")
        kwargs = {**fixed, **{k: case[k] for k in ("scale", "m2") if k in case}}
        cos, t = inputs["cos"], inputs["target"]

        def step():
            loss = fusedloss.margin_cross_entropy(cos, t, backend=backend, **kwargs)
            loss.backward()
            return loss.detach()

        return step

    return build


def _loss_contender(fn: Callable, compile_it: bool) -> Contender:
    """A plain-PyTorch loss ``fn(cos, target, **case params)`` in eager mode or compiled."""

    def build(case, inputs):
        f = compiled(fn) if compile_it else fn
        cos, t = inputs["cos"], inputs["target"]
        kwargs = {k: case[k] for k in ("scale", "m2") if k in case}

        def step():
            loss = f(cos, t, **kwargs)
            loss.backward()
            return loss.detach()

        return step

    return build


def cos_inputs(case: dict, device: str) -> dict:
    """cos [N, C] uniform in (-0.8, 0.8) (so that theta + 0.5 < pi for every target, where
    plain cos(theta + m) and fusedloss's continued cosine agree), targets uniform; seeded."""
    g = torch.Generator(device=device)
    g.manual_seed(1234 + case["C"] + case["N"])
    cos = torch.empty(case["N"], case["C"], dtype=DTYPES[case["dtype"]], device=device)
    cos.uniform_(-0.8, 0.8, generator=g)  # in place: no temporary to inflate the RSS peak
    target = torch.randint(0, case["C"], (case["N"],), generator=g, device=device)
    cos.requires_grad_(True)
    return {"cos": cos, "target": target, "leaves": [cos]}


def _bytes_row_op(case: dict) -> int:
    """Forward reads cos and writes the gradient (N*C each); backward reads and writes the
    gradient once more to scale it: 4 * N * C * itemsize."""
    return 4 * case["N"] * case["C"] * DTYPES[case["dtype"]].itemsize


# The note of the families on cos [N, C] (margin, ce): their inputs and their GB/s.
COS_NOTE = ("margin, ce: inputs cos [N, C] uniform in (-0.8, 0.8), random targets, fixed seed. "
            "GB/s (fusedloss contenders): bytes counted = forward reads cos and writes the "
            "gradient (N·C each), backward reads and writes the gradient once more to scale "
            "it: 4·N·C·itemsize bytes / time. Target gathers, per-row statistics and the "
            "targets are not counted.")


# --------------------------------------------------------------------------------------
# Family: margin softmax cross-entropy (ArcFace)
# --------------------------------------------------------------------------------------

def arcface_baseline(cos, t, scale=64.0, m2=0.5):
    """ArcFace as users write it today."""
    cy = cos.gather(1, t[:, None])
    theta = torch.acos(cy.clamp(-1 + 1e-7, 1 - 1e-7))
    return F.cross_entropy(cos.scatter(1, t[:, None], torch.cos(theta + m2)) * scale, t)


@family("margin")
def margin_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    if device == "cuda":
        dtypes = dtypes or ["bfloat16", "float32"]
        Cs = [10_000, 100_000, 300_000] + ([1_000_000] if large else [])
        cases = grid([8192], Cs, dtypes)
    else:
        dtypes = dtypes or ["float32"]
        Cs = [10_000, 30_000, 100_000] + ([300_000] if large else [])
        cases = grid([1024] + ([2048] if large else []), Cs, dtypes)
    for c in cases:
        c.update(variant="arcface", scale=64.0, m2=0.5,
                 label=f"arcface {SHORT[c['dtype']]} N={c['N']} C={c['C']:,}")
    contenders = {
        "fusedloss": _backend_contender("auto"),
        "baseline-eager": _loss_contender(arcface_baseline, compile_it=False),
        "baseline-compile": _loss_contender(arcface_baseline, compile_it=True),
    }
    fused = ("fusedloss",)
    if device == "cuda":
        contenders["fusedloss-cuda"] = _backend_contender("cuda")
        contenders["fusedloss-triton"] = _backend_contender("triton")
        fused += ("fusedloss-cuda", "fusedloss-triton")
    return Family(
        name="margin", cases=cases, make_inputs=cos_inputs, contenders=contenders,
        fused=fused, bytes_moved=_bytes_row_op, mem_factor=5.0,
        notes=[COS_NOTE,
               "margin: ArcFace, scale 64, m2 0.5; baseline = `arcface_baseline` "
               "(gather, acos, scatter of cos(theta + m), F.cross_entropy), "
               "eager and under torch.compile(dynamic=False)."])


# --------------------------------------------------------------------------------------
# Family: plain cross-entropy, where the peer libraries (Liger-Kernel, Cut Cross-Entropy)
# can be compared. On CUDA it joins the default run when a peer library is installed.
# --------------------------------------------------------------------------------------

def _on_cuda_with_peers(device: str) -> bool:
    """on CUDA when Liger-Kernel or Cut Cross-Entropy is installed"""
    return device == "cuda" and bool(peers())


def plain_ce_baseline(cos, t):
    return F.cross_entropy(cos, t)


def linear_ce_baseline(e, w, t):
    return F.cross_entropy(e @ w.T, t)


def _liger_contender(case, inputs):
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        raise Unavailable(f"liger-kernel not importable: {e}")
    if inputs["cos"].device.type != "cuda":
        raise Unavailable("Liger-Kernel needs CUDA")
    loss_fn = LigerCrossEntropyLoss()
    cos, t = inputs["cos"], inputs["target"]

    def step():
        loss = loss_fn(cos, t)
        loss.backward()
        return loss.detach()

    return step


def linear_inputs(case: dict, device: str) -> dict:
    g = torch.Generator(device=device)
    g.manual_seed(4321 + case["C"])
    dt = DTYPES[case["dtype"]]
    e = torch.empty(case["N"], case["D"], dtype=dt, device=device).normal_(generator=g)
    w = torch.empty(case["C"], case["D"], dtype=dt, device=device).normal_(generator=g)
    e.mul_(case["D"] ** -0.5)
    w.mul_(case["D"] ** -0.5)
    t = torch.randint(0, case["C"], (case["N"],), generator=g, device=device)
    e.requires_grad_(True)
    w.requires_grad_(True)
    return {"e": e, "w": w, "target": t, "leaves": [e, w]}


def _linear_contender(kind: str) -> Contender:
    def build(case, inputs):
        e, w, t = inputs["e"], inputs["w"], inputs["target"]
        if kind == "cce":
            try:
                from cut_cross_entropy import linear_cross_entropy
            except Exception as ex:  # noqa: BLE001
                raise Unavailable(f"cut-cross-entropy not importable: {ex}")
            f = linear_cross_entropy
        elif kind == "fusedloss":

            def f(e, w, t):
                return fusedloss.margin_cross_entropy(e @ w.T, t, scale=1.0, backend="auto")
        else:
            f = compiled(linear_ce_baseline) if kind == "compile" else linear_ce_baseline

        def step():
            loss = f(e, w, t)
            loss.backward()
            return loss.detach()

        return step

    return build


@family("ce", default=_on_cuda_with_peers)
def ce_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    installed = peers() if device == "cuda" else {}
    if device == "cuda":
        dtypes = dtypes or ["bfloat16"]
        Cs = [32_000, 128_000, 256_000] + ([1_000_000] if large else [])
        N = 8192
    else:
        dtypes = dtypes or ["float32"]
        Cs = [10_000, 30_000, 100_000] + ([300_000] if large else [])
        N = 1024
    cases = grid([N], Cs, dtypes, variant="plain-ce")
    for c in cases:
        c["label"] = f"plain CE {SHORT[c['dtype']]} N={c['N']} C={c['C']:,}"
    contenders = {
        "fusedloss": _backend_contender("auto", scale=1.0),
        "baseline-eager": _loss_contender(plain_ce_baseline, compile_it=False),
        "baseline-compile": _loss_contender(plain_ce_baseline, compile_it=True),
    }
    fused = ("fusedloss",)
    if device == "cuda":
        contenders["fusedloss-cuda"] = _backend_contender("cuda", scale=1.0)
        contenders["fusedloss-triton"] = _backend_contender("triton", scale=1.0)
        fused += ("fusedloss-cuda", "fusedloss-triton")
        if "liger-kernel" in installed:
            contenders["liger (plain CE)"] = _liger_contender
    notes = [COS_NOTE,
             "ce: plain cross-entropy on logits; fusedloss runs `margin_cross_entropy(x, t, "
             "scale=1.0)` (m2 = 0), baseline = `F.cross_entropy(x, t)`, eager and compiled. "
             "Peer libraries compute plain cross-entropy only, so they appear in this family."]
    fam = Family(name="ce", cases=cases, make_inputs=cos_inputs, contenders=contenders,
                 fused=fused, bytes_moved=_bytes_row_op, notes=notes, mem_factor=6.0,
                 case_view=_ce_case_view)
    if "cut-cross-entropy" in installed:
        # Cut Cross-Entropy takes embeddings and classifier, not logits: its own case,
        # linear layer + cross-entropy, all contenders doing the matmul.
        D = 2048
        lin = grid([N], Cs, dtypes, variant="linear-ce", D=D)
        for c in lin:
            c["label"] = f"linear+plain CE {SHORT[c['dtype']]} N={c['N']} C={c['C']:,} D={D}"
        fam.cases += lin
        fam.notes.append(f"ce, linear+plain CE cases: inputs e [N, {D}], w [C, {D}]; every "
                         "contender computes e @ w.T (fusedloss and the baselines "
                         "materialise it, Cut Cross-Entropy does not); no GB/s figure.")
    return fam


def _ce_case_view(fam: Family, case: dict) -> Family:
    """The linear-CE cases of the ce family use other inputs and contenders."""
    if case.get("variant") != "linear-ce":
        return fam
    contenders = {"fusedloss": _linear_contender("fusedloss"),
                  "baseline-eager": _linear_contender("eager"),
                  "baseline-compile": _linear_contender("compile"),
                  "cce (plain CE)": _linear_contender("cce")}
    return dataclasses.replace(fam, make_inputs=linear_inputs, contenders=contenders,
                               fused=(), bytes_moved=lambda case: None)


# --------------------------------------------------------------------------------------
# Family: the fused linear margin softmax (fusedloss.linear_margin_cross_entropy) against
# the chain users run today: normalise, F.linear, clamp, then `arcface_baseline`.
# --------------------------------------------------------------------------------------

def arcface_linear_baseline(x, w, t, scale=64.0, m2=0.5):
    """ArcFace on embeddings x [N, D] and class centres w [C, D] as users write it today:
    the cosine matrix of the normalised rows, then the chain of `arcface_baseline`."""
    cos = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    return arcface_baseline(cos, t, scale, m2)


_LINEAR_KW = ("normalize", "scale", "m2")


def _linear_margin_contender(backend: str) -> Contender:
    """fusedloss.linear_margin_cross_entropy(e, w, target) with one backend."""

    def build(case, inputs):
        e, w, t = inputs["e"], inputs["w"], inputs["target"]
        kernel_check(backend, "margin_linear_cross_entropy", e.device)
        kwargs = {k: case[k] for k in _LINEAR_KW}

        def step():
            loss = fusedloss.linear_margin_cross_entropy(e, w, t, backend=backend, **kwargs)
            loss.backward()
            return loss.detach()

        return step

    return build


# The plain linear cross-entropy variants (no normalisation, no margin): on CUDA at the
# classification scale, and the language-model head on every device.
PLAIN_LINEAR_CE = ("plain-linear-ce", "lm-head")


def _linear_chain_contender(compile_it: bool) -> Contender:
    """The unfused chain of the case's variant, eager or compiled: `arcface_linear_baseline`,
    or for plain linear CE `linear_ce_baseline` (F.cross_entropy(e @ w.T, t))."""

    def build(case, inputs):
        if case["variant"] in PLAIN_LINEAR_CE:
            fn, kwargs = linear_ce_baseline, {}
        else:
            fn, kwargs = arcface_linear_baseline, {"scale": case["scale"], "m2": case["m2"]}
        f = compiled(fn) if compile_it else fn
        e, w, t = inputs["e"], inputs["w"], inputs["target"]

        def step():
            loss = f(e, w, t, **kwargs)
            loss.backward()
            return loss.detach()

        return step

    return build


def _cce_linear_contender(case, inputs):
    """Cut Cross-Entropy's linear_cross_entropy(e, c, targets): plain CE of e @ c.T, with its
    defaults (impl "cce", filter_eps "high": gradient filtering)."""
    if importlib.util.find_spec("cut_cross_entropy") is None:
        raise NotInstalled("cut-cross-entropy")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as ex:  # noqa: BLE001 - installed but not importable here
        raise Unavailable(f"cut-cross-entropy not importable: {type(ex).__name__}: {ex}")
    e, w, t = inputs["e"], inputs["w"], inputs["target"]
    if e.device.type != "cuda":
        raise Unavailable("Cut Cross-Entropy needs CUDA")

    def step():
        loss = linear_cross_entropy(e, w, t)
        loss.backward()
        return loss.detach()

    return step


def _torch_linear_ce_contender(case, inputs):
    """PyTorch's own fused linear cross-entropy, `F.linear_cross_entropy(e, w, t,
    options=LinearCrossEntropyOptions())`: the chunked path with its automatic choices
    (torch >= 2.13)."""
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is None or not hasattr(F, "linear_cross_entropy"):
        raise Unavailable("F.linear_cross_entropy with LinearCrossEntropyOptions needs "
                          f"torch >= 2.13, not {torch.__version__}")
    e, w, t = inputs["e"], inputs["w"], inputs["target"]
    chunked = options()

    def step():
        loss = F.linear_cross_entropy(e, w, t, options=chunked)
        loss.backward()
        return loss.detach()

    return step


def _liger_linear_contender(case, inputs):
    """Liger-Kernel's LigerFusedLinearCrossEntropyLoss()(w, e, t) (weight first, its order):
    plain CE of e @ w.T in chunks, Triton, CUDA only."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise NotInstalled("liger-kernel")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as ex:  # noqa: BLE001 - installed but not importable here
        raise Unavailable(f"liger-kernel not importable: {type(ex).__name__}: {ex}")
    e, w, t = inputs["e"], inputs["w"], inputs["target"]
    if e.device.type != "cuda":
        raise Unavailable("Liger-Kernel needs CUDA")
    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def step():
        loss = loss_fn(w, e, t)
        loss.backward()
        return loss.detach()

    return step


def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX), where a
    bf16 case measures the kernels rather than an emulation."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _flops_linear(case: dict) -> int:
    """Forward + backward of the classifier matmuls: 2·N·C·D for the logits, 2·N·C·D for the
    gradient of the embeddings, 2·N·C·D for that of the class centres."""
    return 6 * case["N"] * case["C"] * case["D"]


def _plain_linear_view(device: str) -> Callable[[Family, dict], Family]:
    """The plain linear CE cases add the fused linear cross-entropies of others, which compute
    plain CE only: torch's own, and on CUDA Liger-Kernel's and Cut Cross-Entropy's."""
    others = {"torch linear_cross_entropy (chunked)": _torch_linear_ce_contender}
    if device == "cuda":
        others.update({"liger (fused linear CE)": _liger_linear_contender,
                       "cce (plain CE)": _cce_linear_contender})

    def view(fam: Family, case: dict) -> Family:
        if case.get("variant") not in PLAIN_LINEAR_CE:
            return fam
        return dataclasses.replace(fam, contenders={**fam.contenders, **others})

    return view


@family("margin_linear")
def margin_linear_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    D = 512
    lm_head = _lm_head_cases(device, dtypes)
    if device == "cuda":
        dtypes = dtypes or ["bfloat16"]
        N, Cs = 8192, [1_000_000]
    else:
        dtypes = dtypes or ["float32"]
        N, Cs = 1024, [10_000, 100_000] + ([300_000] if large else [])
    cases = grid([N], Cs, dtypes, D=D, variant="arcface", normalize=True, scale=64.0, m2=0.5)
    for c in cases:
        c["label"] = f"linear arcface {SHORT[c['dtype']]} N={c['N']} D={D} C={c['C']:,}"
    notes = ["margin_linear: `linear_margin_cross_entropy(x, w, t, scale=64, m2=0.5)` (normalize="
             "True) on embeddings x [N, D] and class centres w [C, D], both leaves requiring grad; "
             "baseline = `arcface_linear_baseline`: `F.linear(F.normalize(x), F.normalize(w))"
             ".clamp(-1, 1)` then `arcface_baseline`, eager and under "
             "torch.compile(dynamic=False). "
             "TFLOP/s (fusedloss contenders) = 6·N·C·D / time: the logits and the two gradient "
             "matmuls; the normalisations, O((N + C)·D), are not counted. No GB/s: the op is "
             "matmul-bound. Inputs: x, w normal / sqrt(D), random targets, fixed seed."]
    contenders = {
        "fusedloss": _linear_margin_contender("auto"),
        "baseline-eager": _linear_chain_contender(compile_it=False),
        "baseline-compile": _linear_chain_contender(compile_it=True),
    }
    fused = ("fusedloss",)
    if device == "cuda":
        contenders["fusedloss-triton"] = _linear_margin_contender("triton")
        fused += ("fusedloss-triton",)
        try:
            from fusedloss._ops import resolve_backend

            notes.append(f"margin_linear: fusedloss = backend \"auto\", here "
                         f"{resolve_backend('auto', torch.device('cuda'))!r}.")
        except Exception:  # noqa: BLE001 - a note only
            pass
        plain = grid([N], Cs, dtypes, D=D, variant="plain-linear-ce", normalize=False,
                      scale=1.0, m2=0.0)
        for c in plain:
            c["label"] = f"plain linear CE {SHORT[c['dtype']]} N={c['N']} D={D} C={c['C']:,}"
        cases += plain
        installed = peers()
        notes.append("margin_linear, plain linear CE cases: margins off (`normalize=False, "
                     "scale=1, m2=0`), baseline `F.cross_entropy(x @ w.T, t)`, so that Cut "
                     "Cross-Entropy's `linear_cross_entropy(x, w, t)` (plain CE only; its "
                     "defaults, with gradient filtering, filter_eps=\"high\") computes the same "
                     "loss; cut-cross-entropy "
                     + (installed["cut-cross-entropy"] if "cut-cross-entropy" in installed
                        else "not installed") + ".")
    cases += lm_head
    notes.append(LM_HEAD_NOTE)
    return Family(
        name="margin_linear", cases=cases, make_inputs=linear_inputs, contenders=contenders,
        fused=fused, flops=_flops_linear, notes=notes, mem_factor=8.0,
        case_view=_plain_linear_view(device),
        targets=[{"case": {"variant": "arcface", "dtype": "float32", "N": 1024, "D": 512,
                           "C": 100_000},
                  "contender": "fusedloss", "time_vs_eager": 0.6, "memory_vs_eager": 0.15},
                 {"case": {"variant": "lm-head", "dtype": "float32"}, "contender": "fusedloss",
                  "baseline": "torch linear_cross_entropy (chunked)",
                  "time_vs_eager": 1.0, "memory_vs_eager": 1.0}])


LM_HEAD_NOTE = (
    "margin_linear, LM head cases: the output layer of a language model, GPT-2's vocabulary "
    "V = C = 50,257, N = 2,048 tokens, D = 512: `linear_margin_cross_entropy(x, w, t, "
    "normalize=False, scale=1)` (plain CE, what fusedloss.integrations.transformers runs) "
    "against `F.cross_entropy(x @ w.T, t)` eager and compiled, and torch's own "
    "`F.linear_cross_entropy(x, w, t, options=LinearCrossEntropyOptions())` (chunked, its "
    "automatic choices); on CUDA also Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` and "
    "Cut Cross-Entropy when installed. bf16 on CPU only where it multiplies bf16 in hardware "
    "(AVX512-BF16 or AMX).")


def _lm_head_cases(device: str, dtypes: Optional[List[str]]) -> List[dict]:
    """The LM head at N = 2,048, D = 512, V = 50,257: fp32 and, where the CPU has native
    bf16 matmul, bf16 on CPU; bf16 on CUDA; or the dtypes asked for."""
    if dtypes is None:
        dtypes = (["bfloat16"] if device == "cuda"
                  else ["float32"] + (["bfloat16"] if native_bf16_matmul() else []))
    cases = grid([2048], [50_257], dtypes, D=512, variant="lm-head", normalize=False,
                 scale=1.0, m2=0.0)
    for c in cases:
        c["label"] = f"LM head {SHORT[c['dtype']]} N=2,048 D=512 C=50,257"
    return cases


# --------------------------------------------------------------------------------------
# Family: the comp-sum family on logits (fusedloss.margin_cross_entropy with tau), GCE
# (tau = 1.7, q = 0.7) against the eager code users write and its torch.compile.
# --------------------------------------------------------------------------------------

GCE_Q = 0.7  # tau = 1 + q


def gce_baseline(z, t, q=GCE_Q):
    """Generalised cross-entropy (Zhang and Sabuncu, 2018) as users write it:
    mean over rows of (1 - softmax(z)[y]^q) / q."""
    p_y = torch.softmax(z, dim=1).gather(1, t[:, None]).squeeze(1)
    return ((1.0 - p_y ** q) / q).mean()


def _gce_contender(inplace: bool = False) -> Contender:
    def build(case, inputs):
        z, t = inputs["cos"], inputs["target"]

        def step():
            loss = fusedloss.margin_cross_entropy(z, t, scale=1.0, tau=1.0 + GCE_Q)
            loss.backward()
            return loss.detach()

        return step

    return build


@family("gce", default=False)
def gce_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    dtypes = dtypes or ["float32"]
    N = 8192 if device == "cuda" else 1024
    cases = grid([N], [100_000], dtypes, variant="gce")
    for c in cases:
        c["label"] = f"GCE tau=1.7 {SHORT[c['dtype']]} N={N:,} C=100,000"
    contenders = {
        "fusedloss": _gce_contender(),
        "baseline-eager": _loss_contender(gce_baseline, compile_it=False),
        "baseline-compile": _loss_contender(gce_baseline, compile_it=True),
    }
    return Family(
        name="gce", cases=cases, make_inputs=cos_inputs, contenders=contenders,
        fused=("fusedloss",), bytes_moved=_bytes_engine, mem_factor=5.0,
        notes=["gce: the comp-sum loss at tau = 1.7 (generalised cross-entropy, q = 0.7) on "
               "logits z [N, C] uniform in (-0.8, 0.8): `margin_cross_entropy(z, t, scale=1, "
               "tau=1.7)` (the stats engine: a statistics pass in forward, a gradient pass "
               "in backward) against `gce_baseline` ((1 - softmax(z)[y]^q) / q, mean), eager "
               "and compiled. GB/s: forward reads z, backward reads z and writes the gradient: "
               "3·N·C·itemsize bytes / time."],
        targets=[{"case": {"variant": "gce"}, "contender": "fusedloss", "time_vs_eager": 0.2},
                 {"case": {"variant": "gce"}, "contender": "fusedloss",
                  "baseline": "baseline-compile", "time_vs_eager": 1 / 3}])


def _bytes_engine(case: dict) -> int:
    """The stats engine: forward reads cos, backward reads it and writes the gradient."""
    return 3 * case["N"] * case["C"] * DTYPES[case["dtype"]].itemsize


# --------------------------------------------------------------------------------------
# Family: inplace_backward (the gradient written into cos's storage) beside the default
# margin_cross_entropy, ArcFace on cos.
# --------------------------------------------------------------------------------------

def _inplace_contender(case, inputs):
    """A private copy of cos (made before the measured step), restored from the shared one at
    the start of every step (one copy_ of N x C, timed; no allocation), since backward turns
    its values into the gradient."""
    shared, t = inputs["cos"], inputs["target"]
    cos = shared.detach().clone().requires_grad_(True)
    inputs.setdefault("leaves", []).append(cos)

    def step():
        with torch.no_grad():
            cos.copy_(shared)
        # cos enters through a view, as the output of its producer (the classifier matmul,
        # whose backward takes the gradient as it is) would: a leaf's .grad would be a copy.
        loss = fusedloss.margin_cross_entropy(cos.view_as(cos), t, scale=64.0, m2=0.5,
                                              inplace_backward=True)
        loss.backward()
        return loss.detach()

    return step


@family("margin_inplace", default=False)
def margin_inplace_family(device: str, large: bool, dtypes: Optional[List[str]]) -> Family:
    dtypes = dtypes or ["float32"]
    N = 8192 if device == "cuda" else 1024
    cases = grid([N], [100_000], dtypes, variant="arcface-inplace")
    for c in cases:
        c.update(scale=64.0, m2=0.5,
                 label=f"arcface inplace_backward {SHORT[c['dtype']]} N={N:,} C=100,000")
    contenders = {
        "fusedloss inplace_backward": _inplace_contender,
        "fusedloss": _backend_contender("auto"),
        "baseline-eager": _loss_contender(arcface_baseline, compile_it=False),
        "baseline-compile": _loss_contender(arcface_baseline, compile_it=True),
    }
    return Family(
        name="margin_inplace", cases=cases, make_inputs=cos_inputs, contenders=contenders,
        fused=("fusedloss inplace_backward", "fusedloss"), bytes_moved=_bytes_engine,
        mem_factor=5.0,
        notes=["margin_inplace: ArcFace (scale 64, m2 0.5) with `inplace_backward=True` (the "
               "stats engine; backward writes the gradient into cos, which enters through a "
               "view as a producer's output would; each step first restores its private copy "
               "of cos with one timed copy_) beside the default single-pass kernel and "
               "`arcface_baseline`. Target: peak extra memory <= 0.1 N·C·itemsize."],
        targets=[{"case": {"variant": "arcface-inplace"},
                  "contender": "fusedloss inplace_backward", "baseline": "fusedloss",
                  "memory_vs_eager": 0.1}])
