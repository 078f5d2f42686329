"""Sign bits packed 8 per byte (uint8), least significant bit first."""

from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor

_GATHER = 0x0102040810204080


def packed_size(numel: int) -> int:
    """Bytes holding `numel` sign bits: ceil(numel / 8), no header."""
    return (numel + 7) // 8


def pack_signs(x: Tensor) -> Tensor:
    """Bit i of byte j is set when x[8j + i] >= 0, so zeros (and -0.0) count as positive.

    Padding bits of the last byte are set too (the padding reads as +0); `unpack_signs` drops them.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("pack_signs reads 8 bools as one int64 and needs a little-endian host")
    flat = x.reshape(-1)
    # flags as int8 0/1: a comparison writes int8 several times faster than bool on a CPU
    nonneg = torch.ones(8 * packed_size(flat.numel()), dtype=torch.int8, device=flat.device)
    torch.ge(flat, 0, out=nonneg[: flat.numel()])
    # Each int64 word holds 8 flags b_0..b_7 (0 or 1) in its bytes: b_i * 2^(8i). The product with
    # _GATHER = sum_j 2^(8j + 7 - j) puts b_i at bit 56 + i (the terms with i + j = 7), while every other
    # term lands below bit 56 without carries (distinct bits per byte) or wraps past bit 63.
    words = nonneg.view(torch.int64)
    return ((words * _GATHER) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def unpack_signs(packed: Tensor, numel: int) -> Tensor:
    """float32 +1/-1 for each of the first `numel` bits of `packed`."""
    table = _sign_table(packed.device)
    return table.index_select(0, packed.to(torch.int64)).view(-1)[:numel]


@functools.lru_cache(maxsize=8)
def _sign_table(device: torch.device) -> Tensor:
    """256 x 8 float32: row b holds the +1/-1 of the 8 bits of byte b, so unpacking is one gather."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return (bits.to(torch.float32) * 2 - 1).to(device)
