"""Neighbour exchange for the decentralized methods (dpsgd, qdsgd, quantimed).

A worker's model travels as flat buffers (one per dtype, so one message per neighbour per round for
the usual float32 model); compressed payloads are packed into a single byte message. Every message
goes through `comm.isend`/`comm.irecv`, so bytes are counted per edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from commsgd.comm import Communicator, Pending
from commsgd.compression import Compressor, Payload
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


def post_exchange(
    comm: Communicator, sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]]
) -> list[Pending]:
    """Post every receive, then every send, without waiting: no ordering of neighbours can deadlock.

    Wait on all returned handles before reading the receive buffers or touching the send buffers.
    """
    pending = [comm.irecv(buffer, src) for buffer, src in recvs]
    pending += [comm.isend(buffer, dst) for buffer, dst in sends]
    return pending


class WireCodec:
    """Packs a compressor's payload for a flat tensor of `numel` values into one byte message, and back.

    The layout comes from `compressor.empty_payload`, so sender and receiver agree without talking.
    Only fixed-size payloads without shared (not sent) tensors fit a point-to-point message.
    """

    def __init__(self, compressor: Compressor, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.compressor, self.device = compressor, device
        self.template = compressor.empty_payload(numel, dtype, device=device)
        self.layout = [
            (key, buf.dtype, buf.numel() * buf.element_size()) for key, buf in self.template.buffers.items()
        ]
        self.nbytes = sum(size for _, _, size in self.layout)

    def encode(self, payload: Payload) -> torch.Tensor:
        """The payload's buffers back to back as one uint8 tensor."""
        if payload.shared:
            raise ValueError(
                f"{self.compressor.name}: payloads with shared tensors cannot be sent point to point"
            )
        parts = [payload.buffers[key].reshape(-1).view(torch.uint8) for key, _, _ in self.layout]
        wire = torch.cat(parts)
        if wire.numel() != self.nbytes:
            raise ValueError(
                f"{self.compressor.name}: payload of {wire.numel()} bytes, expected {self.nbytes}"
            )
        return wire

    def decode(self, wire: torch.Tensor) -> Payload:
        """The payload a received byte message holds."""
        buffers, offset = {}, 0
        for key, dtype, size in self.layout:
            buffers[key] = wire[offset : offset + size].clone().view(dtype)
            offset += size
        return self.template.with_buffers(buffers)

    def empty(self) -> torch.Tensor:
        """A receive buffer for one message."""
        return torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
