"""PTQ presets: ``default_qconfig(backend)`` calibrates to the qparams torch's
``get_default_qconfig(backend)`` observers compute from the same tensors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qjax.flax import Mode, default_qconfig
from qjax.flax.nnx import QuantLinear, QuantStub, calibrate, set_mode

torch = pytest.importorskip("torch")


def _torch_qparams(observer, tensors):
    for t in tensors:
        observer(torch.from_numpy(np.asarray(t)))
    s, z = observer.calculate_qparams()
    return s.numpy().astype(np.float32), z.numpy().astype(np.int64)


def _qjax_qparams(cfg, spec, factory, state):
    qp = factory(spec, cfg.compat).qparams(state)
    return np.asarray(qp.scale, np.float32), np.asarray(qp.zero_point, np.int64)


@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_default_qconfig_calibrates_like_torch(backend):
    cfg = default_qconfig(backend)
    model = nnx.Sequential(QuantStub(cfg), QuantLinear(12, 7, config=cfg, rngs=nnx.Rngs(3)))
    rng = np.random.default_rng(5)
    # skewed, heavy-tailed batches so the histogram search has something to clip
    batches = [(rng.standard_t(3, (16, 12)) * 0.7 + 0.4).astype(np.float32) for _ in range(4)]
    set_mode(model, Mode.CALIBRATE)
    outs = [np.asarray(model(jnp.asarray(b))) for b in batches]  # == float: no fake-quant
    set_mode(model, Mode.FROZEN)

    tq = torch.ao.quantization.get_default_qconfig(backend)
    stub, lin = model.layers[0], model.layers[1]
    got_in = _qjax_qparams(
        cfg, cfg.activation, cfg.activation_observer, stub.quant_stats.get_value()
    )
    want_in = _torch_qparams(tq.activation(), batches)
    st = lin.quant_stats.get_value()
    got_out = _qjax_qparams(cfg, cfg.activation, cfg.activation_observer, st.output)
    want_out = _torch_qparams(tq.activation(), outs)
    got_w = _qjax_qparams(cfg, cfg.weight, cfg.weight_observer, st.weight)
    kernel = np.asarray(lin.kernel[...])
    want_w = _torch_qparams(tq.weight(), [np.ascontiguousarray(kernel.T)])  # torch (out, in)
    for got, want, what in (
        (got_in, want_in, "input"),
        (got_out, want_out, "output"),
        (got_w, want_w, "weight"),
    ):
        np.testing.assert_array_equal(got[0].reshape(want[0].shape), want[0], err_msg=what)
        np.testing.assert_array_equal(got[1].reshape(want[1].shape), want[1], err_msg=what)


def test_default_qconfig_ptq_end_to_end_serves():
    import qjax

    cfg = default_qconfig("x86")
    model = nnx.Sequential(QuantStub(cfg), QuantLinear(8, 4, config=cfg, rngs=nnx.Rngs(0)))
    batches = [jax.random.normal(jax.random.key(i), (8, 8)) for i in range(3)]
    calibrate(model, batches)
    assert model.layers[1].mode is Mode.FROZEN
    served = qjax.convert(model, batches[0][:1])
    y = np.asarray(served(batches[0]))
    assert y.shape == (8, 4) and np.isfinite(y).all()


def test_default_qconfig_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        default_qconfig("arm")
