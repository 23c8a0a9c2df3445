"""``import_model`` checks a converted torch model's qparams as every qjax loader does
(:func:`qjax._spec.check_qparam_values`: scales finite and > 0 in float32, zero points
in the dtype's range; int8 layers' biases finite) and names the layer: torch keeps such
values in a module, and before this check they were imported silently (NaN outputs or
different numbers) or ended in torch's own RuntimeError."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tq = pytest.importorskip("torch.ao.quantization")
from qjax.converters.torch import import_model  # noqa: E402 (needs torch)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

NAN, INF = math.nan, math.inf


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.fc = torch.nn.Linear(27, 4)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.fc(torch.flatten(self.conv(self.quant(x)), 1)))


X = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(1))


def _converted():
    torch.backends.quantized.engine = "x86"
    torch.manual_seed(0)
    m = Net().eval()
    m.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(m, inplace=True)
    m(torch.randn(8, 2, 5, 5))
    return tq.convert(m)


def _weight(layer, scales=None, zero_points=None, bias=None):
    def edit(m):
        mod = getattr(m, layer)
        w, b = mod.weight(), mod.bias()
        s = w.q_per_channel_scales() if scales is None else torch.tensor(scales, dtype=torch.double)
        z = w.q_per_channel_zero_points() if zero_points is None else torch.tensor(zero_points)
        w = torch._make_per_channel_quantized_tensor(w.int_repr(), s, z, 0)
        if bias is not None:
            b = b.detach().clone()
            b[0] = bias
        mod.set_weight_bias(w, b)

    return edit


def _attr(layer, **values):
    def edit(m):
        for k, v in values.items():
            setattr(getattr(m, layer), k, v)

    return edit


# (case, edit, message; what happened before)
CASES = [
    (  # before: imported; NaN outputs (torch's too)
        "fc output scale NaN",
        _attr("fc", scale=NAN),
        r"layer 'fc' output qparams scale must be finite and > 0, got nan",
    ),
    (  # before: imported; outputs differ from torch's
        "conv output scale 0",
        _attr("conv", scale=0.0),
        r"layer 'conv' output qparams scale must be finite and > 0, got 0.0",
    ),
    (  # before: imported (torch runs it too)
        "conv output zero point 700",
        _attr("conv", zero_point=700),
        r"layer 'conv' output qparams zero_point 700 is outside the spec range \[0, 255\]",
    ),
    (  # before: imported; outputs differ from torch's
        "stub scale NaN",
        _attr("quant", scale=torch.tensor([NAN])),
        r"layer 'quant' input qparams scale must be finite and > 0, got nan",
    ),
    (  # before: ValueError without the layer ("QArray scale ...")
        "conv weight scale NaN",
        _weight("conv", scales=[NAN, 0.1, 0.1]),
        r"layer 'conv': weight scale must be finite and > 0, got \[nan\]",
    ),
    (
        "fc weight scale 0",
        _weight("fc", scales=[0.0, 0.1, 0.1, 0.1]),
        r"layer 'fc': weight scale must be finite and > 0, got \[0.0\]",
    ),
    (
        "fc weight zero point 200",
        _weight("fc", zero_points=[200, 0, 0, 0]),
        r"layer 'fc': weight zero_point \[200\] .*outside the spec range \[-128, 127\]",
    ),
    (  # before: imported; outputs differ from torch's
        "fc bias NaN",
        _weight("fc", bias=NAN),
        r"layer 'fc': bias must be finite, got nan",
    ),
    ("conv bias inf", _weight("conv", bias=INF), r"layer 'conv': bias must be finite, got inf"),
]


def test_untampered_model_imports_exactly():
    m = _converted()
    np.testing.assert_array_equal(np.asarray(import_model(m, (X,))(X.numpy())), m(X).numpy())


@pytest.mark.parametrize("edit, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_module_qparams_are_named(edit, pattern):
    m = _converted()
    edit(m)
    with pytest.raises(ValueError, match=pattern):
        import_model(m, (X,))


def test_output_zero_point_700_is_refused_before_torch_runs():
    """torch itself fails late on this one (a RuntimeError naming the consumer 'dequant'):
    import_model checks every module's qparams before it runs the model."""
    m = _converted()
    m.fc.zero_point = 700
    with pytest.raises(ValueError, match=r"layer 'fc' output qparams zero_point 700"):
        import_model(m, (X,))


def test_torch_failure_during_import_names_the_node():
    """torch's own RuntimeError while import_model runs the model (here: inputs with the
    wrong channel count for the first conv) says which fx node failed."""
    m = _converted()
    with pytest.raises(RuntimeError, match=r"torch failed running node 'conv' \(op=call_module"):
        import_model(m, (torch.randn(2, X.shape[1] + 1, *X.shape[2:]),))
