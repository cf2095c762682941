"""Host-side integer helpers and output allocation shared by the launchers.

A BERT-base training step makes hundreds of launcher calls, so their host cost matters at BERT
sizes (a kernel takes tens of microseconds). These replace triton.cdiv / triton.next_power_of_2
(about 6 us per call in triton 3.9, where they are constexpr functions) with plain integer math.
"""

import os

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def _nan(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def allocator():
    """The output allocator for one launcher call: torch.empty, or NaN-filled tensors when
    FASTBERT_POISON=1 (tests: an element a kernel fails to write then shows as NaN). The variable
    is read once per call, not once per tensor."""
    return _nan if os.environ.get("FASTBERT_POISON", "0") == "1" else _empty
