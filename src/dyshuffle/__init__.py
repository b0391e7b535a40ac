"""dyshuffle: Dynamic Shuffle channel mixing for efficient CNNs.

Reference implementation of Gong et al., "Dynamic Shuffle: An Efficient Channel Mixture Method",
arXiv 2310.02776.
"""

__version__ = "0.1.0"

from .layers import (  # noqa: E402
    ChannelShuffle,
    DynamicShuffle,
    LearnedShuffle,
    StaticDynamicShuffle,
    channel_shuffle,
    orthogonal_loss,
    permutation_mode,
)

__all__ = [
    "ChannelShuffle",
    "DynamicShuffle",
    "LearnedShuffle",
    "StaticDynamicShuffle",
    "__version__",
    "channel_shuffle",
    "orthogonal_loss",
    "permutation_mode",
]
