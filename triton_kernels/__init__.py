"""Triton kernels of fusedloss, one module per op family; imported only when first used."""
