"""Plain-PyTorch implementations of every fusedloss op: the correctness oracles."""
