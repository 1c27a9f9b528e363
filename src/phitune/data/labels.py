"""The label convention every part of phitune shares (data, loss, trainer)."""

IGNORE_INDEX = -100
"""The label of a token that carries no loss: PyTorch's ``cross_entropy`` default and Hugging Face's convention."""
