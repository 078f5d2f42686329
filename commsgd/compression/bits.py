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


#: elements packed per pass of `pack_signs` (a multiple of 64: whole int64 words of flags), so that the
#: flags of one pass stay in cache and no vector-sized temporary is allocated
PACK_CHUNK = 1 << 18


def pack_signs(x: Tensor) -> Tensor:
    """Bit i of byte j is set when x[8j + i] >= 0, so zeros (and -0.0) count as positive.

    Padding bits of the last byte are set too (the padding reads as +0); `unpack_signs` drops them.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("pack_signs reads 8 bools as one int64 and needs a little-endian host")
    flat = x.reshape(-1)
    packed = torch.empty(packed_size(flat.numel()), dtype=torch.uint8, device=flat.device)
    # flags as int8 0/1: a comparison writes int8 several times faster than bool on a CPU
    flags = torch.empty(8 * min(packed.numel(), PACK_CHUNK // 8), dtype=torch.int8, device=flat.device)
    for start in range(0, flat.numel(), PACK_CHUNK):
        part = flat[start : start + PACK_CHUNK]
        nonneg = flags[: 8 * packed_size(part.numel())]
        nonneg[part.numel() :].fill_(1)
        torch.ge(part, 0, out=nonneg[: part.numel()])
        # Each int64 word holds 8 flags b_0..b_7 (0 or 1) in its bytes: b_i * 2^(8i). The product with
        # _GATHER = sum_j 2^(8j + 7 - j) puts b_i at bit 56 + i (the terms with i + j = 7), while every
        # other term lands below bit 56 without carries (distinct bits per byte) or wraps past bit 63.
        # The cast to uint8 keeps the low byte of the shifted word: the 8 flags.
        words = nonneg.view(torch.int64).mul_(_GATHER).bitwise_right_shift_(56)
        packed[start // 8 : start // 8 + words.numel()].copy_(words)
    return packed


def unpack_signs(
    packed: Tensor, numel: int, scale: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """float32 +1/-1 for each of the first `numel` bits of `packed`, times `scale` (one element) when
    given: scaling the 256-row table instead of the result saves a pass over it, with the same products.
    Written into `out` (flat, float32, `numel` elements) when given."""
    table = _sign_table(packed.device)
    if scale is not None:
        table = table * scale
    index = packed.to(torch.int32)
    if out is None:
        return table.index_select(0, index).view(-1)[:numel]
    whole = numel // 8
    torch.index_select(table, 0, index[:whole], out=out[: 8 * whole].view(whole, 8))
    if numel > 8 * whole:
        out[8 * whole :].copy_(table[index[whole]][: numel - 8 * whole])
    return out


@functools.lru_cache(maxsize=8)
def _sign_table(device: torch.device) -> Tensor:
    """256 x 8 float32: row b holds the +1/-1 of the 8 bits of byte b, so unpacking is one gather."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return (bits.to(torch.float32) * 2 - 1).to(device)
