"""Small helpers the tests use to compare tensors."""

from torch import Tensor


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two tensors seen as flat vectors."""
    return (a.flatten() @ b.flatten() / (a.norm() * b.norm()).clamp_min(1e-30)).item()
