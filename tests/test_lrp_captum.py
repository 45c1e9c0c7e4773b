"""``LRP`` follows Captum's attribution contract; LRP-0 on ReLU networks is Input x Gradient."""
from __future__ import annotations

import pytest
import torch
from captum.attr import GradientAttribution, InputXGradient
from torch import nn

from lime_attr import LRP, Composite
from lime_attr.rules import Epsilon

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients")

DT = torch.float64
GRADIENT = Composite([("site:layer", "gradient"), ("site:activation", "gradient")], name="gradient")
LRP0 = Composite([("site:layer", Epsilon(0.0)), ("site:activation", "identity")], name="lrp0")


def relu_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 4)).to(DT)


def relu_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(5, 6, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 7), nn.ReLU(), nn.Linear(7, 3)).to(DT)


class Linear3D(nn.Module):
    """A linear model with a [batch, 4, 5] output (for tuple targets)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(6, 20).to(DT)

    def forward(self, x):
        return self.lin(x).reshape(x.shape[0], 4, 5)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a = nn.Linear(6, 3).to(DT)
        self.b = nn.Conv1d(2, 3, 4).to(DT)

    def forward(self, x, y, scale=1.0, shift=None):
        out = self.a(x) + self.b(y).sum(-1) * scale
        return out if shift is None else out + shift


class Scalar(nn.Module):
    def __init__(self, keepdim: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(6, 1).to(DT)
        self.keepdim = keepdim

    def forward(self, x):
        out = self.lin(x)
        return out if self.keepdim else out[:, 0]


# ----------------------------------------------------------------- 5. LRP-0 equals Input x Gradient


@pytest.mark.parametrize("factory,shape", [(relu_mlp, (5, 6)), (relu_cnn, (3, 3, 8, 8))])
@pytest.mark.parametrize("composite", [LRP0, "attnlrp", "cp-lrp"])
def test_lrp0_on_relu_network_equals_input_x_gradient(factory, shape, composite):
    model = factory()
    x = torch.randn(shape, dtype=DT)
    target = [0, 2, 1, 0, 2][: shape[0]]
    ours = LRP(model, composite).attribute(x, target=target)
    ref = InputXGradient(model).attribute(x, target=target)
    assert torch.equal(ours, ref)


# ------------------------------------------------------------------------ 6. Captum's target formats

TARGETS_2D = {
    "int": 2,
    "negative int": -1,
    "list of ints": [0, 3, 1],
    "1-D tensor": torch.tensor([1, 1, 2]),
    "scalar tensor": torch.tensor(3),
    "tuple": (2,),
}


@pytest.mark.parametrize("name", sorted(TARGETS_2D))
def test_target_formats_2d_match_captum(name):
    target = TARGETS_2D[name]
    model = relu_mlp()
    x = torch.randn(3, 6, dtype=DT)
    ours = LRP(model, LRP0).attribute(x, target=target)
    ref = InputXGradient(model).attribute(x, target=target)
    assert ours.shape == ref.shape == x.shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("target", [(1, 3), [(0, 0), (3, 4)], (2,)], ids=["tuple", "list of tuples", "short tuple"])
def test_tuple_targets_for_3d_outputs(target):
    model = Linear3D()
    x = torch.randn(2, 6, dtype=DT)
    if target == (2,):  # selects a whole row: not one scalar per example
        with pytest.raises(ValueError, match="one scalar per example"):
            LRP(model, GRADIENT).attribute(x, target=target)
        return
    ours = LRP(model, GRADIENT).attribute(x, target=target)
    ref = InputXGradient(model).attribute(x, target=target)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("keepdim", [True, False])
def test_none_target_for_scalar_outputs(keepdim):
    model = Scalar(keepdim)
    x = torch.randn(4, 6, dtype=DT)
    ours, delta = LRP(model, "attnlrp").attribute(x, return_convergence_delta=True)
    ref = InputXGradient(model).attribute(x)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(delta, model.lin.bias.detach().expand(4), rtol=1e-10, atol=1e-12)


def test_tuple_inputs_and_additional_forward_args():
    model = TwoInputs()
    x, y = torch.randn(3, 6, dtype=DT), torch.randn(3, 2, 7, dtype=DT)
    extra = (torch.tensor(0.5, dtype=DT), torch.randn(3, 3, dtype=DT))
    ours = LRP(model, GRADIENT).attribute((x, y), target=1, additional_forward_args=extra)
    ref = InputXGradient(model).attribute((x, y), target=1, additional_forward_args=extra)
    assert isinstance(ours, tuple) and len(ours) == 2
    assert ours[0].shape == x.shape and ours[1].shape == y.shape
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # a single (non-tuple) additional arg works too, and changes the result as it should
    single = LRP(model, GRADIENT).attribute((x, y), target=1, additional_forward_args=2.0)
    torch.testing.assert_close(single[1], 4 * ours[1], rtol=1e-12, atol=1e-14)
    # a tensor input keeps being a tensor; a 1-tuple stays a tuple
    assert isinstance(LRP(model.a, GRADIENT).attribute((x,), target=0), tuple)
    assert isinstance(LRP(model.a, GRADIENT).attribute(x, target=0), torch.Tensor)


def test_convergence_delta_is_output_minus_relevance_per_example():
    model = relu_mlp()
    x = torch.randn(5, 6, dtype=DT)
    target = [0, 1, 2, 3, 0]
    attr, delta = LRP(model, "epsilon-plus").attribute(x, target=target, return_convergence_delta=True)
    out = model(x).detach()[torch.arange(5), target]
    assert delta.shape == (5,)
    torch.testing.assert_close(delta, out - attr.sum(1), rtol=0, atol=1e-12)
    # biases absorb relevance: the delta is not zero here, but it is zero for a bias-free network
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.bias = None
    _, delta0 = LRP(model, LRP0).attribute(x, target=target, return_convergence_delta=True)
    assert float(delta0.abs().max()) < 1e-12


def test_properties_and_base_class():
    lrp = LRP(relu_mlp(), "epsilon-plus")
    assert isinstance(lrp, GradientAttribution)
    assert lrp.has_convergence_delta() is True
    assert lrp.multiplies_by_inputs is True
    assert lrp.forward_func is lrp.model


def test_inputs_that_require_grad_and_batch_independence():
    model = relu_mlp()
    x = torch.randn(4, 6, dtype=DT, requires_grad=True)
    full = LRP(model, "epsilon-plus").attribute(x, target=1)
    assert not full.requires_grad
    parts = torch.cat([LRP(model, "epsilon-plus").attribute(x[i:i + 1].detach(), target=1) for i in range(4)])
    torch.testing.assert_close(full, parts, rtol=1e-12, atol=1e-14)
    assert x.grad is None  # the user's tensor is not touched


def test_float32_models_work():
    model = relu_mlp().float()
    x = torch.randn(2, 6)
    attr, delta = LRP(model, LRP0).attribute(x, target=0, return_convergence_delta=True)
    assert attr.dtype == torch.float32
    torch.testing.assert_close(attr, InputXGradient(model).attribute(x, target=0))
