"""EP learns real data: scikit-learn's bundled handwritten digits, offline, on the CPU."""

import pytest
import torch
from math_checks import digits_loaders

from experiment import data_loading
from utils_ep_fast import EP, P_CNN, EPConfig, Schedule, make_optimizer, train

pytestmark = pytest.mark.slow  # training runs of several epochs to an accuracy

EPOCHS = 10


def test_symmetric_ep_with_softmax_readout_learns_digits():
    """8x8x1 -> conv 16@3x3 + maxpool -> conv 32@3x3 + maxpool -> softmax readout 10;
    my_hard_sig, T1 = 20, T2 = 5, beta = 0.5 with a third phase, SGD momentum 0.9 with cosine
    decay over 10 epochs, batch 16."""
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
    optimizer = make_optimizer(model, "sgd", [0.2, 0.1, 0.05], mmt=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    rule = EP(EPConfig(alg="EP", T1=20, T2=5, betas=(0.0, 0.5), thirdphase=True))
    loaders = train_loader, test_loader
    history = train(model, optimizer, loaders, rule, Schedule(EPOCHS, scheduler=scheduler))
    assert history[-1]["test_acc"] >= 0.93, [round(m["test_acc"], 3) for m in history]


def test_lca_front_end_with_pretrained_dictionary_learns_digits(tmp_path):
    """Dictionary: 16 features 3x3 stride 1, lambda 0.1, tau 10, 50 iterations, 2 epochs on 30% of
    the training images. LCACNN: code 16@8x8 -> copy layer -> conv 32@3x3 + maxpool -> softmax
    readout; feedback scale 0.01; EP on the other 70% as in the seed's pretrained runs."""
    import cifar_dictlearning
    from experiment.records import ep_training_indices, load_model_dictionary
    from lca_utils_ep_fast import LCA_CNN

    cifar_dictlearning.main(
        ["--task", "DIGITS", "--features", "16", "--kernel-size", "3", "--stride", "1",
         "--epochs", "2", "--lca-iters", "50", "--tau", "10", "--batch-size", "100",
         "--subset-fraction", "0.3", "--lambda", "0.1", "--lambda-every", "0",
         "--out-dir", str(tmp_path)]
    )  # fmt: skip
    dict_path = tmp_path / "dictionary.pt"
    train_set, test_set = data_loading.build_datasets("DIGITS", download=False)
    ep_indices = ep_training_indices(len(train_set), dict_path)
    assert len(ep_indices) == len(train_set) - round(0.3 * len(train_set))
    train_loader = data_loading.make_loader(train_set, 32, shuffle=True, seed=0, indices=ep_indices)
    test_loader = data_loading.make_loader(test_set, 200, shuffle=False)

    torch.manual_seed(0)
    model = LCA_CNN(
        8,
        1,
        16,
        3,
        1,
        0.1,
        10,
        0.01,
        50,
        [16, 32],
        [3],
        [1],
        [1],
        "im",
        [10],
        softmax=True,
        loss="cel",
        scale_feedback=0.01,
        dict_training="pretrained",
    )
    load_model_dictionary(model, dict_path)
    optimizer = make_optimizer(model, "sgd", [0.2, 0.05], mmt=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
    rule = EP(EPConfig(alg="EP", T1=20, T2=5, betas=(0.0, 0.5), thirdphase=True))
    loaders = train_loader, test_loader
    history = train(model, optimizer, loaders, rule, Schedule(EPOCHS, scheduler=scheduler))
    assert history[-1]["test_acc"] >= 0.90, [round(m["test_acc"], 3) for m in history]
    assert 0.0 < history[-1]["lca_frac_active"] < 0.5
