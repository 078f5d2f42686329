"""Sign compressors: 1 bit per element, optionally times a per-block scale.

`scaled_sign` is (||x||_1 / d) sign(x) (Karimireddy et al., EF-SignSGD); `block_sign` applies it to each
block separately, as dist-EF-BlockSGD (Zheng et al., 2019) does per layer. Per block of d_j elements the
error is ||x_j||^2 - ||x_j||_1^2 / d_j <= (1 - 1/d_j) ||x_j||^2, hence delta = 1 / (largest block size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from commsgd.compression.base import BufferSpec, Compressor, Payload, check_finite, int_param
from commsgd.compression.bits import pack_signs, packed_size, unpack_signs
from commsgd.compression.blocks import Blocks, abs_sums
from commsgd.errors import ConfigError


class Sign(Compressor):
    """Bare signs, decompressed to +1/-1; x >= 0 (zero included) gives +1. Biased and unscaled."""

    name = "sign"

    def buffer_specs(self, shape: torch.Size) -> dict[str, BufferSpec]:
        return {"bits": (packed_size(shape.numel()), torch.uint8)}

    def _encode(
        self, flat: Tensor, payload: Payload, *, generator: torch.Generator | None, key: str | None
    ) -> None:
        check_finite(self.name, *torch.aminmax(flat))
        payload.buffers["bits"] = pack_signs(flat)

    def _decode(self, payload: Payload, out: Tensor | None) -> Tensor:
        return unpack_signs(payload.buffers["bits"], payload.numel, out=out)


class ScaledSign(Compressor):
    """(||x||_1 / d) sign(x) per block: sign bits plus one float32 scale (mean |x|) per block.

    Here the whole tensor is one block, so delta = 1/d (and usually far better); `block_sign` changes
    only the layout by overriding `blocks`.
    """

    name = "scaled_sign"

    def blocks(self, numel: int) -> Blocks:
        """The block layout used for a tensor of `numel` elements."""
        return Blocks.uniform(numel, max(numel, 1))

    def delta(self, numel: int) -> float | None:
        return 1.0 / max(self.blocks(numel).max_size, 1)

    def buffer_specs(self, shape: torch.Size) -> dict[str, BufferSpec]:
        numel = shape.numel()
        return {
            "bits": (packed_size(numel), torch.uint8),
            "scales": (self.blocks(numel).count, torch.float32),
        }

    def _encode(
        self, flat: Tensor, payload: Payload, *, generator: torch.Generator | None, key: str | None
    ) -> None:
        scales = self.blocks(flat.numel()).reduce(flat, _mean_abs)
        check_finite(self.name, scales)
        payload.buffers["bits"] = pack_signs(flat)
        payload.buffers["scales"] = scales

    def _decode(self, payload: Payload, out: Tensor | None) -> Tensor:
        blocks, scales = self.blocks(payload.numel), payload.buffers["scales"]
        if blocks.count == 1:
            return unpack_signs(payload.buffers["bits"], payload.numel, scale=scales, out=out)
        signs = unpack_signs(payload.buffers["bits"], payload.numel, out=out)
        return blocks.scale(signs, scales, out=signs)


class BlockSign(ScaledSign):
    """Scaled sign per block (dist-EF-BlockSGD). Blocks are either fixed `block_size` chunks of the flat
    vector (the last one shorter) or given by `sizes`, e.g. the element counts of the tensors flattened
    into x, which gives the per-layer variant of the paper."""

    name = "block_sign"

    default_block_size = 1024

    def __init__(self, block_size: int | None = None, sizes: Sequence[int] | None = None) -> None:
        if block_size is not None and sizes is not None:
            raise ConfigError(f"{self.name}: give block_size (an integer >= 1) or sizes, not both")
        size = self.default_block_size if block_size is None else block_size
        self.block_size = int_param(self.name, "block_size", size, 1)
        if sizes is not None and len(sizes) == 0:
            raise ConfigError(f"{self.name}: sizes must list at least one block size (integers >= 1)")
        self.sizes = None if sizes is None else tuple(int_param(self.name, "sizes[i]", s, 1) for s in sizes)
        self._layout = None if self.sizes is None else Blocks.of_sizes(self.sizes)

    def blocks(self, numel: int) -> Blocks:
        if self._layout is None:
            return Blocks.uniform(numel, self.block_size)
        if self._layout.numel != numel:
            raise ValueError(
                f"{self.name}: sizes add up to {self._layout.numel} elements, the tensor has {numel}"
            )
        return self._layout


def _mean_abs(view: Tensor) -> Tensor:
    """Mean |x| of each row; NaN or Inf in a row makes its mean non-finite."""
    return abs_sums(view).div_(view.shape[1])
