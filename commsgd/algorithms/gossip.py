"""Neighbour exchange for the decentralized methods (dpsgd, qdsgd, quantimed).

A worker's model travels as flat buffers (one per dtype, so one message per neighbour per round for
the usual float32 model); compressed payloads are packed into a single byte message. Every message
goes through `comm.post_exchange` (receives posted first), so bytes are counted per edge; a compressed
payload's layout is `commsgd.compression.Wire`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from commsgd.flat import FlatBuffer
from commsgd.topology import Topology


class ModelVector:
    """A model's state (every parameter, then the floating-point buffers) as one flat buffer per dtype.

    `read()` copies the values out, `write(values)` copies them back and `gradients()` gives the flat
    gradients in the same layout (zeros for buffers and for parameters without a gradient).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        entries: list[tuple[torch.Tensor, torch.Tensor | None]] = [
            (p.detach(), p) for p in model.parameters()
        ]
        entries += [(b, None) for b in model.buffers() if b.is_floating_point()]
        groups: dict[torch.dtype, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
        for tensor, owner in entries:
            groups.setdefault(tensor.dtype, []).append((tensor, owner))
        self.flats = [FlatBuffer([t for t, _ in group]) for group in groups.values()]
        self._owners = [[owner for _, owner in group] for group in groups.values()]

    @property
    def numel(self) -> int:
        return sum(f.numel for f in self.flats)

    def read(self) -> list[torch.Tensor]:
        """Fresh copies of the current values, one flat tensor per dtype group."""
        return [f.pack().clone() for f in self.flats]

    def write(self, values: Sequence[torch.Tensor]) -> None:
        """Copy flat values (as returned by `read`) into the model."""
        for flat, value in zip(self.flats, values, strict=True):
            flat.unpack(value)

    def gradients(self) -> list[torch.Tensor]:
        """The current gradients in the layout of `read()`."""
        result = []
        for flat, owners in zip(self.flats, self._owners):
            parts = [
                (o.grad if o is not None and o.grad is not None else torch.zeros_like(t)).reshape(-1)
                for t, o in zip(flat.tensors, owners)
            ]
            result.append(torch.cat(parts))
        return result


@dataclass(frozen=True)
class Neighbourhood:
    """One worker's row of the mixing matrix: its own weight and those of its neighbours."""

    rank: int
    peers: tuple[int, ...]
    weights: tuple[float, ...]
    self_weight: float

    @classmethod
    def of(cls, topology: Topology, rank: int) -> Neighbourhood:
        peers = tuple(topology.neighbors(rank))
        row = topology.weights[rank]
        return cls(rank, peers, tuple(float(row[j]) for j in peers), float(row[rank]))
