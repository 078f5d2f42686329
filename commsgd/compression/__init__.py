"""Gradient and model compressors with exact wire sizes, and error feedback.

    from commsgd.compression import get
    c = get("topk", ratio=0.01)
    payload = c.compress(grad)            # payload.buffers are what travels, payload.nbytes their size
    approx = c.decompress(payload)

Names: see `COMPRESSORS`. Non-finite input raises `NonFiniteError`.
"""

from commsgd.compression.base import Compressor, NonFiniteError, Payload, poisoned
from commsgd.compression.bits import pack_signs, packed_size, unpack_signs
from commsgd.compression.blocks import Blocks
from commsgd.compression.cast import BFloat16, Float16, Identity
from commsgd.compression.feedback import ErrorFeedback
from commsgd.compression.powersgd import PowerSGD, initial_q, low_rank, matrix_view, orthonormalize_
from commsgd.compression.quantize import QSGD, Rounding, stochastic_round_
from commsgd.compression.registry import COMPRESSORS, get
from commsgd.compression.sign import BlockSign, ScaledSign, Sign
from commsgd.compression.sparse import RandomK, TopK
from commsgd.compression.wire import Wire

__all__ = [
    "COMPRESSORS",
    "QSGD",
    "BFloat16",
    "BlockSign",
    "Blocks",
    "Compressor",
    "ErrorFeedback",
    "Float16",
    "Identity",
    "NonFiniteError",
    "Payload",
    "PowerSGD",
    "RandomK",
    "Rounding",
    "ScaledSign",
    "Sign",
    "TopK",
    "Wire",
    "get",
    "initial_q",
    "low_rank",
    "matrix_view",
    "orthonormalize_",
    "pack_signs",
    "packed_size",
    "poisoned",
    "stochastic_round_",
    "unpack_signs",
]
