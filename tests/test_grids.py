"""kernels.grids: the host-side cdiv / next_power_of_2 the launchers use in place of Triton's constexpr functions."""
from __future__ import annotations

import pytest

from ipex_llm_tf.kernels.grids import cdiv, next_power_of_2

triton = pytest.importorskip("triton")


def test_grid_helpers_equal_tritons() -> None:
    """Same integers as triton.cdiv / triton.next_power_of_2 over the sizes launches see."""
    for n in range(0, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for block in (1, 2, 3, 16, 64, 128, 1024):
            assert cdiv(n, block) == triton.cdiv(n, block), (n, block)
    assert next_power_of_2(1 << 40) == 1 << 40 and next_power_of_2((1 << 40) + 1) == 1 << 41
