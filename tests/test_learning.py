"""EP learns real data: scikit-learn's bundled handwritten digits, offline, on the CPU."""

import torch

import data_utils
from utils_ep_fast import P_CNN, EPConfig, make_optimizer, train

EPOCHS = 8


def digits_loaders(seed: int = 0):
    train_set, test_set = data_utils.build_datasets("DIGITS", download=False)
    return (
        data_utils.make_loader(train_set, 16, shuffle=True, seed=seed),
        data_utils.make_loader(test_set, 200, shuffle=False),
    )


def test_symmetric_ep_with_softmax_readout_learns_digits():
    """8x8x1 -> conv 16@3x3 + maxpool -> conv 32@3x3 + maxpool -> softmax readout 10;
    my_hard_sig, T1 = 20, T2 = 5, beta = 0.5 with a third phase, SGD momentum 0.9 with cosine
    decay over 8 epochs, batch 16."""
    torch.manual_seed(0)
    train_loader, test_loader = digits_loaders()
    model = P_CNN(
        8,
        1,
        [16, 32],
        [3, 3],
        [1, 1],
        [1, 1],
        "mm",
        [10],
        activation="my_hard_sig",
        softmax=True,
        loss="cel",
    )
    optimizer = make_optimizer(model, "sgd", [0.1, 0.05, 0.02], mmt=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    cfg = EPConfig(alg="EP", T1=20, T2=5, betas=(0.0, 0.5), thirdphase=True)
    history = train(model, optimizer, train_loader, test_loader, cfg, EPOCHS, scheduler=scheduler)
    assert history[-1]["test_acc"] >= 0.93, [round(m["test_acc"], 3) for m in history]
