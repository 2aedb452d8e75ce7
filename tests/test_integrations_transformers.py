"""fusedloss.integrations.transformers: Hugging Face causal LMs with the fused loss.

Tiny random models of each supported family, built from configs here (no download). The
patched model's loss and every parameter's gradient are compared with the fp64 oracle (the
unpatched fp64 model's logits, then HF's causal-LM loss written out in plain PyTorch) and
with the unpatched model's own loss (HF computes it from fp32 logits, so at fp32 tolerance);
generation and the logits of calls without labels are unchanged; a training step at a
vocabulary of 32k never holds an N x V tensor."""
import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import assert_close

transformers = pytest.importorskip("transformers")
from fusedloss.bench.memory import reset_peak_rss, vmhwm_bytes  # noqa: E402
from fusedloss.integrations.transformers import SUPPORTED, apply, revert  # noqa: E402

VOCAB = 97  # not a multiple of any tile
NO_DROPOUT = dict(attention_dropout=0.0)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **NO_DROPOUT)

CONFIGS = {
    "llama": lambda v: transformers.LlamaConfig(vocab_size=v, **DECODER),
    "mistral": lambda v: transformers.MistralConfig(vocab_size=v, sliding_window=None, **DECODER),
    "qwen2": lambda v: transformers.Qwen2Config(vocab_size=v, **DECODER),
    "qwen3": lambda v: transformers.Qwen3Config(vocab_size=v, **DECODER),
    "gemma": lambda v: transformers.GemmaConfig(vocab_size=v, **DECODER),
    # final_logit_softcapping 30 by default; 3 here so that the cap bends these logits.
    "gemma2": lambda v: transformers.Gemma2Config(vocab_size=v, final_logit_softcapping=3.0,
                                                  **DECODER),
    "gpt2": lambda v: transformers.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4,
                                              n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                              attn_pdrop=0.0),
}


def tiny_model(family, vocab=VOCAB, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family](vocab))
    return model.to(dtype).train()


def batch(vocab=VOCAB, size=(2, 9), seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, size, generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt that does not count
    labels[1, -2] = -100
    return ids, labels


def hf_loss_fp64(logits, labels, num_items_in_batch=None, shift_labels=None):
    """HF's ForCausalLMLoss written out, on fp64 logits: the oracle."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    rows = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                           shift_labels.reshape(-1), ignore_index=-100, reduction="none")
    if num_items_in_batch is None:
        return rows.sum() / (shift_labels != -100).sum()
    return rows.sum() / num_items_in_batch


def loss_and_grads(model, loss_of):
    model.zero_grad(set_to_none=True)
    loss = loss_of(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# Each label mode: the keywords of the model call, and those of the fp64 oracle.
def label_modes(ids, labels):
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    shifted[0, 4] = -100
    count = int((F.pad(labels, (0, 1), value=-100)[..., 1:] != -100).sum())
    return {
        "mean": ({"labels": labels}, {}),
        "num_items_in_batch": ({"labels": labels, "num_items_in_batch": torch.tensor(count + 7)},
                               {"num_items_in_batch": count + 7}),
        "shift_labels": ({"labels": labels, "shift_labels": shifted},
                         {"shift_labels": shifted}),
    }


def assert_grads_close(actual, expected, dtype, what):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], dtype, f"{what}: grad of {name}")


@pytest.mark.parametrize("mode", ["mean", "num_items_in_batch", "shift_labels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_loss_and_every_gradient_match_hf(family, dtype, mode):
    reference = tiny_model(family)
    ids, labels = batch()
    call, oracle_kw = label_modes(ids, labels)[mode]
    oracle = loss_and_grads(reference, lambda m: hf_loss_fp64(m(ids).logits, labels, **oracle_kw))
    unpatched = copy.deepcopy(reference).to(dtype)
    hf = loss_and_grads(unpatched, lambda m: m(ids, **call).loss)
    patched = apply(copy.deepcopy(reference).to(dtype))
    out = {}
    fused = loss_and_grads(patched, lambda m: out.setdefault("out", m(ids, **call)).loss)
    assert out["out"].logits is None
    assert fused[0].dtype == torch.promote_types(dtype, torch.float32)
    assert_close(fused[0], oracle[0], dtype, "loss vs fp64 oracle")
    assert_grads_close(fused[1], oracle[1], dtype, "vs fp64 oracle")
    # HF casts the logits to fp32 before its loss: the peer agrees at fp32 tolerance.
    assert_close(fused[0], hf[0].double(), torch.float32, "loss vs unpatched HF")
    assert_grads_close(fused[1], hf[1], torch.float32, "vs unpatched HF")


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_cuda_loss_and_every_gradient_match_the_oracle(family):
    """On CUDA the patch takes linear_margin_cross_entropy's triton path (fp32, with torch's
    default of no TF32 matmuls)."""
    reference = tiny_model(family)
    ids, labels = batch()
    oracle = loss_and_grads(reference, lambda m: hf_loss_fp64(m(ids).logits, labels))
    patched = apply(copy.deepcopy(reference).to(device="cuda", dtype=torch.float32))
    ids_cuda, labels_cuda = ids.cuda(), labels.cuda()
    fused = loss_and_grads(patched, lambda m: m(ids_cuda, labels=labels_cuda).loss)
    assert_close(fused[0].cpu(), oracle[0], torch.float32, "loss vs fp64 oracle")
    assert_grads_close({n: g.cpu() for n, g in fused[1].items()}, oracle[1], torch.float32,
                       "vs fp64 oracle")


def test_tied_head_gets_both_gradients():
    """GPT-2 ties lm_head.weight to the input embedding: one parameter, whose gradient sums the
    embedding lookup's and the head's."""
    model = apply(tiny_model("gpt2"))
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, labels = batch()
    expected = loss_and_grads(tiny_model("gpt2"),
                              lambda m: hf_loss_fp64(m(ids).logits, labels))
    actual = loss_and_grads(model, lambda m: m(ids, labels=labels).loss)
    assert_close(actual[1]["transformer.wte.weight"], expected[1]["transformer.wte.weight"],
                 torch.float64, "tied weight")


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_calls_without_labels_and_generation_unchanged(family):
    reference = tiny_model(family, dtype=torch.float32).eval()
    patched = apply(copy.deepcopy(reference))
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(patched(ids).logits, reference(ids).logits, rtol=0, atol=0)
        kept = patched(ids, logits_to_keep=1).logits
        assert kept.shape == (2, 1, VOCAB)
        torch.testing.assert_close(kept, reference(ids, logits_to_keep=1).logits, rtol=0, atol=0)
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **greedy), reference.generate(ids, **greedy))


def test_gradient_accumulation_with_num_items_in_batch():
    """Two micro-batches with num_items_in_batch = the tokens kept in both: the accumulated
    gradient is that of the mean over the whole batch, as HF's Trainer relies on."""
    ids, labels = batch(size=(4, 9))
    whole = tiny_model("llama")
    expected = loss_and_grads(whole, lambda m: hf_loss_fp64(m(ids).logits, labels))
    patched = apply(tiny_model("llama"))
    count = torch.tensor(int((labels[:, 1:] != -100).sum()))
    patched.zero_grad(set_to_none=True)
    total = 0.0
    for part in (slice(0, 2), slice(2, 4)):
        loss = patched(ids[part], labels=labels[part], num_items_in_batch=count).loss
        loss.backward()
        total = total + loss.detach()
    assert_close(total, expected[0], torch.float64, "accumulated loss")
    assert_grads_close({n: p.grad for n, p in patched.named_parameters()}, expected[1],
                       torch.float64, "accumulated")


def test_tuple_output_and_positional_labels():
    model = apply(tiny_model("llama"))
    ids, labels = batch()
    expected = model(ids, labels=labels).loss
    loss, *rest = model(ids, labels=labels, return_dict=False)
    assert torch.equal(loss, expected)
    assert not any(isinstance(x, torch.Tensor) and x.shape[-1:] == (VOCAB,) for x in rest)
    positional = model(ids, None, None, None, None, labels).loss  # LlamaForCausalLM's order
    assert torch.equal(positional, expected)


def test_logits_to_keep_with_shift_labels_as_hf():
    """With labels, logits_to_keep selects the positions whose loss counts (HF slices the
    hidden states before its head); shift_labels give their targets."""
    ids, labels = batch()
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:][:, -4:].contiguous()
    call = dict(labels=labels, shift_labels=shift, logits_to_keep=4)
    hf = loss_and_grads(tiny_model("qwen2"), lambda m: m(ids, **call).loss)
    fused = loss_and_grads(apply(tiny_model("qwen2")), lambda m: m(ids, **call).loss)
    assert_close(fused[0], hf[0].double(), torch.float32, "loss vs unpatched HF")
    assert_grads_close(fused[1], hf[1], torch.float32, "vs unpatched HF")


def test_every_label_ignored_gives_nan_as_hf():
    model = apply(tiny_model("llama"))
    ids, _ = batch()
    labels = torch.full_like(ids, -100)
    reference = tiny_model("llama")
    assert torch.isnan(model(ids, labels=labels).loss)
    assert torch.isnan(reference(ids, labels=labels).loss)


def test_apply_twice_and_revert():
    model = tiny_model("llama")
    assert apply(apply(model)) is model
    ids, labels = batch()
    assert model(ids, labels=labels).logits is None
    assert revert(model) is model
    assert model(ids, labels=labels).logits.shape == (2, 9, VOCAB)
    assert revert(model) is model


def test_copies_stay_patched_on_their_own_weights():
    """deepcopy and pickle give patched models that run their own weights, and the patched
    forward shows the model's own signature (HF's Trainer reads it)."""
    import inspect
    import pickle

    model = apply(tiny_model("llama"))
    assert "labels" in inspect.signature(model.forward).parameters
    ids, labels = batch()
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            copied.lm_head.weight.mul_(2.0)
            out = copied(ids, labels=labels)
            expected = hf_loss_fp64(revert(copy.deepcopy(copied))(ids).logits, labels)
            assert out.logits is None
            assert_close(out.loss, expected, torch.float64, "copy's loss")
            assert not torch.equal(out.loss, model(ids, labels=labels).loss)


def test_unsupported_models_raise_naming_the_class():
    with pytest.raises(TypeError, match="OPTForCausalLM is not supported"):
        apply(transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
            num_attention_heads=2, word_embed_proj_dim=16)))
    with pytest.raises(TypeError, match="Linear is not supported"):
        apply(torch.nn.Linear(2, 2))


def test_head_with_bias_raises():
    model = tiny_model("llama")
    model.lm_head = torch.nn.Linear(32, VOCAB, bias=True, dtype=torch.float64)
    with pytest.raises(ValueError, match="without bias"):
        apply(model)


def test_labels_outside_the_vocabulary_raise():
    model = apply(tiny_model("llama"))
    ids, labels = batch()
    labels[1, 3] = VOCAB
    with pytest.raises(ValueError, match="target"):
        model(ids, labels=labels)


def test_bf16_model_gives_fp32_loss_within_bf16_tolerance():
    """A bf16 model: the op reads bf16 hidden states and head and accumulates in fp32, the
    loss is fp32 as HF's (which casts its bf16 logits to fp32)."""
    reference = tiny_model("llama")
    ids, labels = batch()
    oracle = loss_and_grads(reference, lambda m: hf_loss_fp64(m(ids).logits, labels))
    patched = apply(copy.deepcopy(reference).to(torch.bfloat16))
    fused = loss_and_grads(patched, lambda m: m(ids, labels=labels).loss)
    assert fused[0].dtype == torch.float32
    assert_close(fused[0], oracle[0], torch.bfloat16, "bf16 loss vs fp64 oracle")
    assert_close(fused[1]["lm_head.weight"], oracle[1]["lm_head.weight"], torch.bfloat16,
                 "bf16 head gradient vs fp64 oracle")


# --------------------------------------------------------------------------------------
# Memory of a training step at a vocabulary of 32k
# --------------------------------------------------------------------------------------

class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor that an op returns (forward and
    backward), with the op's name."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), str(func)
        return out


LM_VOCAB, LM_TOKENS = 32_000, (4, 128)


def training_step(model, ids, labels):
    model.zero_grad(set_to_none=True)
    model(ids, labels=labels).loss.backward()


def test_training_step_at_vocab_32k_holds_no_n_by_v_tensor():
    ids, labels = batch(vocab=LM_VOCAB, size=LM_TOKENS)
    n_by_v = ids.numel() * LM_VOCAB
    reference = tiny_model("llama", vocab=LM_VOCAB, dtype=torch.float32)
    assert reference.lm_head.weight.numel() < n_by_v / 4
    with LargestTensor() as unpatched:
        training_step(reference, ids, labels)
    assert unpatched.numel >= n_by_v  # the detector sees the logits of the unpatched step
    patched = apply(reference)
    with LargestTensor() as fused:
        training_step(patched, ids, labels)
    assert fused.numel <= reference.lm_head.weight.numel(), (
        f"{fused.op} returned {fused.numel} elements (N x V = {n_by_v})")


@pytest.mark.skipif(not reset_peak_rss(), reason="needs /proc/self/clear_refs (Linux)")
def test_training_step_at_vocab_32k_peak_memory():
    """Peak resident memory of one training step beyond the memory before it (high-water mark
    reset), after a warm-up step: the fused step stays below one fp32 N x V matrix, the
    unpatched one needs several (logits, their log-softmax, their gradient)."""
    ids, labels = batch(vocab=LM_VOCAB, size=LM_TOKENS)
    n_by_v_bytes = ids.numel() * LM_VOCAB * 4

    def peak_extra(model):
        training_step(model, ids, labels)  # warm-up: lazy initialisations, the grads' storage
        gc.collect()
        assert reset_peak_rss()
        before = vmhwm_bytes()
        training_step(model, ids, labels)
        return vmhwm_bytes() - before

    model = tiny_model("llama", vocab=LM_VOCAB, dtype=torch.float32)
    fused = peak_extra(apply(model))  # first, so that no memory the unpatched step freed helps it
    unpatched = peak_extra(revert(model))
    assert fused < 0.5 * n_by_v_bytes, (fused, n_by_v_bytes)
    assert unpatched > 2 * n_by_v_bytes, (unpatched, n_by_v_bytes)


def test_supported_classes_exist_in_transformers():
    for name in SUPPORTED:
        assert hasattr(transformers, name), name

