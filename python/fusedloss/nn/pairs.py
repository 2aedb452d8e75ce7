"""nn.Module of the pair family: CrossBatchMemory, a memory bank of past embeddings for the
pair losses of fusedloss.pairs."""
import torch

from ..pairs import MEMORY_BANK_LOSSES, gather_batch, memory_bank_loss, memory_bank_options


class CrossBatchMemory(torch.nn.Module):
    """A memory bank of past embeddings for the pair losses (Wang et al., "Cross-Batch Memory
    for Embedding Learning", CVPR 2020), as PML's ``CrossBatchMemory`` wrapping the loss and,
    for "multi_similarity" and "batch_hard_triplet", its miner.

    Holds a ring buffer of ``memory_size`` detached embeddings and their labels (registered
    buffers ``embedding_memory [memory_size, embedding_dim]`` and ``label_memory``; the write
    position and whether the ring has wrapped travel in the state dict). ``forward(embeddings,
    labels)`` first enqueues the batch (``len(embeddings) <= memory_size``), then returns the
    loss of the batch against the memory: its filled part until it has wrapped once, all of it
    after. A query is never paired with its own slot; as in PML, mining still sees that slot
    and only the loss drops it (for batch-hard, an anchor whose hardest positive is its own
    slot drops out). The gradient reaches the batch as queries only; the bank is detached.

    ``loss``: "multi_similarity" (:func:`fusedloss.multi_similarity_loss`, mining on by
    default), "supcon", "contrastive", "batch_hard_triplet" or "orthogonal_projection"
    (:func:`fusedloss.orthogonal_projection_loss`); ``loss_args`` are that function's keywords
    (``alpha``, ``epsilon``, ``mining``, ``temperature``, ``distance``, ``gamma``,
    ``absolute``, ``normalize``, ``backend``, ...), checked here as that function checks them.

    ``group`` (a torch.distributed process group; None: this process alone): each rank passes
    its own rows, every rank enqueues the gathered global batch (rank order), so that every
    rank's bank is the same, and the loss is that of the global batch against the bank, the
    same on every rank, as the loss function's ``group`` computes it; ``ddp_grad_scale`` is
    that function's gradient convention (W times the exact gradient by default, for DDP's
    averaging). Bad input on any rank raises on every rank.
    """

    LOSSES = tuple(MEMORY_BANK_LOSSES)

    def __init__(self, embedding_dim: int, memory_size: int, loss: str = "multi_similarity", *,
                 group=None, ddp_grad_scale: bool = True, device=None, dtype=None, **loss_args):
        super().__init__()
        self.options = memory_bank_options("CrossBatchMemory", loss, loss_args)  # every keyword
        if embedding_dim < 1 or memory_size < 1:
            raise ValueError(f"CrossBatchMemory: embedding_dim and memory_size must be >= 1, got "
                             f"{embedding_dim} and {memory_size}")
        if not isinstance(ddp_grad_scale, bool):
            raise TypeError(f"CrossBatchMemory: ddp_grad_scale must be a bool, got "
                            f"{type(ddp_grad_scale).__name__}")
        self.group, self.ddp_grad_scale = group, ddp_grad_scale
        self.loss = loss
        self.loss_args = loss_args
        self.memory_size = memory_size
        self.register_buffer("embedding_memory",
                             torch.zeros(memory_size, embedding_dim, device=device, dtype=dtype))
        self.register_buffer("label_memory",
                             torch.zeros(memory_size, dtype=torch.long, device=device))
        self.queue_idx = 0
        self.has_been_filled = False

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            self._check_batch(embeddings, labels)
            start = self.enqueue(embeddings, labels)
        else:
            every, every_labels = gather_batch("CrossBatchMemory", embeddings, labels, self.group,
                                               lambda: self._check_batch(embeddings, labels))
            self._check_fits(every.shape[0], "the global batch")
            start = self.enqueue(every, every_labels)
        filled = self.memory_size if self.has_been_filled else self.queue_idx
        return memory_bank_loss("CrossBatchMemory", self.loss, embeddings, labels,
                                self.embedding_memory[:filled], self.label_memory[:filled], start,
                                self.options, self.group, self.ddp_grad_scale)

    def _check_batch(self, embeddings, labels) -> None:
        if not torch.is_tensor(embeddings) or embeddings.dim() != 2 or \
                embeddings.shape[1] != self.embedding_memory.shape[1]:
            shape = tuple(embeddings.shape) if torch.is_tensor(embeddings) else embeddings
            raise ValueError(f"CrossBatchMemory: embeddings must have shape [B, "
                             f"{self.embedding_memory.shape[1]}], got {shape}")
        self._check_fits(embeddings.shape[0], "a batch")
        self._check_labels(embeddings, labels)

    def _check_fits(self, rows: int, what: str) -> None:
        if rows > self.memory_size:
            raise ValueError(f"CrossBatchMemory: {what} of {rows} does not fit in a memory of "
                             f"{self.memory_size}")

    @staticmethod
    def _check_labels(embeddings, labels) -> None:
        if not torch.is_tensor(labels) or labels.dim() != 1 or \
                labels.shape[0] != embeddings.shape[0]:
            shape = tuple(labels.shape) if torch.is_tensor(labels) else labels
            raise ValueError(f"CrossBatchMemory: labels must have shape [{embeddings.shape[0]}], "
                             f"got {shape}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"CrossBatchMemory: labels must hold integer class labels, got "
                            f"{labels.dtype}")

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> int:
        """Write the batch at the ring's position; returns the slot of its first row."""
        self._check_labels(embeddings, labels)
        if self.embedding_memory.dtype != embeddings.dtype or \
                self.embedding_memory.device != embeddings.device:
            self.embedding_memory = self.embedding_memory.to(embeddings.device, embeddings.dtype)
            self.label_memory = self.label_memory.to(embeddings.device)
        start, size = self.queue_idx, embeddings.shape[0]
        slots = torch.arange(start, start + size, device=embeddings.device) % self.memory_size
        self.embedding_memory[slots] = embeddings.detach()
        self.label_memory[slots] = labels.to(torch.long)
        self.queue_idx = (start + size) % self.memory_size
        self.has_been_filled = self.has_been_filled or self.queue_idx <= start
        return start

    def reset_queue(self) -> None:
        self.embedding_memory.zero_()
        self.label_memory.zero_()
        self.queue_idx = 0
        self.has_been_filled = False

    def get_extra_state(self):
        return {"queue_idx": self.queue_idx, "has_been_filled": self.has_been_filled}

    def set_extra_state(self, state) -> None:
        self.queue_idx = int(state["queue_idx"])
        self.has_been_filled = bool(state["has_been_filled"])

    def extra_repr(self) -> str:
        d = self.embedding_memory.shape[1]
        args = "".join(f", {k}={v!r}" for k, v in self.loss_args.items())
        return f"embedding_dim={d}, memory_size={self.memory_size}, loss={self.loss!r}{args}"
