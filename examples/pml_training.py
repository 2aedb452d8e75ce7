"""A pytorch-metric-learning training loop with fusedloss's drop-ins: the loop is PML's own,
only the import changes.

    python examples/pml_training.py                # Multi-Similarity miner + loss
    python examples/pml_training.py --memory 2048  # the same inside a CrossBatchMemory bank
    python examples/pml_training.py --compare      # also train with PML's classes; same curve
    python examples/pml_training.py --smoke        # short, for CI (implies --compare)

The model embeds 64-dimensional vectors drawn around class centres (``--data synthetic``) or
scikit-learn's 8 x 8 digits (``--data digits``), trained with ``MultiSimilarityMiner`` +
``MultiSimilarityLoss``; precision@1 of held-out samples against the training set
(nearest neighbour by cosine similarity) is printed at the end. With ``--compare`` the same
run is repeated with PML's classes from the same initial weights and data order: both loss
curves are printed with their time per step, and the run fails if they differ.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from fusedloss.pml import losses, miners  # was: from pytorch_metric_learning import losses, miners


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("synthetic", "digits"), default="synthetic")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=128, help="embedding dimension")
    p.add_argument("--memory", type=int, default=0, help="CrossBatchMemory size (0: none)")
    p.add_argument("--compare", action="store_true", help="also train with PML's own classes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.classes, args.steps, args.batch, args.dim, args.compare = 32, 20, 64, 32, True
    return args


def synthetic(classes, per_class, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 64, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + 1.2 * torch.randn(len(labels), 64, generator=g), labels


def digits():
    from sklearn.datasets import load_digits  # the "digits" data needs scikit-learn

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 8.0 - 1.0, torch.tensor(data.target)


def precision_at_1(query, query_labels, ref, ref_labels):
    similarity = F.normalize(query, dim=1) @ F.normalize(ref, dim=1).T
    return float((ref_labels[similarity.argmax(1)] == query_labels).float().mean())


def train(args, loss_module, miner_module, x, y):
    """PML's usual loop: embed, mine, loss, step. Returns (losses, seconds per step, model)."""
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, args.dim))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_func = loss_module.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
    miner = miner_module.MultiSimilarityMiner(epsilon=0.1)
    if args.memory:  # the batch against a bank of past embeddings; the miner runs inside it
        loss_func = loss_module.CrossBatchMemory(loss_func, args.dim, memory_size=args.memory,
                                                 miner=miner)
    order = torch.Generator().manual_seed(args.seed)
    history, seconds = [], 0.0
    for _ in range(args.steps):
        batch = torch.randint(0, len(y), (args.batch,), generator=order)
        embeddings, labels = model(x[batch]), y[batch]
        start = time.perf_counter()
        if args.memory:
            loss = loss_func(embeddings, labels)
        else:
            loss = loss_func(embeddings, labels, miner(embeddings, labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        seconds += time.perf_counter() - start
        optimizer.step()
        history.append(loss.item())
    return history, seconds / args.steps, model


def main():
    args = parse_args()
    if args.data == "digits":
        x, y = digits()
    else:
        x, y = synthetic(args.classes, 20, args.seed)
    held_out = torch.arange(len(y)) % 5 == 0
    train_x, train_y, test_x, test_y = x[~held_out], y[~held_out], x[held_out], y[held_out]

    runs = {"fusedloss.pml": (losses, miners)}
    if args.compare:
        runs["pytorch_metric_learning"] = (pml_losses, pml_miners)
    results = {}
    for name, (loss_module, miner_module) in runs.items():
        history, per_step, model = train(args, loss_module, miner_module, train_x, train_y)
        with torch.no_grad():
            p1 = precision_at_1(model(test_x), test_y, model(train_x), train_y)
        results[name] = history
        print(f"{name:24s} loss {history[0]:.4f} -> {history[-1]:.4f}, loss + backward "
              f"{1e3 * per_step:.1f} ms/step, held-out precision@1 {p1:.3f}")
    if args.compare:
        ours, theirs = (torch.tensor(h) for h in results.values())
        gap = float((ours - theirs).abs().max())
        print(f"largest difference between the two loss curves: {gap:.2e}")
        if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4):
            raise SystemExit("the loss curves of fusedloss.pml and PML differ")
    if args.smoke and not results["fusedloss.pml"][-1] < results["fusedloss.pml"][0]:
        raise SystemExit("smoke check failed: the loss did not fall")


if __name__ == "__main__":
    main()
