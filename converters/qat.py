"""Continue a PyTorch QAT run in JAX: copy a prepared-QAT model's state onto qjax.flax.

Works for models prepared with eager ``torch.ao.quantization.prepare_qat`` and FX
``prepare_qat_fx`` (fake-quant modules ``FakeQuantize`` and the default
``FusedMovingAvgObsFakeQuantize``; fused ``ConvBn[ReLU]{1,2,3}d``, ``Conv[ReLU]Nd``,
``Linear[ReLU]``). :func:`import_qat_state` fills an NNX model in place;
:func:`import_qat_variables` returns new Linen variables.

What is copied, per mapped PyTorch module (layout flips from :mod:`._layouts`):

=========================  =========================  ==========================================
PyTorch                    qjax                       layout
=========================  =========================  ==========================================
``Linear.weight``          ``kernel``                 ``linear``: ``[out, in] -> [in, out]``
``ConvNd.weight``          ``kernel``                 ``conv2d``: ``[out, in, kh, kw] ->
                                                      [kh, kw, in, out]`` (1-D/3-D alike)
``.bias``                  ``bias``                   none
``ConvBn.bn.weight/bias``  ``bn_scale``/``bn_bias``   none
``.bn.running_mean/var``   ``bn_mean``/``bn_var``     none (BatchStat / ``batch_stats``)
``.weight_fake_quant``     ``quant_stats.weight``     observer min/max (per output channel)
``.activation_post_proc``  ``quant_stats.output``     observer min/max (eager: the layer's
                                                      output quantizer)
``QuantStub`` / FX         ``ActQuant`` /             observer min/max
``activation_post_process  ``QuantStub`` stats, or a
_N``                       ``(path, slot)`` pair
=========================  =========================  ==========================================

Qparams are not stored by qjax (it recomputes them from the observer state every
forward, as the fused fake-quant does); instead each PyTorch fake-quant's ``scale`` and
``zero_point`` are checked to equal what qjax derives from the imported state, and the
qjax config is checked to compute what the fake-quant computes (dtype, range, qscheme,
observer, fused or not: :mod:`._torch_fq`). The fake-quant's ``observer_enabled`` /
``fake_quant_enabled`` flags become NNX switches (Linen: in the report). PyTorch's
``freeze_bn`` becomes ``QuantConvBn.freeze_bn`` (NNX).

``mapping`` is ``{torch module name: qjax module path}`` (``"features.0"`` ->
``"features/0"``); a value may be ``(path, slot)`` with slot ``"input"``, ``"weight"``
or ``"output"`` to put one fake-quant into one quantizer of a layer (FX graphs keep
activation fake-quants as separate modules), or ``None`` to skip a torch module on
purpose. ``mapping=None`` maps every QAT layer, ``QuantStub`` and top-level fake-quant
to the qjax module of the same path. With ``strict=True`` every fake-quant of the torch
model and every quantizer of the qjax model must be matched; one ``ValueError`` lists
what is not, on both sides.

>>> import torch, torch.ao.quantization as tq
>>> from flax import nnx
>>> from qjax.flax import default_qat_qconfig, nnx as qn
>>> m = torch.nn.Sequential(tq.QuantStub(), torch.nn.Linear(3, 2))
>>> m.qconfig = tq.get_default_qat_qconfig("x86")
>>> _ = tq.prepare_qat(m.train(), inplace=True)
>>> _ = m(torch.randn(4, 3))
>>> cfg = default_qat_qconfig("x86")
>>> class Net(nnx.Module):
...     def __init__(self):
...         self.stub = qn.QuantStub(cfg)
...         self.fc = qn.QuantLinear(3, 2, config=cfg, rngs=nnx.Rngs(0))
>>> net = Net()
>>> rep = import_qat_state(m, net, {"0": "stub", "1": "fc"})
>>> rep.copied["fc/kernel"], rep.qparams_checked
('1.weight (linear: [out, in] -> [in, out])', 4)
>>> bool((net.fc.kernel[...].T == m[1].weight.detach().numpy()).all())
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from qjax.flax import LayerStats

from ._layouts import conv_layout, get_layout, to_flax
from ._qat_targets import LinenTarget, NnxTarget, copy_tree, linen_holders, nnx_holders
from ._torch_fq import check_fake_quant, check_qparams, fake_quant_state, is_fake_quant

__all__ = ["ImportReport", "import_qat_state", "import_qat_variables"]

# torch attribute -> qjax variable, layout ("conv": by the weight's rank).
PARAM_TABLE: dict[str, tuple[tuple[str, str, str], ...]] = {
    "linear": (("weight", "kernel", "linear"), ("bias", "bias", "none")),
    "conv": (("weight", "kernel", "conv"), ("bias", "bias", "none")),
    "conv_bn": (
        ("weight", "kernel", "conv"),
        ("bias", "bias", "none"),
        ("bn.weight", "bn_scale", "none"),
        ("bn.bias", "bn_bias", "none"),
        ("bn.running_mean", "bn_mean", "none"),
        ("bn.running_var", "bn_var", "none"),
    ),
}
_SLOTS = ("input", "weight", "output")


class ImportReport(NamedTuple):
    """What an import did.

    ``copied``: ``{qjax variable or statistics path: torch source}``;
    ``qparams_checked``: scale/zero-point entries found equal to PyTorch's;
    ``switches``: ``{qjax statistics path: (observe, fake_quant)}`` from the torch flags.
    """

    copied: dict[str, str]
    qparams_checked: int
    switches: dict[str, tuple[bool, bool]]


def _sub(name: str, attr: str) -> str:
    return f"{name}.{attr}" if name else attr


def _layer_kind(tm):
    """``(kind, relu)`` of a torch QAT layer, or ``None``."""
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.nn.qat as nnqat
    from torch.ao.nn.intrinsic.qat.modules.conv_fused import _ConvBnNd

    if isinstance(tm, _ConvBnNd):
        relu = (nniqat.ConvBnReLU1d, nniqat.ConvBnReLU2d, nniqat.ConvBnReLU3d)
        return "conv_bn", isinstance(tm, relu)
    if isinstance(tm, nnqat.Linear):
        return "linear", isinstance(tm, nniqat.LinearReLU)
    if isinstance(tm, (nnqat.Conv1d, nnqat.Conv2d, nnqat.Conv3d)):
        return "conv", isinstance(tm, (nniqat.ConvReLU1d, nniqat.ConvReLU2d, nniqat.ConvReLU3d))
    return None


def _is_stub(tm) -> bool:
    from torch.ao.quantization import QuantStub

    return isinstance(tm, QuantStub) and is_fake_quant(getattr(tm, "activation_post_process", None))


def _auto_mapping(torch_model) -> dict:
    out, covered = {}, []
    for name, tm in torch_model.named_modules():
        if not name or any(name.startswith(c + ".") for c in covered):
            continue
        if _layer_kind(tm) or _is_stub(tm) or is_fake_quant(tm):
            out[name] = name.replace(".", "/")
            covered.append(name)
    return out


class _Importer:
    def __init__(self, torch_model, get_target, mapping, strict):
        self.tm, self.get_target, self.strict = torch_model, get_target, strict
        self.mapping = _auto_mapping(torch_model) if mapping is None else dict(mapping)
        self.copied: dict[str, str] = {}
        self.consumed: set[str] = set()
        self.skipped: list[str] = []
        self.filled: set[str] = set()
        self.flags: dict[str, list] = {}
        self.targets: dict[str, object] = {}
        self.n_qparams = 0

    def target(self, path):
        if path not in self.targets:
            self.targets[path] = self.get_target(path)
        return self.targets[path]

    def run(self):
        for tname, dest in self.mapping.items():
            try:
                tm = self.tm.get_submodule(tname)
            except AttributeError:
                raise ValueError(f"mapping: the torch model has no module {tname!r}") from None
            if dest is None:
                self.skipped.append(tname)
                continue
            if isinstance(dest, str):
                path, slot = dest, None
            elif isinstance(dest, (tuple, list)) and len(dest) == 2:
                path, slot = dest
            else:
                raise TypeError(
                    f"mapping[{tname!r}] must be a qjax path, (path, slot) or None, got {dest!r}"
                )
            if slot is not None and slot not in _SLOTS:
                raise ValueError(f"mapping[{tname!r}]: slot must be one of {_SLOTS}, got {slot!r}")
            kind = _layer_kind(tm)
            if kind is not None:
                self.layer(tname, tm, kind, path)
            elif _is_stub(tm):
                self.fake_quant(_sub(tname, "activation_post_process"), tm.activation_post_process,
                                path, slot)  # fmt: skip
            elif is_fake_quant(tm):
                self.fake_quant(tname, tm, path, slot)
            else:
                raise TypeError(
                    f"mapping[{tname!r}]: torch module is a {type(tm).__name__}; expected a QAT "
                    "layer (prepare_qat/prepare_qat_fx), a QuantStub or a fake-quant module"
                )
        for holder, flags in self.flags.items():
            if len(set(flags)) > 1:
                raise ValueError(
                    f"qjax '{holder}': its torch fake-quants have different observer/fake-quant "
                    f"flags {sorted(set(flags))}; qjax switches are per module"
                )
            self.targets_by_holder[holder].set_switches(*flags[0])
        return ImportReport(self.copied, self.n_qparams, {h: f[0] for h, f in self.flags.items()})

    @property
    def targets_by_holder(self):
        return {t.holder: t for t in self.targets.values()}

    def layer(self, tname, tm, kind_relu, path):
        kind, relu = kind_relu
        tgt = self.target(path)
        if tgt.kind != kind:
            raise TypeError(
                f"mapping[{tname!r}]: torch {type(tm).__name__} ({kind}) cannot go into qjax "
                f"{path!r} ({tgt.kind})"
            )
        tgt.check_layer(tm, f"torch '{tname}' -> qjax '{path}'")
        for tattr, qname, lay in PARAM_TABLE[kind]:
            src = tm
            for a in tattr.split("."):
                src = getattr(src, a)
            has_q = tgt.param(qname) is not None
            if src is None or not has_q:
                if (src is None) != (not has_q):
                    raise ValueError(
                        f"torch '{_sub(tname, tattr)}' is {'absent' if src is None else 'present'} "
                        f"but qjax '{path}/{qname}' is {'absent' if not has_q else 'present'}"
                    )
                continue
            # A copy: JAX may alias a NumPy buffer on CPU, and torch updates BN running
            # statistics in place; the two runs must not share memory.
            arr = src.detach().cpu().numpy().copy()
            layout = (
                conv_layout(arr.ndim, f"{_sub(tname, tattr)}") if lay == "conv" else get_layout(lay)
            )
            src_name = f"torch '{_sub(tname, tattr)}'"
            tgt.set_param(qname, to_flax(arr, layout, src_name), src_name)
            how = "" if layout.perm is None else f" ({layout.name}: {layout.rule})"
            self.copied[f"{path}/{qname}"] = f"{_sub(tname, tattr)}{how}"
        if kind == "conv_bn" and hasattr(tgt, "module"):
            tgt.module.freeze_bn = bool(tm.freeze_bn)
        self.fake_quant(_sub(tname, "weight_fake_quant"), tm.weight_fake_quant, path, "weight")
        out = getattr(tm, "activation_post_process", None)
        oname = _sub(tname, "activation_post_process")
        if is_fake_quant(out) and oname not in self.mapping:
            if relu and kind != "conv_bn":
                raise ValueError(
                    f"torch '{tname}' is a {type(tm).__name__}: its output fake-quant sits after "
                    f"the ReLU, qjax '{path}' quantizes before it; map {oname!r} to an ActQuant "
                    "placed after the ReLU (and give the layer a config without activation)"
                )
            self.fake_quant(oname, out, path, "output")

    def fake_quant(self, fname, fq, path, slot):
        tgt = self.target(path)
        if tgt.kind == "act":
            if slot not in (None, "output", "input"):
                raise ValueError(f"mapping[{fname!r}]: qjax {path!r} is an ActQuant (no {slot})")
            slot = None
        elif slot is None:
            raise ValueError(
                f"mapping[{fname!r}]: qjax {path!r} is a layer; name the quantizer, "
                f"({path!r}, 'input' | 'weight' | 'output')"
            )
        where = f"torch '{fname}' -> qjax '{tgt.holder or '<root>'}'" + (
            f" ({slot})" if slot else ""
        )
        spec_slot = slot or "activation"
        check_fake_quant(fq, tgt.config, spec_slot, where)
        stats = tgt.stats()
        cur = stats if slot is None else getattr(stats, slot, None)
        if cur is None:
            raise ValueError(f"{where}: the qjax module has no {slot} quantizer")
        key = f"{tgt.holder}/quant_stats" + (f"/{slot}" if slot else "")
        if key in self.filled:
            raise ValueError(f"{where}: {key} is already filled from another torch fake-quant")
        st = fake_quant_state(fq, tuple(np.shape(cur.min_val)), where)
        self.n_qparams += check_qparams(fq, st, tgt.config, spec_slot, where)
        tgt.set_stats(st if slot is None else stats._replace(**{slot: st}))
        self.filled.add(key)
        self.consumed.add(fname)
        self.copied[key] = fname
        flags = (bool(fq.observer_enabled[0]), bool(fq.fake_quant_enabled[0]))
        self.flags.setdefault(tgt.holder, []).append(flags)

    def check_coverage(self, holders_stats):
        torch_left = [
            n
            for n, m in self.tm.named_modules()
            if is_fake_quant(m)
            and n not in self.consumed
            and not any(n == s or n.startswith(s + ".") for s in self.skipped)
        ]
        qjax_left = []
        for holder, stats in holders_stats:
            if isinstance(stats, LayerStats):
                slots = [s for s in _SLOTS if getattr(stats, s) is not None]
            else:
                slots = [None]
            for s in slots:
                key = f"{holder}/quant_stats" + (f"/{s}" if s else "")
                if key not in self.filled:
                    qjax_left.append(key)
        if torch_left or qjax_left:
            raise ValueError(
                "import_qat: unmatched quantizers (strict=True). "
                f"torch fake-quants not imported: {torch_left or 'none'}; "
                f"qjax quantizers not filled: {qjax_left or 'none'}. "
                "Extend the mapping, map a torch module to None to skip it, or pass strict=False"
            )


def import_qat_state(torch_model, model, mapping: Mapping | None = None, *, strict=True):
    """Copy a PyTorch prepared-QAT model's weights, BN state and fake-quant observer
    state into the NNX ``model`` (in place; see the module docstring for the table).

    Float tensors are copied as float32 after the layout flip; observer ``min_val`` /
    ``max_val`` as float32, ``count`` int32. After the import the qjax model's forward in
    ``Mode.QAT`` continues the torch run (same statistics, same qparams).

    Returns an :class:`ImportReport`. Raises ``ValueError``/``TypeError`` naming the
    torch module and qjax path on any mismatch of type, shape, config or coverage.

    >>> import torch, torch.ao.quantization as tq
    >>> from qjax.flax import default_qat_qconfig, nnx as qn
    >>> m = tq.QuantStub(); m.qconfig = tq.get_default_qat_qconfig("x86")
    >>> _ = tq.prepare_qat(torch.nn.Sequential(m).train(), inplace=True)
    >>> stub = qn.QuantStub(default_qat_qconfig("qnnpack"))
    >>> import_qat_state(m, stub, {"": ""})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
      ...
    ValueError: torch 'activation_post_process' -> qjax '<root>': torch range [0, 127] vs ...
    """
    imp = _Importer(torch_model, lambda p: NnxTarget(model, p), mapping, strict)
    report = imp.run()
    if strict:
        holders = [(h, NnxTarget(model, h).stats()) for h in nnx_holders(model)]
        imp.check_coverage(holders)
    return report


def import_qat_variables(
    torch_model, variables, config, mapping: Mapping | None = None, *, strict=True
):
    """:func:`import_qat_state` for Linen: returns ``(new_variables, report)``.

    ``variables`` is ``model.init(...)``'s output (``params``, ``quant_stats``, and
    ``batch_stats`` for ``QuantConvBn``); it is not modified. ``config`` is the
    :class:`~qjax.flax.QuantConfig` of the quantized modules, or ``{path: config}``.
    Module attributes (``relu``, strides, BN momentum/eps, switches) are not in the
    variables, so unlike NNX they are not checked: keep them as in the torch model.

    >>> import torch, torch.ao.quantization as tq, jax, jax.numpy as jnp
    >>> from qjax.flax import default_qat_qconfig, linen as ql
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> m.qconfig = tq.get_default_qat_qconfig("x86")
    >>> _ = tq.prepare_qat(m.train(), inplace=True)
    >>> cfg = default_qat_qconfig("x86")
    >>> v = ql.QuantDense(2, config=cfg).init(jax.random.key(0), jnp.zeros((1, 3)))
    >>> v2, rep = import_qat_variables(m, v, cfg, {"0": ""})
    >>> v2["params"]["kernel"].shape, sorted(rep.copied)
    ((3, 2), ['/bias', '/kernel', '/quant_stats/output', '/quant_stats/weight'])
    """
    new = copy_tree(variables)
    imp = _Importer(torch_model, lambda p: LinenTarget(new, p, config), mapping, strict)
    report = imp.run()
    if strict:
        holders = [(h, LinenTarget(new, h, config).stats()) for h in linen_holders(new)]
        imp.check_coverage(holders)
    return new, report
