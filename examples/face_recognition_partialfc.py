"""Face recognition with PartialFC: a small CNN trained with a margin softmax head whose classes
are split across the ranks of a process group, then checked on identities it never saw.

    python examples/face_recognition_partialfc.py --smoke                 # one process
    torchrun --standalone --nproc-per-node 2 examples/face_recognition_partialfc.py
    torchrun --nnodes 2 --nproc-per-node 8 ... examples/face_recognition_partialfc.py --data digits

Under torchrun each rank joins the default process group (NCCL when GPUs exist, else gloo on
the CPU), holds 1/W of the classifier (``fusedloss.nn.PartialFC``: its ``weight`` shard) and a
DistributedDataParallel copy of the backbone, and feeds its own slice of every batch. The
head samples ``--sample-rate`` of its classes per step (every positive plus random
negatives), as insightface's PartialFC does; the backbone's gradients are averaged by DDP and
the head's embedding gradient is scaled to match (``ddp_grad_scale=True``).

``--head insightface`` builds the same CosFace head as an arcface_torch script does, with
``fusedloss.insightface``'s ``CombinedMarginLoss`` and ``PartialFC_V2``.

Data: ``synthetic`` (default) draws identities as random smooth 16 x 16 "faces" and samples
as shifted, noisy, contrast-jittered views of them; ``digits`` uses scikit-learn's 8 x 8
handwritten digits (pip install scikit-learn), identities being the ten digits. Either way a
quarter of the identities is held out: verification accuracy is measured on pairs of
held-out samples (same identity or not) by thresholding the cosine similarity of their
embeddings, the threshold chosen on half of the pairs and the accuracy reported on the
other half, as face verification benchmarks (LFW) do.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedloss
from fusedloss.insightface import CombinedMarginLoss, PartialFC_V2


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("synthetic", "digits"), default="synthetic")
    p.add_argument("--identities", type=int, default=400, help="synthetic identities in all")
    p.add_argument("--samples", type=int, default=24, help="synthetic samples per identity")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128, help="global batch (all ranks)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension")
    p.add_argument("--sample-rate", type=float, default=0.5)
    p.add_argument("--head", choices=("partialfc", "insightface"), default="partialfc",
                   help="fusedloss.nn.PartialFC, or fusedloss.insightface.PartialFC_V2 as an "
                        "arcface_torch script builds it (the same CosFace head)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="a short run for CI: fails unless the loss falls and the verification "
                        "accuracy beats chance")
    args = p.parse_args()
    if args.smoke:
        args.identities, args.samples, args.steps, args.batch = 120, 12, 80, 64
    return args


def synthetic_faces(identities, samples, seed):
    """(images [identities * samples, 1, 16, 16], labels): a smooth random template per
    identity, each sample shifted by up to 2 pixels, contrast-jittered and noisy."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(identities, 1, 6, 6, generator=g)
    templates = F.interpolate(coarse, size=(20, 20), mode="bicubic", align_corners=False)
    labels = torch.arange(identities).repeat_interleave(samples)
    shifts = torch.randint(0, 5, (len(labels), 2), generator=g)
    rows = shifts[:, :1, None] + torch.arange(16)[None, :, None]
    cols = shifts[:, 1:, None] + torch.arange(16)[None, None, :]
    images = templates[labels, 0][torch.arange(len(labels))[:, None, None], rows, cols]
    contrast = 1 + 0.2 * torch.randn(len(labels), 1, 1, generator=g)
    images = contrast * images + 0.35 * torch.randn(images.shape, generator=g)
    return images[:, None], labels


def digits():
    from sklearn.datasets import load_digits  # the "digits" data needs scikit-learn

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return images, torch.tensor(data.target)


def backbone(dim, image_size):
    """Two conv blocks and a linear embedding, BatchNorm at the end (insightface's "features")."""
    flat = 32 * (image_size // 4) ** 2
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(flat, dim), torch.nn.BatchNorm1d(dim))


def verification_accuracy(embeddings, labels, pairs=4000, seed=0):
    """Half of `pairs` random pairs (half same identity, half not) choose the threshold on the
    cosine similarity; the accuracy is that of the other half."""
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(embeddings, dim=1)
    n = len(labels)
    first = torch.randint(0, n, (pairs,), generator=g)
    same = torch.arange(pairs) % 2 == 0
    second = torch.randint(0, n, (pairs,), generator=g)
    for _ in range(20):  # redraw until each pair is of its kind (and not a sample with itself)
        match = labels[second] == labels[first]
        bad = (match != same) | (second == first)
        if not bad.any():
            break
        second[bad] = torch.randint(0, n, (int(bad.sum()),), generator=g)
    keep = (labels[second] == labels[first]) == same
    keep &= second != first
    score = (e[first] * e[second]).sum(1)[keep]
    same = same[keep]
    half = len(score) // 2
    candidates = score[:half].sort().values
    fit = [((score[:half] > t) == same[:half]).float().mean() for t in candidates]
    threshold = candidates[int(torch.stack(fit).argmax())]
    return float(((score[half:] > threshold) == same[half:]).float().mean())


def main():
    args = parse_args()
    distributed = "RANK" in os.environ  # launched by torchrun
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        rank, world = 0, 1
    device = torch.device("cuda") if cuda else torch.device("cpu")
    torch.set_num_threads(1 if args.smoke else max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(args.seed)

    # every rank builds the same data, then the identities are split: 3/4 train, 1/4 held out
    if args.data == "digits":
        images, labels = digits()
    else:
        images, labels = synthetic_faces(args.identities, args.samples, args.seed)
    num_ids = int(labels.max()) + 1
    held_out = labels >= num_ids - max(1, num_ids // 4)
    train_x, train_y = images[~held_out], labels[~held_out]
    test_x, test_y = images[held_out], labels[held_out]
    num_classes = int(train_y.max()) + 1

    net = backbone(args.dim, images.shape[-1]).to(device)
    model = torch.nn.parallel.DistributedDataParallel(net) if distributed else net
    sampling = torch.Generator(device).manual_seed(rank)
    if args.head == "insightface":  # arcface_torch's two lines; margin_list (1.0, 0.0, 0.4)
        margin_loss = CombinedMarginLoss(32, 1.0, 0.0, 0.4)
        head = PartialFC_V2(margin_loss, args.dim, num_classes, args.sample_rate,
                            sample_generator=sampling, device=device)
    else:
        head = fusedloss.nn.PartialFC(args.dim, num_classes, sample_rate=args.sample_rate,
                                      loss="cosface", scale=32.0, device=device,
                                      sample_generator=sampling)
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=args.lr,
                                momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    if rank == 0:
        backend = ("nccl" if cuda else "gloo") if distributed else "no process group"
        first, last = head.class_start, head.class_start + head.weight.shape[0]
        print(f"{args.data}: {num_classes} training identities ({len(train_y)} samples), "
              f"{int(test_y.unique().numel())} held out ({len(test_y)} samples); world size "
              f"{world} ({backend}), rank 0 holds classes [{first}, {last})")

    order = torch.Generator().manual_seed(args.seed)
    local = args.batch // world
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        batch = torch.randint(0, len(train_y), (args.batch,), generator=order)  # same on every rank
        mine = batch[rank * local:(rank + 1) * local]
        loss = head(model(train_x[mine].to(device)), train_y[mine].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:8.4f}  ({time.perf_counter() - start:.1f} s)")

    net.eval()
    with torch.no_grad():
        embeddings = net(test_x.to(device)).cpu()
    accuracy = verification_accuracy(embeddings, test_y)
    failed = False
    if rank == 0:
        print(f"verification accuracy on held-out identities: {accuracy:.3f} (chance 0.5)")
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        if args.smoke and not (last < first and accuracy > 0.6):
            print(f"smoke check failed: loss {first:.3f} -> {last:.3f}, accuracy {accuracy:.3f}")
            failed = True
    if distributed:
        dist.destroy_process_group()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
