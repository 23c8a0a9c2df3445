"""CPU levels and engines: what torch's int8 CPU kernels compute on each x86 CPU class.

An engine is (name, CPU level). PyTorch's integers depend on the CPU it runs on: FBGEMM
and oneDNN multiply uint8 x int8 in adjacent pairs with int16 saturation
(``vpmaddubsw``) on CPUs without VNNI, and ATen's quantized average pooling uses a
channel block of its vector width. This module is the one place that says, per engine
and level, which qjax scheme and accumulation reproduce torch; the converters, CLI,
demo, rulebook and tests read it.

Levels, lowest first (as torch detects them: cpuinfo flags, lowered by torch's own
switches, :func:`host_level`):

===========  ===================================================================
``"avx2"``   AVX2 + FMA, no AVX-512 (``torch.backends.cpu.get_cpu_capability()``
             says ``AVX2``)
``"avx512"`` AVX-512 F/BW/VL/DQ without VNNI
``"vnni"``   AVX-512-VNNI (``vpdpbusd``: exact int32 accumulation)
``"amx"``    AMX-INT8 (Sapphire Rapids and newer)
===========  ===================================================================

Not modelled: CPUs with AVX-VNNI but no AVX-512 (some client CPUs; they count as
``"avx2"`` here, although oneDNN may accumulate exactly on them) and torch forced below
AVX2 (``ATEN_CPU_CAPABILITY=default``: ATen's scalar kernels, e.g. hardswish, round
differently by 1 LSB in about 1% of codes, measured).

What torch 2.13 computes (every cell measured against torch, the lower levels through
torch's switches on a VNNI machine, :func:`level_env`; the tests re-measure each cell):

=============================  =================  =================  ===================
kernel                         avx2               avx512             vnni, amx
=============================  =================  =================  ===================
FBGEMM linear, conv (any       ``fbgemm_sat16``   ``fbgemm_sat16``   exact; depthwise 3x3
groups, depthwise included)                                          fast path sat16
oneDNN linear                  ``onednn_sat16``   ``onednn_sat16``   exact
oneDNN conv, groups 1          ``onednn_sat16``   ``onednn_sat16``   exact
oneDNN conv, groups > 1        sat16 if C_in/g    ``onednn_sat16``   exact
                               and C_out/g are    (depthwise with
                               multiples of 4,    multiplier > 1:
                               else exact         not reproduced)
x86 engine conv routing        FBGEMM             FBGEMM             oneDNN if weight zp 0
                                                                     and groups <= 100
ATen avg_pool2d NHWC channel   8                  16                 16
block (``nhwc_block``)
=============================  =================  =================  ===================

``fbgemm_sat16``: pairs along FBGEMM's im2col K order (taps, then channels), raw uint8
codes, the zero-point term exact. ``onednn_sat16``: pairs over the channels of one tap
(never across taps), padding taps skipped, the zero-point term exact over the valid
taps (:mod:`qjax.kernels._conv`). QNNPACK, ATen's add/mul/clamps/max pool and the
adaptive average pool are the same integers on every level. Where the rows come from:
``docs/numerics.md`` ("CPU levels") and ``tests/test_cpu_levels.py``.

The x86 engine routes convs by cpuinfo's ``avx512_vnni`` flag, which torch's switches
do not reach: a VNNI machine forced to AVX2 still routes x86 convs to oneDNN (at its
forced level), while a real AVX2 machine runs them on FBGEMM. ``engine(name)`` on this
machine follows what torch does here (``Engine.x86_conv_onednn`` from the CPU flags);
``engine(name, isa)`` describes a real machine of that level.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import platform

__all__ = [
    "ENGINE_CHOICES",
    "ENGINE_NAMES",
    "cpu_flags",
    "LEVELS",
    "SATURATING_ENGINES",
    "SATURATING_LEVELS",
    "TORCH_ENGINES",
    "Engine",
    "engine",
    "engine_family",
    "host_level",
    "level_env",
]

LEVELS = ("avx2", "avx512", "vnni", "amx")
"""CPU levels, lowest first."""

SATURATING_LEVELS = ("avx2", "avx512")
"""Levels where FBGEMM and oneDNN sum uint8 x int8 pairs in saturating int16
(``vpmaddubsw``; no VNNI)."""

SATURATING_ENGINES = ("x86", "fbgemm", "onednn", "fbgemm_avx2")
"""Engines whose linear/conv run FBGEMM or oneDNN, so saturate at those levels."""

TORCH_ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")
"""torch's quantized CPU engines (``torch.backends.quantized.engine``)."""

ENGINE_NAMES = TORCH_ENGINES + ("tflite", "exact")
"""Engine names: torch's and qjax's integer-only ones (``"fbgemm_avx2"`` is accepted as
``("fbgemm", "avx2")``)."""

_ALIASES = {"fbgemm_avx2": ("fbgemm", "avx2")}

ENGINE_CHOICES = ENGINE_NAMES + tuple(_ALIASES)
"""Every name :func:`engine` accepts (the names plus the aliases)."""

# Each torch switch as the level it forces, by its value (upper case).
_FBGEMM_SWITCH = {"AVX2": "avx2", "AVX512": "avx512", "AVX512_VNNI": "vnni", "AVX512_E1": "vnni"}
_ONEDNN_SWITCH = {
    "AVX2": "avx2",
    "AVX512_CORE": "avx512",
    "AVX2_VNNI": "vnni",
    "AVX2_VNNI_2": "vnni",
    "AVX512_CORE_VNNI": "vnni",
    "AVX512_CORE_BF16": "vnni",
    "AVX512_CORE_FP16": "vnni",
    "AVX10_1_512": "vnni",
    "AVX512_CORE_AMX": "amx",
    "AVX512_CORE_AMX_FP16": "amx",
    "AVX10_1_512_AMX": "amx",
    "AVX10_1_512_AMX_FP16": "amx",
}
# ATen's own kernels (pools, add) only know avx2 / avx512 vector widths.
_ATEN_SWITCH = {"AVX2": "avx2"}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in ``/proc/cpuinfo`` (empty elsewhere):
    what torch's cpuinfo reads, and what the native kernels check before they build.
    Read once per process (the CPU does not change; torch's switches are read by
    :func:`host_level` on every call).

    >>> isinstance(cpu_flags(), frozenset)
    True
    """
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _hardware_level(flags: frozenset[str]) -> str | None:
    if {"avx512_vnni", "amx_int8", "amx_tile"} <= flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "vnni"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return None


def host_level(environ=None, flags=None) -> str | None:
    """The CPU level torch's int8 kernels run at in this process (``None`` off x86-64).

    The hardware level from the CPU flags (as torch's cpuinfo reads them), lowered by
    any of torch's switches set in the environment: ``FBGEMM_ENABLE_INSTRUCTIONS``,
    ``ONEDNN_MAX_CPU_ISA`` (``DNNL_MAX_CPU_ISA``), ``ATEN_CPU_CAPABILITY``; the lowest
    wins. Set all three together (:func:`level_env`) to reproduce one level: a process
    with only some of them set runs the libraries at different levels.

    >>> host_level({}, frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl",
    ...                           "avx512dq", "avx512_vnni"}))
    'vnni'
    >>> host_level({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}, frozenset({"avx2", "fma",
    ...            "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}))
    'avx2'
    """
    if flags is None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return None
        flags = cpu_flags()
    env = os.environ if environ is None else environ
    level = _hardware_level(flags)
    if level is None:
        return None
    caps = [
        _FBGEMM_SWITCH.get(env.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper()),
        _ONEDNN_SWITCH.get(
            (env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or "").upper()
        ),
        _ATEN_SWITCH.get(env.get("ATEN_CPU_CAPABILITY", "").upper()),
    ]
    for cap in caps:
        if cap is not None and LEVELS.index(cap) < LEVELS.index(level):
            level = cap
    return level


def level_env(level: str) -> dict[str, str]:
    """torch's switches that make a newer CPU compute like ``level`` (for a subprocess).

    >>> level_env("avx2")["ONEDNN_MAX_CPU_ISA"]
    'AVX2'
    """
    _check_level(level)
    return {
        "avx2": {
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
            "ONEDNN_MAX_CPU_ISA": "AVX2",
            "ATEN_CPU_CAPABILITY": "avx2",
        },
        "avx512": {
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512",
            "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
            "ATEN_CPU_CAPABILITY": "avx512",
        },
        "vnni": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
        "amx": {},
    }[level]


def _check_level(level):
    if level not in LEVELS:
        raise ValueError(f"unknown CPU level {level!r}; known: {LEVELS}")


@dataclasses.dataclass(frozen=True)
class Engine:
    """What torch computes under one quantized engine on one CPU level.

    ``linear`` / ``conv`` / ``add`` / ``pool`` are scheme names of :mod:`qjax.kernels`;
    ``conv`` ``"x86"`` means the x86 engine's routing (:meth:`conv_scheme`).
    ``level`` is ``None`` for engines whose integers do not depend on the CPU.
    """

    name: str
    level: str | None
    linear: str
    conv: str
    add: str
    pool: str
    x86_conv_onednn: bool = True  # the x86 engine's conv routing (cpuinfo avx512_vnni)

    @property
    def label(self) -> str:
        """``"x86@vnni"``; the bare name for level-free engines."""
        return self.name if self.level is None else f"{self.name}@{self.level}"

    @property
    def saturates(self) -> bool:
        """Whether FBGEMM/oneDNN run ``vpmaddubsw`` (int16 pair saturation) here."""
        return self.level in SATURATING_LEVELS

    @property
    def linear_accumulate(self) -> str:
        """``"exact"``, ``"fbgemm_sat16"`` or ``"onednn_sat16"`` for linear layers.

        >>> engine("fbgemm", "avx2").linear_accumulate, engine("x86", "vnni").linear_accumulate
        ('fbgemm_sat16', 'exact')
        """
        if not self.saturates or self.linear not in ("fbgemm", "onednn"):
            return "exact"
        return f"{self.linear}_sat16"

    @property
    def avg_pool_block(self) -> int:
        """ATen's NHWC ``avg_pool2d`` channel block (:func:`qjax.kernels.avg_pool2d`): its
        vector width, 8 channels at AVX2, 16 above. Level-free engines (qnnpack, tflite,
        exact) fall back to ATen's kernel where QNNPACK has none, at this machine's level.

        >>> engine("fbgemm", "avx2").avg_pool_block, engine("x86", "amx").avg_pool_block
        (8, 16)
        """
        return 8 if (self.level or host_level()) == "avx2" else 16

    def conv_scheme(
        self,
        zero_point_is_zero: bool,
        groups: int,
        c_in: int | None = None,
        c_out: int | None = None,
        depthwise_fast_path: bool = False,
    ) -> tuple[str, str]:
        """``(scheme, accumulate)`` for a conv layer under this engine and level.

        ``depthwise_fast_path``: the conv is one FBGEMM runs on its direct depthwise 3x3
        kernel (:func:`fbgemm_depthwise_fast_path`), which saturates on every level.

        >>> engine("x86", "vnni").conv_scheme(True, 8), engine("x86", "avx2").conv_scheme(True, 8)
        (('onednn', 'exact'), ('fbgemm', 'fbgemm_sat16'))
        >>> engine("onednn", "avx2").conv_scheme(True, 2, 6, 6)   # 3 channels per group
        ('onednn', 'exact')
        """
        scheme = self.conv
        if scheme == "x86":
            routed = self.x86_conv_onednn and zero_point_is_zero and groups <= 100
            scheme = "onednn" if routed else "fbgemm"
        if scheme == "fbgemm":
            if self.saturates or depthwise_fast_path:
                return scheme, "fbgemm_sat16"
            return scheme, "exact"
        if scheme == "onednn" and self.saturates:
            if groups > 1 and self.level == "avx2":
                blocked = c_in is not None and c_out is not None
                blocked = blocked and (c_in // groups) % 4 == 0 and (c_out // groups) % 4 == 0
                return scheme, ("onednn_sat16" if blocked else "exact")
            return scheme, "onednn_sat16"
        return scheme, "exact"


def fbgemm_depthwise_fast_path(groups, c_in, c_out, kernel, stride, dilation, padding) -> bool:
    """FBGEMM's direct depthwise 3x3 kernel (int16 pair saturation even with VNNI): 2-D,
    groups = C_in (a multiple of 8), C_out = C_in or 2·C_in, 3x3, stride 1 or 2, no
    dilation, padding 1 (the shapes the tests measured).

    >>> fbgemm_depthwise_fast_path(16, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1))
    True
    """
    return (
        len(tuple(kernel)) == 2
        and groups == c_in
        and c_in % 8 == 0
        and c_out in (c_in, 2 * c_in)
        and tuple(kernel) == (3, 3)
        and all(s in (1, 2) for s in stride)
        and tuple(dilation) == (1, 1)
        and tuple(padding) == (1, 1)
    )


# engine name -> (linear, conv, add, pool) schemes; the level picks the accumulation.
_SCHEMES = {
    "fbgemm": ("fbgemm", "fbgemm", "fbgemm", "fbgemm"),
    "x86": ("fbgemm", "x86", "x86", "x86"),
    "onednn": ("onednn", "onednn", "onednn", "onednn"),
    "qnnpack": ("qnnpack", "qnnpack", "qnnpack", "qnnpack"),
    "tflite": ("tflite", "tflite", "exact", "fbgemm"),
    "exact": ("exact", "exact", "exact", "fbgemm"),
}
_LEVEL_FREE = ("qnnpack", "tflite", "exact")


def engine_family(name: str) -> str:
    """The torch engine an engine name emulates (an alias's engine; other names as given).

    >>> engine_family("fbgemm_avx2"), engine_family("x86")
    ('fbgemm', 'x86')
    """
    return _ALIASES.get(name, (name,))[0]


def engine(name: str, isa: str | None = None) -> Engine:
    """The :class:`Engine` for ``name`` on CPU level ``isa`` (``None``: this machine's,
    :func:`host_level`; a machine torch cannot detect counts as ``"vnni"``).

    ``"fbgemm_avx2"`` is ``engine("fbgemm", "avx2")``. QNNPACK, ``"tflite"`` and
    ``"exact"`` do not depend on the level (their ``level`` is ``None``).

    >>> engine("x86", "avx2").label, engine("fbgemm_avx2").label, engine("qnnpack", "avx2").label
    ('x86@avx2', 'fbgemm@avx2', 'qnnpack')
    """
    if name in _ALIASES:
        alias, level = _ALIASES[name]
        if isa is not None and isa != level:
            raise ValueError(f"engine {name!r} is level {level!r}; got isa={isa!r}")
        name, isa = alias, level
    if name not in _SCHEMES:
        known = sorted(ENGINE_CHOICES)
        raise ValueError(f"unknown engine {name!r}; known: {known}")
    if isa is not None:
        _check_level(isa)
        routed = isa in ("vnni", "amx")
    else:  # torch routes by the CPU flags, whatever its switches say
        routed = _hardware_level(cpu_flags()) in ("vnni", "amx", None)
    level = None if name in _LEVEL_FREE else (isa or host_level() or "vnni")
    return Engine(name, level, *_SCHEMES[name], x86_conv_onednn=routed)
