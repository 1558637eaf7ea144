"""Host-side integer helpers for launch grids and block sizes.

Plain Python on purpose: Triton's own `triton.cdiv` / `triton.next_power_of_2` are constexpr functions in recent
releases (3.9 here), which cost ~3 us a call on the host (their arguments go through constexpr unwrapping), several
times per launch; an eager 7B prefill makes ~400 launches.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (and 0 for 0), as triton.next_power_of_2."""
    return n if n <= 1 else 1 << (n - 1).bit_length()
