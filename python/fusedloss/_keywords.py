"""Keyword-only parameters that several public functions share, declared once.

A family declares its shared keywords in one place: the fields of an options dataclass (the
margin family's MarginOptions) or the keyword-only parameters of one explicit signature
(spherical_z_loss's). Every function that shares them takes them through ``**kwargs`` and is
decorated with ``shares_keywords(params, before=...)``.

Contract of the decorator: it returns the function itself, not a wrapper (torch.compile
traces the function's own code), with ``__signature__`` set to the function's signature,
``**kwargs`` removed and `params` inserted in front of the parameter named `before`, so that
``help()`` and ``inspect.signature`` show every shared keyword explicitly, with its default
and its annotation.

Contract of the decorated function: before anything else it passes its ``**kwargs`` to
``refuse_unknown``, which raises the TypeError that Python itself raises for a keyword a
signature lacks ("fn() got an unexpected keyword argument 'x'"), for the first such keyword
in call order; the defaults are then those of the declaration (the dataclass's, or
``defaults(params)``)."""
import dataclasses
import inspect
from typing import Callable, Dict, Iterable, Sequence, Tuple


def fields_as_keywords(options_class: type) -> Tuple[inspect.Parameter, ...]:
    """The fields of dataclass `options_class`, in declaration order, as keyword-only
    parameters with the fields' defaults and annotations."""
    return tuple(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                   annotation=f.type)
                 for f in dataclasses.fields(options_class))


def keywords_of(function: Callable, names: Sequence[str]) -> Tuple[inspect.Parameter, ...]:
    """The parameters `names` of `function`'s signature, in that order."""
    params = inspect.signature(function).parameters
    return tuple(params[name] for name in names)


def defaults(params: Iterable[inspect.Parameter]) -> Dict[str, object]:
    """{name: default} of `params`."""
    return {p.name: p.default for p in params}


def shares_keywords(params: Sequence[inspect.Parameter], before: str) -> Callable:
    """The decorator described in this module's docstring."""
    def decorate(function):
        signature = inspect.signature(function)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = [p.name for p in own].index(before)
        function.__signature__ = signature.replace(parameters=own[:at] + list(params) + own[at:])
        return function
    return decorate


def refuse_unknown(fn: str, given: dict, names: Sequence[str]) -> None:
    """TypeError, worded as Python's own, for the first keyword of `given` not in `names`.
    `names` is a tuple of str fixed at import, so that torch.compile traces this as constants."""
    for name in given:
        if name not in names:
            raise TypeError(f"{fn}() got an unexpected keyword argument {name!r}")
