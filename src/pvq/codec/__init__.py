"""Pure-math PVQ codec (numpy/numba, no torch).

Counts N(D, K), pulses for a bit budget, shape search onto the pyramid, Fischer's
enumeration (batched, multi-limb), bit packing, gain quantizers, and the scalar / E8
baselines used to judge them.
"""

from .counts import code_bits, count_table, cumulative_table, pulses_for_bits, pyramid_count, word_tables
from .enumeration import decode, decode_reference, encode, encode_reference, ints_to_words, words_to_ints
from .errors import CodecError
from .gain import (
    BetaGainQuantizer,
    beta_gain_density,
    beta_gain_parameters,
    empirical_gain_codebook,
    nearest_level,
    normalised_group_gains,
)
from .packing import pack_codes, packed_size, unpack_codes
from .search import brute_force_search, search
from .split import split_decode, split_decode_reference, split_encode, split_encode_reference, split_supported

__all__ = [
    "BetaGainQuantizer",
    "CodecError",
    "beta_gain_density",
    "beta_gain_parameters",
    "brute_force_search",
    "code_bits",
    "count_table",
    "cumulative_table",
    "decode",
    "decode_reference",
    "encode",
    "empirical_gain_codebook",
    "encode_reference",
    "ints_to_words",
    "nearest_level",
    "normalised_group_gains",
    "pack_codes",
    "packed_size",
    "pulses_for_bits",
    "pyramid_count",
    "search",
    "split_decode",
    "split_decode_reference",
    "split_encode",
    "split_encode_reference",
    "split_supported",
    "unpack_codes",
    "word_tables",
    "words_to_ints",
]
