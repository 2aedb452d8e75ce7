"""Drop-ins for the training code users already run. Each submodule imports its library only
when it is imported itself (``fusedloss.integrations.transformers`` needs the
``transformers`` extra); importing this package imports none of them."""
