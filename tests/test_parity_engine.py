"""The rulebook names an import for the wrong torch engine (rules 11-17)."""

import numpy as np

from qjax.parity import _rules as rules


def _ev(**kw):
    base = dict(
        name="fc",
        kind="linear",
        engine="qnnpack",
        codes=np.array([5, 7, 9]),
        ref_codes=np.array([5, 6, 9]),
        reference_engine="fbgemm",
    )
    base.update(kw)
    return rules.LayerEvidence(**base)


def test_engine_mismatch_named_with_count_and_fix():
    (cause,) = [c for c in rules.diagnose(_ev()) if c.name == "engine_mismatch"]
    assert cause.rule == "11-17" and cause.strength == "likely"
    assert "1 outputs differ (up to 1 LSB)" in cause.message
    assert "'qnnpack'" in cause.message and "'fbgemm'" in cause.message
    assert cause.fix == "import with engine='fbgemm', the engine torch ran"


def test_engine_mismatch_not_named_when_it_cannot_be_the_cause():
    assert rules.engine_mismatch(_ev(reference_engine="qnnpack")) is None  # same engine
    assert rules.engine_mismatch(_ev(engine="fbgemm_avx2")) is None  # FBGEMM emulation
    assert rules.engine_mismatch(_ev(reference_engine=None)) is None  # unknown
    assert rules.engine_mismatch(_ev(input_differs=True)) is None  # inherited
    assert rules.engine_mismatch(_ev(reference_kind="hand")) is None
    assert rules.engine_mismatch(_ev(ref_codes=np.array([5, 7, 9]))) is None  # no mismatch


def test_import_model_records_its_engine():
    import warnings

    import torch
    from qjax.converters.torch import import_model
    from torch.ao.quantization import DeQuantStub, QuantStub, convert, prepare

    torch.manual_seed(0)
    m = torch.nn.Sequential(QuantStub(), torch.nn.Linear(3, 2), DeQuantStub()).eval()
    m.qconfig = torch.ao.quantization.get_default_qconfig("qnnpack")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = prepare(m)
        p(torch.randn(8, 3))
        qm = convert(p)
    program = import_model(qm, (torch.randn(2, 3),), engine="qnnpack")
    assert program.engine == "qnnpack"
