"""Sparsifiers: send k of the d coordinates as float32 values plus int32 indices (when indices travel)."""

from __future__ import annotations

import torch
from torch import Tensor

from commsgd.compression.base import (
    BufferSpec,
    Compressor,
    Payload,
    check_finite,
    float_param,
    int_param,
    output,
)
from commsgd.errors import ConfigError

_MAX_INT32_NUMEL = 2**31 - 1


class Sparsifier(Compressor):
    """Common part of topk and randomk: how many coordinates to keep, and scattering them back.

    k is `k` when given, else round(ratio * d) clipped to [1, d] (ratio defaults to `default_ratio`).
    """

    default_ratio = 0.01
    #: a coordinate sent twice: its values add up (True), or they are equal copies and one stands (False)
    repeats_add = False

    def __init__(self, ratio: float | None = None, k: int | None = None) -> None:
        if ratio is not None and k is not None:
            raise ConfigError(
                f"{self.name}: give ratio (a number in (0, 1]) or k (an integer >= 1), not both"
            )
        self.k = None if k is None else int_param(self.name, "k", k, 1)
        self.ratio = float_param(self.name, "ratio", self.default_ratio if ratio is None else ratio, 0.0, 1.0)

    def k_for(self, numel: int) -> int:
        """Number of coordinates kept for a tensor of `numel` elements."""
        k = self.k if self.k is not None else round(self.ratio * numel)
        return min(max(k, 1), numel)

    def _check_size(self, numel: int) -> None:
        if numel > _MAX_INT32_NUMEL:
            raise ValueError(
                f"{self.name}: int32 indices cover at most {_MAX_INT32_NUMEL} elements, got {numel}"
            )

    def _indices(self, payload: Payload) -> Tensor:
        return payload.buffers["indices"]

    def _decode(self, payload: Payload, out: Tensor | None) -> Tensor:
        values = payload.buffers["values"]
        out = output(payload.numel, out, values).zero_()
        indices = self._indices(payload).to(torch.int64)
        if self.repeats_add:
            return out.index_add_(0, indices, values)
        # repeats carry equal copies, so whichever copy lands stands; index_copy_ is about twice as
        # fast as index_put_ on a CPU
        return out.index_copy_(0, indices, values)


class TopK(Sparsifier):
    """The k largest magnitudes, exactly: ||x - C(x)||^2 <= (1 - k/d) ||x||^2."""

    name = "topk"

    def delta(self, numel: int) -> float | None:
        return self.k_for(numel) / numel if numel else 1.0

    def buffer_specs(self, shape: torch.Size) -> dict[str, BufferSpec]:
        k = self.k_for(shape.numel())
        return {"values": (k, torch.float32), "indices": (k, torch.int32)}

    def _encode(
        self, flat: Tensor, payload: Payload, *, generator: torch.Generator | None, key: str | None
    ) -> None:
        self._check_size(flat.numel())
        check_finite(self.name, *torch.aminmax(flat))
        indices = top_magnitude_indices(flat, self.k_for(flat.numel()))
        payload.buffers["values"] = flat.index_select(0, indices)  # a copy, like flat[indices] but faster
        payload.buffers["indices"] = indices.to(torch.int32)


def top_magnitude_indices(flat: Tensor, k: int, probe_size: int = 8192) -> Tensor:
    """Positions of k largest |flat| in no particular order (ties broken arbitrarily, as by torch.topk).

    torch.topk over a large vector is slow on a CPU (about 20 ns per element at k = 1%). A strided probe
    of `probe_size` elements gives a threshold that about 2k elements pass; topk then runs on those
    alone. When fewer than k pass (a probe fooled by periodic data), it falls back to the full topk.
    """
    numel = flat.numel()
    if numel >= 4 * probe_size and k <= numel // 8:
        probe = flat[:: numel // probe_size].abs()
        probe_k = min(probe.numel(), 2 * k * probe.numel() // numel + 16)
        threshold = probe.topk(probe_k, sorted=False).values.min()
        candidates = magnitudes_at_least(flat, threshold)
        if candidates.numel() >= k:  # then every top-k magnitude is >= threshold, so it is a candidate
            return candidates[flat.index_select(0, candidates).abs_().topk(k, sorted=False).indices]
    return flat.abs().topk(k, sorted=False).indices


def magnitudes_at_least(flat: Tensor, threshold: Tensor, chunk: int = 1 << 18) -> Tensor:
    """Positions i (ascending) with |flat[i]| >= threshold, `chunk` elements at a time.

    Per chunk, |x| >= threshold goes into a small scratch mask that stays in cache, as int8 0/1 (a
    comparison writes int8 several times faster than bool on a CPU); the mask is read as int64 words
    of 8 flags, so nonzero (the costly compaction) scans an eighth of the elements and then only the
    8 flags of each word that holds a hit.
    """
    size = (min(chunk, flat.numel()) + 7) // 8 * 8
    magnitudes = torch.empty(size, dtype=flat.dtype, device=flat.device)
    passed = torch.zeros(size, dtype=torch.int8, device=flat.device)
    found = []
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        n, padded = part.numel(), (part.numel() + 7) // 8 * 8
        torch.ge(torch.abs(part, out=magnitudes[:n]), threshold, out=passed[:n])
        if n < padded:
            passed[n:padded] = 0  # the last chunk's padding: no hit
        words = passed[:padded].view(torch.int64).nonzero().squeeze(1)
        flags = passed[:padded].view(-1, 8).index_select(0, words).nonzero()
        found.append(words[flags[:, 0]].mul_(8).add_(flags[:, 1]).add_(start))
    return torch.cat(found)


class RandomK(Sparsifier):
    """k coordinates drawn uniformly at random, as they are or scaled by d/k.

    - `scaled=False` (default): C(x) = x on the drawn coordinates, 0 elsewhere. Biased, but a contraction,
      E||x - C(x)||^2 = (1 - 1/d)^k ||x||^2, which is what error feedback needs (Stich et al. 2018).
    - `scaled=True`: each draw adds (d/k) x_i. Unbiased, but E||C(x) - x||^2 = (d-1)/k ||x||^2: larger
      than ||x||^2 itself, so error feedback diverges with it, and without error feedback it needs a
      smaller learning rate. For schemes that need an unbiased compressor.

    Coordinates are drawn with replacement, which keeps the draw at O(k) where sampling without
    replacement (torch.randperm) costs O(d) per call; a coordinate drawn twice is kept once (unscaled) or
    added twice (scaled). The draw comes from `generator`, so workers whose generators are in the same
    state pick the same coordinates.

    With `shared_indices` (default) the indices do not travel: they sit in `payload.shared`, the wire
    carries only the values, and payloads are summable. A receiver decompresses a received or all-reduced
    value buffer with `own_payload.with_buffers(...)`, or rebuilds indices with `draw_indices`.
    """

    name = "randomk"
    default_ratio = 0.1  # 1% (topk's default) would leave each coordinate unsent for ~100 steps on average

    def __init__(
        self,
        ratio: float | None = None,
        k: int | None = None,
        shared_indices: bool = True,
        scaled: bool = False,
    ) -> None:
        super().__init__(ratio=ratio, k=k)
        for flag, value in (("shared_indices", shared_indices), ("scaled", scaled)):
            if not isinstance(value, bool):
                raise ConfigError(f"{self.name}: {flag} must be true or false, got {value!r}")
        self.shared_indices, self.scaled = shared_indices, scaled
        self.summable = shared_indices
        self.unbiased = self.repeats_add = scaled

    def draw_indices(
        self, numel: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """The int64 coordinates `compress` would draw for a tensor of `numel` elements from `generator`."""
        return torch.randint(0, numel, (self.k_for(numel),), generator=generator, device=device)

    def buffer_specs(self, shape: torch.Size) -> dict[str, BufferSpec]:
        k = self.k_for(shape.numel())
        specs: dict[str, BufferSpec] = {"values": (k, torch.float32)}
        if not self.shared_indices:
            specs["indices"] = (k, torch.int32)
        return specs

    def _encode(
        self, flat: Tensor, payload: Payload, *, generator: torch.Generator | None, key: str | None
    ) -> None:
        if not self.shared_indices:
            self._check_size(flat.numel())
        # drawn before the check: a worker whose input fails stays in step with the shared generator
        indices = self.draw_indices(flat.numel(), generator, flat.device)
        check_finite(self.name, *torch.aminmax(flat))
        values = flat.index_select(0, indices)  # a copy (never aliases the input); 4x flat[indices]
        payload.buffers["values"] = values.mul_(flat.numel() / indices.numel()) if self.scaled else values
        if self.shared_indices:
            payload.shared["indices"] = indices
        else:
            payload.buffers["indices"] = indices.to(torch.int32)

    def _indices(self, payload: Payload) -> Tensor:
        if not self.shared_indices:
            return super()._indices(payload)
        if "indices" not in payload.shared:
            raise ValueError(
                f"{self.name}: shared indices missing from the payload; decompress with "
                "own_payload.with_buffers(received) or put draw_indices(...) in payload.shared['indices']"
            )
        return payload.shared["indices"]
