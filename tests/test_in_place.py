"""In-place updates that a traced graph cannot rewrite out of place (a view updated in place, ``x[i] = v``,
``v += g`` on a slice): ``convert`` never returns a model that computes something else -- such a model is explained at
run time, where the forward runs as written -- and the explanation conserves."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import torchlrp as lrp

UPDATES = {
    "mul_ on a slice": lambda h, g: h[:, :2].mul_(3.0),
    "+= on a view": lambda h, g: h[:, :2].__iadd__(g[:, :2]),
    "+= on a named view": None,  # written out in the forward (fx records it out of place)
    "+= on an alias": None,
    "h[:, :2] += g": None,
    "index_put_": lambda h, g: h.index_put_((torch.tensor([0]),), g[:1] * 2),
    "masked_fill_ on a slice": lambda h, g: h[:, 1:].masked_fill_(h[:, 1:] > 0.5, 0.0),
    "x[i] = v": lambda h, g: h.__setitem__((slice(None), 0), g[:, 0] * 2),
}


class _Updating(torch.nn.Module):
    def __init__(self, update):
        super().__init__()
        self.update = update
        self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
        self.head = torch.nn.Linear(4, 2, bias=False)

    def forward(self, x):
        h = F.relu(self.conv(x)).clone()
        g = h.flip(1)
        if self.update == "+= on a named view":
            view = h[:, :2]
            view += g[:, :2]
        elif self.update == "+= on an alias":
            alias = h
            alias += g
        elif self.update == "h[:, :2] += g":
            h[:, :2] += g[:, :2]
        else:
            UPDATES[self.update](h, g)
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("update", UPDATES)
def test_a_model_updating_a_view_in_place_computes_what_it_computes(update):
    torch.manual_seed(0)
    model = _Updating(update).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = lrp.convert(model)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)
    relevance, report = lrp.explain(converted, x, rule="zero", start="logit", return_conservation=True)
    assert report.conserved() and torch.isfinite(relevance).all() and float(relevance.abs().sum()) > 0
    assert any("in place" in str(w.message) or "cannot trace" in str(w.message) for w in caught)


def test_an_update_in_place_that_nothing_reads_again_stays_traced():
    """The control: ``relu_`` of a value read by nothing else is rewritten out of place in the traced graph."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.Linear(4, 2, bias=False)

        def forward(self, x):
            return self.head(self.conv(x).relu_().mean((2, 3)))

    model = Net().double().eval()
    converted = lrp.convert(model)
    assert isinstance(converted, torch.fx.GraphModule)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)
