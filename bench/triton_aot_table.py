"""Writes bench/results/triton_aot_sm90.md: every Triton kernel variant that the launchers make
for tests/test_triton_aot.py's launch matrix, compiled for sm_90 without a GPU, summed up per
kernel (variants, registers, shared memory, register spills from ptxas -v), with the spilling
variants listed. The launch matrix, the compilation and the table are the test's own.

    python bench/triton_aot_table.py                    # the variants that the test compiles
    python bench/triton_aot_table.py --every-alignment  # and every divisibility specialisation
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import torch  # noqa: E402

if not torch.cuda.is_available():  # as tests/conftest.py: the launchers run on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

import test_triton_aot as aot  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every-alignment", action="store_true",
                        help="every divisibility specialisation, not one per configuration")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "triton_aot_sm90.md"))
    args = parser.parse_args()

    from triton.backends.nvidia.compiler import get_ptxas

    start = time.time()
    found = aot.variants(every_alignment=args.every_alignment)
    results = aot.compile_variants(found)
    seconds = time.time() - start
    ptxas = get_ptxas(90)
    which = ("every divisibility specialisation" if args.every_alignment
             else "one variant per configuration, as tests/test_triton_aot.py compiles")
    header = [
        "# Triton kernels compiled ahead of time for sm_90",
        "",
        f"Triton {triton.__version__}, its bundled ptxas {ptxas.version}, torch "
        f"{torch.__version__}; `python bench/triton_aot_table.py"
        f"{' --every-alignment' if args.every_alignment else ''}` ({which}), "
        f"{len(aot.calls())} public calls recorded with a GPU's launch choices, "
        f"{len(results)} variants compiled in {seconds:.0f} s on {os.cpu_count()} cores.",
        "",
        "Launch matrix (tests/test_triton_aot.py): every OpSpec sample on an H100's 132 SMs "
        "(modes); per op and dtype one sample widened to C = 4100 (row ops) or D = 520 (tiled "
        "ops, launched as on 1 SM so that each split of an inner loop holds several blocks), "
        "fp32 also with tf32 (edges); block_size = 128 and 256 on the tiled ops (blocks, "
        "capped by triton_kernels/_common.py cap_block). \"default\": variants that a call "
        "without block_size makes. Registers and spills per thread (ptxas -v, every function "
        "of the variant); shared memory per block (limit 232448 B).",
        "",
        "",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(header) + aot.table(results))
    print(f"wrote {args.out} ({len(results)} variants, {seconds:.0f} s)")


if __name__ == "__main__":
    main()
