"""Channel mixers: fixed, dynamic, learned static and static-dynamic shuffles.

This package imports nothing else of ``dyshuffle``.
"""

from .dynamic import (
    Decision,
    DynamicShuffle,
    LearnedShuffle,
    balance_term,
    compact_index,
    kronecker_apply,
    orthogonal_loss,
    orthogonality,
    permutation_mode,
)
from .factory import create_mixer, get_mixer, list_mixers, mix_concat, register_mixer
from .permutation import (
    all_permutations,
    assignment_gap,
    choose_groups,
    closest_permutation,
    compose_index,
    invert_permutation,
    optimal_assignment,
    permutation_matrix,
    permute_channels,
)
from .sds import StaticDynamicShuffle
from .shuffle import ChannelShuffle, IdentityMixer, channel_shuffle

__all__ = [
    "ChannelShuffle",
    "Decision",
    "DynamicShuffle",
    "IdentityMixer",
    "LearnedShuffle",
    "StaticDynamicShuffle",
    "all_permutations",
    "assignment_gap",
    "balance_term",
    "channel_shuffle",
    "choose_groups",
    "closest_permutation",
    "compact_index",
    "compose_index",
    "create_mixer",
    "get_mixer",
    "invert_permutation",
    "kronecker_apply",
    "list_mixers",
    "mix_concat",
    "optimal_assignment",
    "orthogonal_loss",
    "orthogonality",
    "permutation_matrix",
    "permutation_mode",
    "permute_channels",
    "register_mixer",
]
