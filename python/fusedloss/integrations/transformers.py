"""Hugging Face ``transformers`` causal LMs whose training loss never forms the logits.

Usage::

    from fusedloss.integrations.transformers import apply

    model = apply(AutoModelForCausalLM.from_pretrained(...))
    out = model(input_ids, labels=input_ids)    # out.loss fused, out.logits None
    model.generate(input_ids)                   # unchanged: no labels, logits as usual

The loss. With ``h [N, D]`` the final hidden states of the N = batch x positions tokens (after
the model's last norm), ``W [V, D]`` = ``lm_head.weight`` (tied to the input embeddings or
not) and ``y`` the labels shifted left by one (each position predicts the next token, the
last position gets ``ignore_index``; a ``shift_labels`` argument replaces the shift), HF's
``ForCausalLMLoss`` computes

    loss = sum_{i : y_i != ignore_index} (logsumexp_j z_ij - z_{i, y_i}) / n,   z = h W^T

with ``n`` the number of kept tokens, or ``num_items_in_batch`` when the caller passes it
(gradient accumulation: the sum over the micro-batch divided by the count over the whole
accumulated batch). That sum or mean is ``fusedloss.linear_margin_cross_entropy(h, W, y,
normalize=False, scale=1)`` with ``reduction="sum"`` or ``"mean"``, computed tile by tile: the
``N x V`` matrix z is never stored, in forward or backward. Gemma 2's
``final_logit_softcapping`` c replaces z by ``c * tanh(z / c)`` before the softmax: the op's
``softcap=c``.

How. :func:`apply` replaces ``forward`` on the model instance only (never on its class). A
call without labels runs the model's own forward untouched (generation, evaluation,
``logits_to_keep``). A call with labels runs the model's own forward with ``labels=None`` and
``logits_to_keep`` an empty index, so that the head projects no position, while a forward
hook on the decoder stack (``model.model``, GPT-2's ``model.transformer``) keeps its final
hidden states; the loss then comes from them and ``lm_head.weight``, and the output carries
it with ``logits=None``.

Dtypes. HF casts the logits to fp32 before its loss; here the op accumulates in fp32 from the
model's own dtype (bf16 / fp16 hidden states and weight are read as they are, the logits are
never rounded to bf16), and the loss is returned in fp32, or fp64 for an fp64 model.
"""
import inspect
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fusedloss import linear_margin_cross_entropy

# Supported model classes (a subclass of one counts as it): the attribute of the decoder
# stack whose output feeds ``lm_head``. Each forward is ``hidden = <stack>(...)
# .last_hidden_state; logits = lm_head(hidden[:, keep])`` (Gemma 2: then its softcap),
# followed by HF's causal-LM loss; tests/test_integrations_transformers.py checks each.
SUPPORTED: Dict[str, str] = {
    "LlamaForCausalLM": "model",
    "MistralForCausalLM": "model",
    "Qwen2ForCausalLM": "model",
    "Qwen3ForCausalLM": "model",
    "GemmaForCausalLM": "model",
    "Gemma2ForCausalLM": "model",
    "GPT2LMHeadModel": "transformer",
}

def apply(model: nn.Module) -> nn.Module:
    """Make ``model(..., labels=...)`` compute HF's causal-LM loss with the fused linear
    cross-entropy, without logits (see the module docstring); returns `model`, patched in
    place (copies made with ``copy.deepcopy`` or pickling stay patched, each calling its own
    weights). Applying twice is a no-op; :func:`revert` undoes it.

    Raises TypeError for a model class not in :data:`SUPPORTED` (naming the class), and
    ValueError for an ``lm_head`` that is not a bias-free ``nn.Linear``."""
    if isinstance(vars(model).get("forward"), _FusedLossForward):
        return model
    stack = _stack_attribute(model)
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(f"fusedloss.integrations.transformers.apply: {type(model).__name__}."
                         "lm_head must be a torch.nn.Linear without bias, got "
                         f"{head!r}")
    model.forward = _FusedLossForward(model, stack)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` on `model` (no-op where it was not applied); returns `model`."""
    patched = vars(model).get("forward")
    if isinstance(patched, _FusedLossForward):
        del model.forward
        if patched.replaced is not None:
            model.forward = patched.replaced
    return model


class _FusedLossForward:
    """The forward that :func:`apply` sets on a model instance. It holds the model (so that a
    deep copy of the model holds its copy) and shows the model's own signature (which HF's
    Trainer reads to choose the dataset columns and to pass ``num_items_in_batch``)."""

    def __init__(self, model: nn.Module, stack: str):
        self.model, self.stack = model, stack
        # A forward set on the instance before (a wrapper of another library); None: the
        # class's forward.
        self.replaced = vars(model).get("forward")

    def original(self):
        """The forward that this one replaced, bound to the model."""
        if self.replaced is not None:
            return self.replaced
        return type(self.model).forward.__get__(self.model)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.original())

    def __call__(self, *args, **kwargs):
        original = self.original()
        call = _as_keywords(inspect.signature(original), args, kwargs)
        labels = call.pop("labels", None)
        if labels is None:
            return original(*args, **kwargs)
        return _forward_with_fused_loss(self.model, original, getattr(self.model, self.stack),
                                        labels, call)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels: Optional[torch.Tensor] = None,
                   softcap: Optional[float] = None) -> torch.Tensor:
    """HF's ``ForCausalLMLoss`` of the logits ``hidden @ weight.T`` (softcapped by `softcap`
    where given), without forming them: ``hidden [..., D]`` are the final hidden states,
    ``weight [V, D]`` the head, ``labels`` the unshifted labels (``hidden.shape[:-1]``), or
    ``shift_labels`` the labels already shifted. Returns the fp32 loss (fp64 for fp64
    inputs), the mean over the kept tokens or the sum divided by `num_items_in_batch`."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    loss = linear_margin_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, shift_labels.reshape(-1).to(hidden.device),
        normalize=False, scale=1.0, softcap=softcap, ignore_index=ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum")
    loss = loss.to(torch.promote_types(loss.dtype, torch.float32))
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _stack_attribute(model: nn.Module) -> str:
    """The decoder-stack attribute of a supported model class; TypeError naming the class
    otherwise."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and cls.__name__ in SUPPORTED:
            return SUPPORTED[cls.__name__]
    raise TypeError(f"fusedloss.integrations.transformers.apply: {type(model).__name__} is not "
                    f"supported; supported model classes: {', '.join(sorted(SUPPORTED))}")


def _as_keywords(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """The call ``forward(*args, **kwargs)`` as keywords only (HF forwards take every
    argument by name)."""
    bound = signature.bind(*args, **kwargs)
    call = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        else:
            call[name] = value
    return call


def _forward_with_fused_loss(model, original, stack, labels, call):
    """The model's own forward with no head projection, then the fused loss from the final
    hidden states that a hook on `stack` keeps."""
    return_dict = call.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    keep = call.pop("logits_to_keep", 0)
    weight = model.lm_head.weight
    seen = []
    hook = stack.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        out = original(**call, labels=None, return_dict=True,
                       logits_to_keep=torch.empty(0, dtype=torch.long, device=weight.device))
    finally:
        hook.remove()
    hidden = seen[-1][0]  # last_hidden_state, of a ModelOutput or a tuple
    if not (isinstance(keep, int) and keep == 0):
        hidden = _kept_positions(hidden, keep)
    loss = causal_lm_loss(hidden, weight, labels,
                          num_items_in_batch=call.get("num_items_in_batch"),
                          ignore_index=call.get("ignore_index", -100),
                          shift_labels=call.get("shift_labels"),
                          softcap=getattr(model.config, "final_logit_softcapping", None))
    out = type(out)(**{k: v for k, v in out.items() if k != "logits"}, loss=loss)
    return out if return_dict else out.to_tuple()


def _kept_positions(hidden: torch.Tensor, keep) -> torch.Tensor:
    """The positions `logits_to_keep` selects, as the model's own forward selects them."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:  # transformers 5.0: the last `keep` positions, or an index of them
        return hidden[:, slice(-keep, None) if isinstance(keep, int) else keep, :]
    return slice_logits_to_keep(hidden, keep)
