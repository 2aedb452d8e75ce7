"""The loss families of the benchmark engine (fusedloss.bench), one module per op family:
margin (families margin, ce, margin_linear), spherical, pairs, sharded. Each module
registers its families with ``fusedloss.bench.family`` when imported; the engine imports
the modules that the op registry names (``fusedloss.specs.benchmark_families``), in that
order (the order of the default run), see ``fusedloss.bench.load_families``."""
