"""triton_kernels/_common.py: the helpers that the Triton kernel modules share.

(a) By parsing the sources: no module of triton_kernels/ imports another kernel module's
private names, the shared helpers are defined in _common.py alone, and no two functions of
the package have the same body. (b) The online log-sum-exp helper against torch.logsumexp,
through small kernels that call it (under TRITON_INTERPRET=1 without a GPU)."""
import ast
import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.triton

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fusedloss.triton_kernels._common import online_lse_update  # noqa: E402

PACKAGE = "fusedloss.triton_kernels"
COMMON = "_common"

# The helpers that live in _common.py and nowhere else.
SHARED_HELPERS = [
    "hi_lo", "from_hi_lo",                                    # the hi/lo scalar rebuild
    "online_lse_update",                                      # the online log-sum-exp update
    "interpreted",                                            # the interpreter check
    "row_layout", "row_kernel_io", "row_block_c", "row_num_warps",  # the row setup
    "uses_angle", "asin_terms", "acos_series", "continuation_sign", "target_logit",
    "row_margins",
    "load_rows", "dot_tile", "split_range", "split_blocks", "target_programs", "allow_tf32",
    "pow2_clamp",
]
# Names that these helpers had as copies in the kernel modules.
FORMER_COPIES = [
    "_hi_lo", "_scalar", "_lse_update", "_add_to_lse", "_interpreted", "_block_c",
    "_row_kernel_io", "_row_num_warps", "_row_stride_layout", "_acos", "_continuation_sign",
    "_target_logit", "_row_margins", "_load_rows", "_dot_tile", "_split_range", "_split",
    "_target_programs", "_allow_tf32", "_pow2", "_pow2_block", "_num_sms",
]


def _sources() -> dict:
    """{module name: parsed source} of every module of the package but __init__."""
    folder = Path(importlib.util.find_spec(PACKAGE).submodule_search_locations[0])
    return {path.stem: ast.parse(path.read_text(), str(path))
            for path in sorted(folder.glob("*.py")) if path.stem != "__init__"}


def _module_of(node: ast.ImportFrom):
    """The package module that `from ... import` reads from, or None for one outside it."""
    if node.level == 1:
        return node.module
    if node.module and node.module.startswith(PACKAGE + "."):
        return node.module[len(PACKAGE) + 1:]
    return None


def _package_imports(tree: ast.Module):
    """(names imported from package modules as (module, name), local aliases of package
    modules {alias: module})."""
    names, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _module_of(node)
            if module is not None:
                names += [(module, a.name) for a in node.names]
            elif node.module == PACKAGE or (node.level == 1 and node.module is None):
                for a in node.names:  # from fusedloss.triton_kernels import margin_linear
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PACKAGE + ".") and a.asname:
                    aliases[a.asname] = a.name[len(PACKAGE) + 1:]
    return names, aliases


def test_no_kernel_module_imports_private_names():
    sources = _sources()
    bad = []
    for module, tree in sources.items():
        names, aliases = _package_imports(tree)
        bad += [f"{module}: from {src} import {name}" for src, name in names
                if name.startswith("_")]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")):
                bad.append(f"{module}: {node.value.id}.{node.attr} "
                           f"({aliases[node.value.id]}.{node.attr})")
    assert not bad, "private names of another module:\n" + "\n".join(bad)


def _functions(tree: ast.Module):
    """The functions and methods of a module (nested ones included)."""
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_shared_helpers_are_defined_once_in_common():
    sources = _sources()
    defined = {module: {f.name for f in _functions(tree)} for module, tree in sources.items()}
    missing = [name for name in SHARED_HELPERS if name not in defined[COMMON]]
    assert not missing, f"not defined in {COMMON}.py: {missing}"
    elsewhere = [f"{module}.{name}" for module, names in defined.items() if module != COMMON
                 for name in names if name in SHARED_HELPERS or name in FORMER_COPIES]
    assert not elsewhere, f"defined outside {COMMON}.py: {elsewhere}"


def _body_key(fn: ast.FunctionDef) -> str:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring
    return ast.dump(ast.Module(body=body, type_ignores=[]), include_attributes=False)


def test_no_function_body_is_repeated():
    seen, repeated = {}, []
    for module, tree in _sources().items():
        for fn in _functions(tree):
            key = _body_key(fn)
            if key in seen:
                repeated.append(f"{seen[key]} and {module}.{fn.name}")
            seen.setdefault(key, f"{module}.{fn.name}")
    assert not repeated, "same body:\n" + "\n".join(repeated)


def _is_tl_call(node, name: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == name and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "tl")


def test_copied_patterns_only_in_common():
    """The shapes of the shared helpers, spelled out again outside _common.py: a running max
    tl.maximum(m, tl.max(z)), a scalar rebuilt as tl.cast(hi) + tl.cast(lo), fp32 packing
    with struct, and the interpreter check (os.environ or device.type == "cpu")."""
    found = []
    for module, tree in _sources().items():
        if module == COMMON:
            continue
        for node in ast.walk(tree):
            where = f"{module}:{getattr(node, 'lineno', '?')}"
            if _is_tl_call(node, "maximum") and any(_is_tl_call(a, "max") for a in node.args):
                found.append(f"{where} running max (online_lse_update)")
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)
                    and _is_tl_call(node.left, "cast") and _is_tl_call(node.right, "cast")):
                found.append(f"{where} hi + lo (from_hi_lo)")
            if isinstance(node, ast.Name) and node.id in ("struct", "os"):
                found.append(f"{where} {node.id} (hi_lo / interpreted)")
            if isinstance(node, ast.Constant) and node.value in ("TRITON_INTERPRET", "cpu"):
                found.append(f"{where} {node.value!r} (interpreted)")
    assert not found, "\n".join(found)


# ---------------------------------------------------------------------------------------
# (b) online_lse_update against torch.logsumexp

@triton.jit
def _lse_rows_kernel(z_ptr, out_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     ROWS_ON_AXIS_0: tl.constexpr):
    """log sum_j exp(z[i, j]) for the R rows of a contiguous z [R, C], BLOCK_C columns at a
    time, in one program: the tile [BLOCK_R, BLOCK_C] reduced along axis 1, or its transpose
    reduced along axis 0 (ROWS_ON_AXIS_0)."""
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    rows = tl.arange(0, BLOCK_R)
    m = tl.full([BLOCK_R], float("-inf"), ACC)
    s = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        if ROWS_ON_AXIS_0:
            mask = (cols[:, None] < C) & (rows[None, :] < R)
            z = tl.load(z_ptr + rows[None, :] * C + cols[:, None], mask=mask,
                        other=float("-inf"))
            m, s = online_lse_update(m, s, z.to(ACC), 0)
        else:
            mask = (rows[:, None] < R) & (cols[None, :] < C)
            z = tl.load(z_ptr + rows[:, None] * C + cols[None, :], mask=mask,
                        other=float("-inf"))
            m, s = online_lse_update(m, s, z.to(ACC), 1)
    tl.store(out_ptr + rows, tl.where(m == float("-inf"), 0.0, m) + tl.log(s), mask=rows < R)


@triton.jit
def _lse_row_kernel(z_ptr, out_ptr, C, BLOCK_C: tl.constexpr):
    """log sum_j exp(z[i, j]) with one program per row: a scalar state and 1-D blocks."""
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    row = tl.program_id(0)
    m = tl.full([], float("-inf"), ACC)
    s = tl.full([], 0.0, ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        z = tl.load(z_ptr + row * C + cols, mask=cols < C, other=float("-inf"))
        m, s = online_lse_update(m, s, z.to(ACC), 0)
    tl.store(out_ptr + row, tl.where(m == float("-inf"), 0.0, m) + tl.log(s))


def _blocks(dtype: torch.dtype) -> torch.Tensor:
    """Rows [R, C] with C = 50 (several blocks of 16, the last one partial): spread values,
    a row whose maximum sits in its last block, rows with left-out (-inf) entries, a row
    with nothing but -inf, and a row that holds NaN."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 50, generator=gen, dtype=torch.float64) * 30.0
    z[1] = torch.linspace(-200.0, 100.0, 50, dtype=torch.float64)  # max in the last block
    z[2, ::3] = -math.inf
    z[3, :40] = -math.inf  # the first blocks empty, then values
    z[4] = -math.inf
    z[5, 17] = math.nan
    z[6] = 1e4 + torch.randn(50, generator=gen, dtype=torch.float64)  # far from 0
    return z.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["row_per_program", "rows_on_axis_1", "rows_on_axis_0"])
def test_online_lse_update_matches_logsumexp(dtype, layout):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    z = _blocks(dtype).to(device)
    rows, cols = z.shape
    out = torch.empty(rows, dtype=dtype, device=device)
    if layout == "row_per_program":
        _lse_row_kernel[(rows,)](z, out, cols, BLOCK_C=16)
    else:
        _lse_rows_kernel[(1,)](z, out, rows, cols, BLOCK_R=8, BLOCK_C=16,
                               ROWS_ON_AXIS_0=layout == "rows_on_axis_0")
    expected = torch.logsumexp(z.double(), dim=1)
    assert torch.isnan(expected[5]) and torch.isnan(out[5])
    assert out[4].item() == -math.inf and expected[4].item() == -math.inf
    keep = [0, 1, 2, 3, 6]
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out[keep].double().cpu(), expected[keep].cpu(), rtol=rtol, atol=0)
