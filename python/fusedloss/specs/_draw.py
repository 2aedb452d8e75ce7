"""What the fuzz strategies of the specs draw from: sizes around the kernels' blocks, dtypes,
targets with ignored rows, strided layouts. `data` is hypothesis' `st.data()` object;
hypothesis itself is imported when a strategy runs, never when a spec is imported."""
import torch

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Sizes around the blocks of the kernels: CPU chunks of 2048, Triton blocks of 128 under the
# interpreter (4096 on GPU), the fused linear tiles of 16..128, plus 1 and primes.
SMALL_SIZES = [1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 127, 128, 129]
CLASS_SIZES = SMALL_SIZES + [255, 256, 257, 2047, 2048, 2049]


def st():
    from hypothesis import strategies
    return strategies


def pick(data, options, label=None):
    return data.draw(st().sampled_from(list(options)), label=label)


def flag(data) -> bool:
    return data.draw(st().booleans())


def generator(data) -> torch.Generator:
    """The source of every tensor value of a case, seeded from hypothesis' data so that a
    failing case replays exactly."""
    return torch.Generator().manual_seed(data.draw(st().integers(0, 2**31 - 1), label="seed"))


def strided(t: torch.Tensor, transpose: bool) -> torch.Tensor:
    """t itself, or the same values in a column-major (non-contiguous) layout."""
    return t.t().contiguous().t() if transpose else t


def targets(data, n, c, ignore_index=-100):
    """n class indices in [0, c), each ignored or not as drawn."""
    s = st()
    target = torch.tensor(data.draw(s.lists(s.integers(0, c - 1), min_size=n, max_size=n)),
                          dtype=torch.long)
    ignored = data.draw(s.lists(s.booleans(), min_size=n, max_size=n))
    target[torch.tensor(ignored, dtype=torch.bool)] = ignore_index
    return target


def labels(data, n, num_classes):
    s = st()
    return torch.tensor(data.draw(s.lists(s.integers(0, num_classes - 1), min_size=n,
                                          max_size=n)), dtype=torch.long)
