"""A Hugging Face causal LM fine-tuned with fusedloss's loss patch: one line changes.

    python examples/hf_causal_lm.py                   # tiny random Llama, vocabulary 32k
    python examples/hf_causal_lm.py --model gpt2      # or qwen2, mistral, gemma2
    python examples/hf_causal_lm.py --smoke           # short, for CI

The model is built from a config here (random weights, no download) and fine-tuned with
AdamW on a synthetic language of 512 of the vocabulary's tokens, in which the next token
follows from the current one by a fixed random permutation (with some noise), so that the
loss visibly falls (from about log V as the model learns which tokens occur, then towards
the noise's entropy as it learns the permutation). The same run is made
twice from the same initial weights and batches: with ``fusedloss.integrations.transformers
.apply(model)`` (the loss from the final hidden states, no logits) and with the model as HF
ships it. Both loss curves are printed, with the time per step and the peak memory of one
training step (CPU: the resident set's high-water mark beyond the memory before the step;
CUDA: ``max_memory_allocated``); the run fails if the curves differ.
"""
import argparse
import copy
import gc
import time

import torch
import transformers

from fusedloss.bench.memory import reset_peak_rss, vmhwm_bytes
from fusedloss.integrations.transformers import apply

MiB = 1 << 20


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("llama", "qwen2", "mistral", "gemma2", "gpt2"),
                   default="llama")
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.hidden, args.batch, args.seq, args.steps = 64, 4, 128, 5
    return args


def config(args):
    decoder = dict(vocab_size=args.vocab, hidden_size=args.hidden,
                   intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=args.hidden // 4,
                   max_position_embeddings=args.seq)
    if args.model == "gpt2":
        return transformers.GPT2Config(vocab_size=args.vocab, n_embd=args.hidden,
                                       n_layer=args.layers, n_head=4, n_positions=args.seq)
    return {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
            "mistral": transformers.MistralConfig, "gemma2": transformers.Gemma2Config,
            }[args.model](**decoder)


def batches(args, words=512):
    """Token sequences of a synthetic language over `words` tokens of the vocabulary: token t
    is followed by perm[t], or by a random one of them one time in ten. Labels are the inputs
    (the model shifts them); the first 8 positions of each sequence are a prompt that does
    not count (-100)."""
    g = torch.Generator().manual_seed(args.seed)
    words = min(words, args.vocab)
    perm = torch.randperm(words, generator=g)
    out = []
    for _ in range(args.steps):
        ids = torch.empty(args.batch, args.seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, words, (args.batch,), generator=g)
        for t in range(1, args.seq):
            noise = torch.rand(args.batch, generator=g) < 0.1
            ids[:, t] = torch.where(noise, torch.randint(0, words, (args.batch,), generator=g),
                                    perm[ids[:, t - 1]])
        labels = ids.clone()
        labels[:, :8] = -100
        out.append((ids, labels))
    return out


def peak_memory_of(step, device):
    """Peak memory of one call of `step` beyond the memory held before it, in bytes."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not reset_peak_rss():
        step()
        return None  # no /proc/self/clear_refs: no per-step peak on this system
    before = vmhwm_bytes()
    step()
    return vmhwm_bytes() - before


def train(model, data, args):
    """AdamW (gradients clipped at norm 1) over `data`; returns the losses, the median seconds per step and the peak memory
    of the second step (the first allocates the optimizer's state)."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses, times, peak = [], [], None

    def step(ids, labels):
        t0 = time.perf_counter()
        loss = model(ids.to(args.device), labels=labels.to(args.device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - t0)

    for i, (ids, labels) in enumerate(data):
        if i == 1:
            peak = peak_memory_of(lambda: step(ids, labels), args.device)
        else:
            step(ids, labels)
    return losses, sorted(times)[len(times) // 2], peak


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    initial = transformers.AutoModelForCausalLM.from_config(config(args)).to(args.device).train()
    data = batches(args)
    n_by_v = args.batch * args.seq * args.vocab * 4
    print(f"{type(initial).__name__}: vocabulary {args.vocab:,}, hidden {args.hidden}, "
          f"{args.layers} layers, {args.batch} x {args.seq} tokens per step, {args.device}; "
          f"one fp32 N x V logits matrix = {n_by_v / MiB:.0f} MiB")
    # The fused run first, so that memory the unpatched run frees cannot flatter it.
    runs = {"fusedloss": train(apply(copy.deepcopy(initial)), data, args),
            "HF as shipped": train(copy.deepcopy(initial), data, args)}
    print("step  " + "  ".join(f"{name:>14}" for name in runs))
    for i in range(args.steps):
        print(f"{i:4d}  " + "  ".join(f"{r[0][i]:14.4f}" for r in runs.values()))
    for name, (_, seconds, peak) in runs.items():
        memory = "n/a" if peak is None else f"{peak / MiB:,.0f} MiB"
        print(f"{name:>14}: {seconds * 1e3:,.0f} ms per step, peak memory of a step {memory}")
    fused, plain = (torch.tensor(r[0]) for r in runs.values())
    if not torch.allclose(fused, plain, rtol=1e-3, atol=1e-3):
        raise SystemExit(f"the loss curves differ: {fused.tolist()} vs {plain.tolist()}")
    if fused[-1] >= fused[0]:
        raise SystemExit(f"the loss did not fall: {fused[0]:.4f} -> {fused[-1]:.4f}")
    print("same loss curve with and without the patch")


if __name__ == "__main__":
    main()
