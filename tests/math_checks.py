"""What several test files share: small model configurations and batches, seeded builders
and the tensor comparisons (test files import from here, never from each other)."""

import torch
from torch import Tensor

from experiment import data_loading
from utils_ep_fast import P_CNN, P_MLP


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two tensors seen as flat vectors."""
    return (a.flatten() @ b.flatten() / (a.norm() * b.norm()).clamp_min(1e-30)).item()


def cnn(in_size, in_channels, channels, kernels, strides, paddings, pools, fc, **options):
    """P_CNN keyword arguments, one list per layer kind."""
    layers = dict(channels=channels, kernels=kernels, strides=strides, paddings=paddings)
    return dict(in_size=in_size, in_channels=in_channels, pools=pools, fc=fc, **layers, **options)


# (description, constructor kwargs, input shape per sample)
# fmt: off
ARCHITECTURES = [
    ("1 conv max-pool, softmax readout",
     cnn(8, 1, [4], [3], [1], [1], "m", [10], softmax=True, loss="cel"), (1, 8, 8)),
    ("2 convs avg+max on odd 9x9, kernel 5 pad 2, extra fc, mse output units",
     cnn(9, 2, [3, 5], [3, 5], [1, 1], [1, 2], "am", [7, 10], loss="mse", activation="mysig"),
     (2, 9, 9)),
    ("3 convs identity/avg/max, paddings 0/1/2, cel output units",
     cnn(10, 1, [3, 4, 5], [3] * 3, [1] * 3, [0, 1, 2], "iam", [10], loss="cel",
         activation="tanh"), (1, 10, 10)),
    ("4 convs, 2 fc, softmax",
     cnn(16, 3, [2, 3, 4, 5], [3] * 4, [1] * 4, [1] * 4, "mmaa", [6, 10], softmax=True,
         loss="cel", activation="hard_sigmoid"), (3, 16, 16)),
    ("strided conv on an odd map",
     cnn(9, 2, [3], [3], [2], [1], "i", [10], softmax=True, loss="cel",
         activation="ctrd_hard_sig"), (2, 9, 9)),
    ("kernel 5 without padding, mse with sigmoid",
     cnn(11, 1, [4], [5], [1], [0], "m", [10], loss="mse", activation="sigmoid"), (1, 11, 11)),
]
# fmt: on
MLPS = [
    ("MLP mse", dict(archi=[20, 15, 10], loss="mse", activation="my_hard_sig"), (20,)),
    ("MLP softmax", dict(archi=[20, 15, 12, 10], softmax=True, loss="cel"), (20,)),
]


def build(kwargs: dict) -> P_CNN:
    torch.manual_seed(0)
    model = P_MLP(**kwargs) if "archi" in kwargs else P_CNN(**kwargs)
    return model.double()


def random_case(model, input_shape, batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, *input_shape), generator=generator, dtype=torch.float64)
    y = torch.randint(0, model.num_classes, (batch,), generator=generator)
    neurons = [
        torch.rand((batch, *link.shape), generator=generator, dtype=torch.float64) * 1.5 - 0.25
        for link in model.links
    ]
    return x, y, neurons


def converged_case():
    """A small CNN whose free phase converges (small weights: a contraction), float64."""
    torch.manual_seed(3)
    model = P_CNN(
        in_size=6,
        in_channels=1,
        channels=[4],
        kernels=[3],
        strides=[1],
        paddings=[1],
        pools="m",
        fc=[8, 5],
        activation="my_hard_sig",
        softmax=True,
        loss="cel",
        scale=0.6,
    ).double()
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    return model, x, y


# fmt: off
LCA_SMALL = dict(
    in_size=8, in_channels=1,
    lca_feats=4, lca_ksize=3, lca_stride=1, lca_lambda=0.1, lca_tau=10, lca_eta=0.05, lca_iters=20,
    channels=[4, 6, 8], kernels=[3, 3], strides=[1, 1], paddings=[1, 1], pools="imm", fc=[10],
    activation="my_hard_sig", softmax=True, loss="cel",
)
# fmt: on


RCNN = dict(
    in_size=8,
    in_channels=1,
    channels=[3, 4],
    kernels=[3, 3],
    strides=[1, 1],
    paddings=[1, 1],
    pools="ma",
    fc=[10],
    activation="mysig",
    softmax=True,
    loss="cel",
)


def digit_like_batch(n: int = 5, seed: int = 0):
    """``n`` random 8x8 one-channel images in [0, 1) and labels ``0, 1, .., 9, 0, ..``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=generator), torch.arange(n) % 10


def digits_loaders(seed: int = 0):
    """The digits training loader (batch 16, shuffled with ``seed``) and test loader (200)."""
    train_set, test_set = data_loading.build_datasets("DIGITS", download=False)
    return (
        data_loading.make_loader(train_set, 16, shuffle=True, seed=seed),
        data_loading.make_loader(test_set, 200, shuffle=False),
    )
