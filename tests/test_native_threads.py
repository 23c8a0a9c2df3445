"""The helper threads' spin setting (``QJAX_SPIN_US``, :mod:`qjax.kernels._native._threads`):
a bad value is refused with its name, wherever the kernel library would read it."""

import pytest

from qjax.kernels._native import _threads


@pytest.mark.parametrize("raw", ["-1", "1e3", "fast", "1000001"])
def test_bad_spin_setting_is_named(raw):
    with pytest.raises(ValueError, match=f"QJAX_SPIN_US={raw!r}: want an integer"):
        _threads.spin_us({"QJAX_SPIN_US": raw})


def test_spin_setting_bounds_and_blanks():
    assert _threads.spin_us({"QJAX_SPIN_US": " "}) == _threads.SPIN_US_DEFAULT
    assert _threads.spin_us({"QJAX_SPIN_US": "1000000"}) == 1_000_000
