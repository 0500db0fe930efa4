"""from_torch, to_torch and replace_rnns keep what the converted module had: its Parameter
objects (frozen or trainable, tied to other modules, held by an optimiser made before), its
hooks, its training mode and the attributes a user set; a module registered in two places
gets one replacement. Compared with torch.nn in float64."""

from __future__ import annotations

import pytest
import torch
from helpers import seed
from tolerances import assert_close
from torch import nn
from torch.nn.utils import prune

import rnn_fused

TORCH_CLASSES = [nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell]


def _input(module: nn.Module) -> tuple:
    if isinstance(module, nn.RNNCellBase):
        return (torch.randn(3, module.input_size, dtype=torch.float64),)
    return (torch.randn(4, 3, module.input_size, dtype=torch.float64),)


def _first(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("cls", TORCH_CLASSES, ids=lambda c: c.__name__)
def test_from_torch_keeps_parameters_hooks_and_attributes(cls):
    seed("from_torch keeps", cls.__name__)
    theirs = cls(5, 6).double().eval()
    next(theirs.parameters()).requires_grad_(False)  # weight_ih(_l0): frozen
    calls = []
    handle = theirs.register_forward_hook(lambda m, args, out: calls.append(type(m)))
    theirs.note = "kept"
    params = dict(theirs.named_parameters())
    ours = getattr(rnn_fused, cls.__name__).from_torch(theirs)
    assert dict(ours.named_parameters()) == params  # the same objects, in the same order
    assert [p.requires_grad for p in ours.parameters()] == [
        p.requires_grad for p in params.values()
    ]
    assert not ours.training and ours.note == "kept"
    args = _input(theirs)
    assert_close(_first(ours(*args)), _first(theirs(*args)), "outputs")
    assert calls == [type(ours), cls]
    handle.remove()  # from the original; the converted module keeps its copy
    ours(*args)
    theirs(*args)
    assert calls == [type(ours), cls, type(ours)]
    back = ours.to_torch()
    assert type(back) is cls and dict(back.named_parameters()) == params
    assert back.note == "kept" and not hasattr(back, "zoneout")  # a user's, not ours


def test_replace_rnns_keeps_ties_sharing_and_optimisers():
    seed("replace ties")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.LSTM(3, 3)
            self.b = self.a  # one module registered twice
            self.c = nn.LSTM(3, 3)
            self.c.weight_hh_l0 = self.a.weight_hh_l0  # one weight in two modules

        def forward(self, x):
            return self.a(x)[0] + self.b(x)[0] + self.c(x)[0]

    model = Model().double()
    expected_model = Model().double()
    expected_model.load_state_dict(model.state_dict())
    expected_model.c.weight_hh_l0 = expected_model.a.weight_hh_l0
    params = list(model.parameters())
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    rnn_fused.replace_rnns(model)
    assert isinstance(model.a, rnn_fused.LSTM) and model.a is model.b
    assert model.c.weight_hh_l0 is model.a.weight_hh_l0
    assert list(model.parameters()) == params
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    model(x).sum().backward()
    expected_model(x).sum().backward()
    for ours, theirs in zip(model.parameters(), expected_model.parameters(), strict=True):
        assert_close(ours.grad, theirs.grad, "gradient through shared and tied weights")
    before = model.a.weight_hh_l0.detach().clone()
    optimiser.step()  # made before the replacement, it steps the replaced modules' weights
    assert not torch.equal(model.a.weight_hh_l0, before)


def test_replace_rnns_leaves_subclasses():
    class Custom(nn.LSTM):
        pass

    model = nn.Sequential(Custom(3, 4), nn.GRU(4, 4))
    rnn_fused.replace_rnns(model)
    assert type(model[0]) is Custom and isinstance(model[1], rnn_fused.GRU)


def test_from_torch_refuses_moved_weights_by_name():
    lstm = nn.LSTM(3, 4)
    prune.l1_unstructured(lstm, "weight_hh_l0", amount=0.5)
    with pytest.raises(TypeError, match="weight_hh_l0 is not a parameter of the LSTM"):
        rnn_fused.LSTM.from_torch(lstm)
    with pytest.raises(TypeError, match="weight_hh_l0 is not a parameter"):
        rnn_fused.replace_rnns(nn.Sequential(lstm))


@pytest.mark.parametrize(
    "hx",
    [
        lambda h, c: torch.stack([h, c]),
        lambda h, c: h,
        lambda h, c: (h, None),
        lambda h, c: (None, c),
        lambda h, c: (None, None),
    ],
    ids=["stacked", "tensor", "c None", "h None", "both None"],
)
def test_lstm_cell_refuses_what_is_not_two_tensors(hx):
    cell = rnn_fused.LSTMCell(3, 5)
    h, c = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(TypeError, match=r"argument 'hx' \(position 2\) must be tuple of Tensors"):
        cell(torch.randn(4, 3), hx(h, c))


@pytest.mark.parametrize("count", [1, 3])
def test_lstm_wants_two_states(count):
    h = torch.randn(1, 2, 4)
    with pytest.raises(RuntimeError, match=r"^lstm_cell expects two hidden states$"):
        rnn_fused.LSTMCell(3, 4)(torch.randn(2, 3), (h[0],) * count)
    with pytest.raises(RuntimeError, match=r"^lstm expects two hidden states$"):
        rnn_fused.LSTM(3, 4)(torch.randn(5, 2, 3), (h,) * count)
    with pytest.raises(TypeError, match=r"^lstm\(\): argument 'hx' .* not Tensor$"):
        rnn_fused.LSTM(3, 4)(torch.randn(5, 2, 3), h)
    with pytest.raises(TypeError, match=r"not tuple of \(Tensor, NoneType\)$"):
        rnn_fused.LSTM(3, 4)(torch.randn(5, 2, 3), (h, None))
