"""The LCA front end: a sparse-coding layer whose code drives an energy-based network (the
RCNN here, ``LCA_CNN``; the residual network in ``rescnn``).

LCA encodes the image ``x`` (B, C, H, W) into sparse activations ``acts`` (B, F, H', W'), held
fixed like an input. The system's first layer ``s_0`` has the shape of ``acts`` and is coupled
to them by identity, then comes the body of the network (``P_CNN``'s convs and readout here,
the residual blocks of ``rescnn.ResCNN`` for ``LCA_ResCNN``)::

    Phi = <acts, s_0> + sum_k <P_k(conv_k(s_{k-1})), s_k> + ... - beta L
    s_0 <- sigma(acts + g * conv_1^T(P_1^T(s_1)))        (g = scale_feedback; g = 1 is dPhi/ds_0)

Everything else (dynamics, phases, EP estimate, training loops) is the engine's: this model only
adds the encoding (``prepare_input``, once per batch: an ``Encoding`` of the standardised images,
their code and its reconstruction error, which the engine uses as the fixed input of every phase
and hands back to ``after_update`` for the dictionary update and to ``batch_stats`` for the LCA
metrics).

Dictionary modes:
    pretrained: loaded from ``cifar_dictlearning.py``'s file (``records.load_model_dictionary``)
                and frozen;
    finetune:   loaded, then after every batch updated with the LCA rule on (acts, recon error)
                plus the same rule on ``acts* = T_lambda(s_0 at the nudged fixed point)``;
    learn:      the same updates from a random dictionary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from collectives import sum_over_ranks
from lca import LCAConv2D
from utils_ep_fast import P_CNN, Encoding, conv_output_size

DICT_MODES = ("pretrained", "finetune", "learn")


def lca_code_size(in_size: int, lca_ksize: int, lca_stride: int) -> int:
    """The code's height and width for ``in_size`` images: LCA pads ``same`` (``k // 2``)."""
    return conv_output_size(in_size, lca_ksize, lca_stride, lca_ksize // 2)


def check_front_end(dict_training: str, channels: list[int], lca_feats: int) -> None:
    """ValueError unless ``dict_training`` is a mode and the copy layer ``channels[0]`` has the
    code's ``lca_feats`` channels."""
    if dict_training not in DICT_MODES:
        raise ValueError(f"unknown dict_training {dict_training!r}; choose from {DICT_MODES}")
    if channels[0] != lca_feats:
        raise ValueError(
            f"the copy layer s_0 has the LCA code's channels: --channels must start with "
            f"--lca_feats ({lca_feats}), got {channels[0]}"
        )


class LCAFrontEnd:
    """The LCA front end of an ``EnergyNet`` whose layer 0 is the copy layer of the code (mixed
    in before the network class): the encoding, the dictionary updates and the LCA metrics.
    The network's constructor builds its body first, then calls ``attach_lca``."""

    def attach_lca(
        self, in_channels: int, lca_feats: int, lca_ksize: int, lca_stride: int,
        lca_lambda: float, lca_tau: float, lca_eta: float, lca_iters: int, dict_training: str,
    ) -> None:  # fmt: skip
        """The LCA layer (``same`` padding, non-negative soft threshold, inputs standardised per
        sample) and the copy of its starting dictionary (``initial_dictionary``)."""
        self.dict_training = dict_training
        self.lca = LCAConv2D(
            lca_feats, in_channels, kernel_size=lca_ksize, stride=lca_stride,
            lambda_=lca_lambda, tau=lca_tau, eta=lca_eta, lca_iters=lca_iters,
            pad="same", return_vars=["inputs", "acts", "recon_errors"],
        )  # fmt: skip
        # where the dictionary started: its drift is a metric of finetune/learn
        self.register_buffer("initial_dictionary", self.lca.weights.detach().clone())

    # ---- dictionary -----------------------------------------------------------------------

    def load_dictionary(self, weights: Tensor) -> None:
        """Start from the pretrained dictionary ``weights`` (F, C, k, k), as it is (no
        renormalisation); ``records.load_model_dictionary`` reads it from its file."""
        self.lca.assign_weight_values(weights.to(self.lca.weights), normalize=False)
        self.initial_dictionary.copy_(self.lca.weights.detach())

    def dictionary_cosine(self) -> float:
        """Mean cosine between each feature and where it started (1 = unmoved)."""
        now = self.lca.weights.detach().flatten(1)
        start = self.initial_dictionary.flatten(1)
        return torch.nn.functional.cosine_similarity(now, start, dim=1).mean().item()

    # ---- engine hooks ---------------------------------------------------------------------

    @torch.no_grad()
    def prepare_input(self, x: Tensor) -> Encoding:
        """Run LCA once on the images ``x`` (B, C, H, W): the standardised images, their code
        ``acts`` (B, F, H', W'), the system's fixed input, and ``images - D * acts``."""
        images, acts, recon_errors = self.lca(x)
        return Encoding(images=images, code=acts, recon_errors=recon_errors)

    def code_with_graph(self, x: Tensor) -> Tensor:
        """The LCA code (B, F, H', W') of ``x`` with an autograd graph back to ``x``: the LCA
        loop run with a graph (``LCAConv2D`` builds one, inputs included, only when asked)."""
        tracked = self.lca.req_grad
        self.lca.req_grad = True
        try:
            return self.lca(x)[1]
        finally:
            self.lca.req_grad = tracked

    @torch.no_grad()
    def after_update(self, encoding: Encoding, nudged: list[Tensor]) -> None:
        """finetune / learn: the LCA update on ``(acts, recon error)`` and on
        ``(acts*, images - recon(acts*))`` with ``acts* = T_lambda(s_0)`` of the ``nudged``
        states; both reconstruction errors are taken with the dictionary before either update
        (so both updates' batch sums are taken first, and summed over data-parallel ranks)."""
        if self.dict_training == "pretrained":
            return
        nudged_acts = self.lca.transfer(nudged[0])
        nudged_recons = self.lca.compute_recon(nudged_acts, self.lca.weights, encoding.images.shape)
        nudged_recon_errors = self.lca.compute_recon_error(encoding.images, nudged_recons)
        terms = [
            *self.lca.weight_update_terms(encoding.code, encoding.recon_errors),
            *self.lca.weight_update_terms(nudged_acts, nudged_recon_errors),
        ]
        # data-parallel: the batch sums of every process's part, i.e. those of the global batch
        correlation, times_active, nudged_correlation, nudged_times_active = sum_over_ranks(terms)
        self.lca.apply_weight_update(correlation, times_active)
        self.lca.apply_weight_update(nudged_correlation, nudged_times_active)

    def batch_stats(self, encoding: Encoding) -> dict[str, float]:
        """Fraction of non-zero LCA activations and the reconstruction error
        ``mean_batch 0.5 ||x - D * a||^2`` of ``encoding``; the dictionary's drift too."""
        stats = {
            "lca_frac_active": (encoding.code != 0).float().mean().item(),
            "lca_recon_error": 0.5 * encoding.recon_errors.pow(2).flatten(1).sum(1).mean().item(),
        }
        if self.dict_training != "pretrained":
            stats["dict_cosine"] = self.dictionary_cosine()
        return stats

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The standardised inputs and their LCA reconstructions, both (B, C, H, W)."""
        inputs, acts, _ = self.lca(x)
        return inputs, self.lca.compute_recon(acts, self.lca.weights, inputs.shape)


class LCA_CNN(LCAFrontEnd, P_CNN):
    """LCA front end + copy layer ``s_0`` + the convs and readout of ``P_CNN``.

    Args:
        in_size, in_channels: the image (e.g. 32 and 3 for CIFAR-10, 8 and 1 for digits).
        lca_feats, lca_ksize, lca_stride, lca_lambda, lca_tau, lca_eta, lca_iters: the LCA layer
            (``same`` padding, non-negative soft threshold, inputs standardised per sample).
        channels: ``[lca_feats, c_1, c_2, ...]``: the copy layer then the conv layers.
        kernels, strides, paddings: one per conv layer (``len(channels) - 1``).
        pools: one letter per layer of ``channels``; ``pools[0]`` (the copy layer) must be ``i``.
        scale_feedback: ``g``, the scale of the top-down feedback into ``s_0``.
        dict_training: ``pretrained``, ``finetune`` or ``learn``.
    """

    # fmt: off
    def __init__(
        self,
        in_size: int, in_channels: int,
        lca_feats: int, lca_ksize: int, lca_stride: int,
        lca_lambda: float, lca_tau: float, lca_eta: float, lca_iters: int,
        channels: list[int], kernels: list[int], strides: list[int], paddings: list[int],
        pools: str, fc: list[int],
        activation: str = "my_hard_sig", softmax: bool = False, loss: str = "mse",
        scale: float | None = None, scale_feedback: float = 1.0,
        dict_training: str = "pretrained",
    ) -> None:
        check_front_end(dict_training, channels, lca_feats)
        if not pools or pools[0] != "i":
            raise ValueError(
                f"pools[0] is the copy layer's coupling and must be 'i', got {pools!r}"
            )
        super().__init__(
            lca_code_size(in_size, lca_ksize, lca_stride), lca_feats, list(channels[1:]),
            kernels, strides, paddings, pools[1:], fc,
            activation=activation, softmax=softmax, loss=loss, scale=scale,
            input_copy=True, scale_feedback=scale_feedback,
        )
        self.attach_lca(
            in_channels, lca_feats, lca_ksize, lca_stride, lca_lambda, lca_tau, lca_eta,
            lca_iters, dict_training,
        )
        # fmt: on
