"""Recurrent hidden units (nn.LSTM / nn.GRU / nn.RNN): found, scored by every score, cut with every gate
together, stacked and bidirectional layers kept consistent, saved and loaded (flowprune.recurrent)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flowprune as fp
from flowprune.cut import apply_cuts
from flowprune.errors import FlowpruneError
from flowprune.recurrent import gates, unit_rows
from flowprune.units import find_units

CELLS = [nn.LSTM, nn.GRU, nn.RNN]


class Stack(nn.Module):
    """Linear embedding -> rnn (``layers``, maybe bidirectional, batch_first) -> rnn2 (time first) -> fc."""

    def __init__(self, cell=nn.LSTM, bidirectional=True, layers=2, hidden=6):
        super().__init__()
        d = 2 if bidirectional else 1
        self.inp = nn.Linear(1, 8)
        self.rnn = cell(8, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.rnn2 = cell(hidden * d, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x.unsqueeze(-1)))
        o, _ = self.rnn(h)
        o, _ = self.rnn2(o.transpose(0, 1))
        return self.fc(o[-1])


def _zero_units(rnn: nn.Module, units: list[int]) -> None:
    """Zero every gate row of hidden ``units`` in every layer and direction: their state stays 0 from a
    zero initial state (LSTM: g = tanh(0) = 0 so c = 0 and h = 0; GRU: n = 0 and h' = h / 2; RNN: tanh(0))."""
    h, g = rnn.hidden_size, gates(rnn)
    rows = [k * h + j for k in range(g) for j in units]
    with torch.no_grad():
        for p in rnn.parameters():
            p[rows] = 0.0


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bidirectional, layers", [(False, 1), (False, 2), (True, 1), (True, 2)])
def test_cut_of_silent_units_leaves_outputs_unchanged(cell, bidirectional, layers):
    torch.manual_seed(0)
    m = Stack(cell, bidirectional, layers).eval()
    _zero_units(m.rnn, [1, 3])
    x = torch.randn(4, 10)
    before = m(x)
    cut = apply_cuts(m, {"rnn": [1, 3]}, example_inputs=x)
    g, d = gates(m.rnn), 2 if bidirectional else 1
    assert cut.rnn.hidden_size == 4 and cut.rnn2.input_size == 4 * d
    assert tuple(cut.rnn.weight_ih_l0.shape) == (g * 4, 8) and tuple(cut.rnn.weight_hh_l0.shape) == (g * 4, 4)
    if layers == 2:
        assert tuple(cut.rnn.weight_ih_l1.shape) == (g * 4, 4 * d)
    assert tuple(cut.rnn2.weight_ih_l0.shape) == (g * 5, 4 * d)
    assert torch.allclose(cut(x), before, atol=1e-6)
    # the same cut of two live units does change the outputs: the check above can fail
    live = apply_cuts(m, {"rnn": [0, 2]}, example_inputs=x)
    assert (live(x) - before).abs().max() > 1e-3
    assert m.rnn.hidden_size == 6  # the caller's model is not changed


def test_the_stack_is_three_units_with_the_right_consumers():
    m = Stack(nn.LSTM, True, 2)
    units = find_units(m, torch.randn(1, 10))
    by = units.by_name()
    assert [(u.name, u.kind, u.size) for u in units] == [("inp", "neuron", 8), ("rnn", "recurrent", 6),
                                                         ("rnn2", "recurrent", 5)]
    assert [c.module_name for c in by["inp"].consumers] == ["rnn"]
    assert [c.module_name for c in by["rnn"].consumers] == ["rnn2"]
    assert [c.module_name for c in by["rnn2"].consumers] == ["fc"]
    # bidirectional: unit j is output channels j and H + j (both directions), cut together
    assert by["rnn"].classes == [[j, j + 6] for j in range(6)]
    assert by["rnn"].consumers[0].root_idxs.tolist() == list(range(6)) * 2


def test_torch_pruning_lstm_pruner_breaks_the_lstm():
    """Why flowprune has its own rule: Torch-Pruning 1.6.1's LSTM out-channel pruning cannot cut one
    hidden unit of a plain LSTM (it indexes weight_ih's input dimension with the gate-expanded indices;
    had it got that far, weight_hh would lose one row per unit instead of four)."""
    import torch_pruning as tp

    lstm = nn.LSTM(3, 4, batch_first=True)
    with pytest.raises((IndexError, RuntimeError)):
        tp.pruner.function.prune_lstm_out_channels(lstm, [1])
        lstm(torch.randn(2, 5, 3))


def test_unit_rows_hold_every_gate_row_of_the_unit():
    lstm = nn.LSTM(3, 2, num_layers=2, bidirectional=True)
    rows = unit_rows(lstm)
    # per direction and layer: 4 gates x (inputs + 2 recurrent + 2 biases); layer 1 reads 2 x 2 features
    assert tuple(rows.shape) == (4, 4 * (3 + 2 + 2) + 4 * (4 + 2 + 2))
    w = lstm.weight_ih_l0_reverse.detach()
    assert torch.equal(rows[3, :12], torch.cat([w[1], w[3], w[5], w[7]]))  # reverse direction, unit 1


def test_final_state_consumer_is_left_intact_with_a_reason():
    class LastState(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(1, 6, batch_first=True)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            _, h = self.rnn(x.unsqueeze(-1))
            return self.fc(h[-1])

    units = find_units(LastState(), torch.randn(2, 10))
    assert "rnn" not in units.by_name()
    assert "h_n" in units.reasons["rnn"]


def test_an_lstm_with_projections_is_left_intact():
    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(1, 6, batch_first=True, proj_size=3)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.rnn(x.unsqueeze(-1))[0][:, -1])

    units = find_units(Proj(), torch.randn(2, 10))
    assert "rnn" not in units.by_name() and "proj_size" in units.reasons["rnn"]


def test_an_unknown_unit_kind_names_the_allowed_ones():
    with pytest.raises(FlowpruneError, match="recurrent"):
        find_units(Stack(), torch.randn(1, 10), kinds=("recurrent", "gates"))


@pytest.fixture(scope="module")
def seq_batches(mnist1d_data):
    return mnist1d_data.calibration_batches(32, 2, seed=0)


@pytest.mark.parametrize("score", fp.list_scores())
def test_every_score_ranks_a_silent_hidden_unit_last(score, seq_batches):
    torch.manual_seed(0)
    m = fp.build_model("lstm1d", (1, 40), 10, hidden=8, layers=2, bidirectional=True).eval()
    _zero_units(m.rnn, [5])
    units = find_units(m, seq_batches[0][0][:1])
    s = fp.get_score(score)(m, units, seq_batches)["rnn"]
    assert s.shape == (8,) and torch.isfinite(s).all()
    if score == "random":
        assert torch.equal(s, fp.get_score(score)(m, units, seq_batches)["rnn"])
        return
    # a unit whose state is always 0 writes nothing and carries no flow: every score gives it 0
    assert s[5] == 0
    others = torch.cat([s[:5], s[6:]])
    assert (others > 0).all()


@pytest.mark.parametrize("name, kw", [("lstm1d", {}), ("gru1d", {"layers": 2, "bidirectional": True, "hidden": 16})])
def test_prune_halves_the_hidden_units_runs_and_round_trips(name, kw, seq_batches, tmp_path):
    torch.manual_seed(0)
    m = fp.build_model(name, (1, 40), 10, **kw)
    h = m.rnn.hidden_size
    res = fp.prune(m, seq_batches, method="agf", ratio=0.5, budget="layer")
    p = res.model
    assert p.rnn.hidden_size == h // 2 and p.fc.in_features == m.fc.in_features // 2
    x, y = seq_batches[0]
    p.train()
    loss = nn.functional.cross_entropy(p(x), y)
    loss.backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in p.parameters())
    fp.save(p, tmp_path / "m")
    q = fp.load(tmp_path / "m")
    assert q.rnn.hidden_size == h // 2
    assert torch.allclose(q(x), p.eval()(x), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's flat weights need a GPU")
def test_a_cut_lstm_runs_on_cudnn():
    m = Stack(nn.LSTM, True, 2).cuda().eval()
    x = torch.randn(4, 10, device="cuda")
    cut = apply_cuts(m, {"rnn": [0, 1]}, example_inputs=x)
    out = cut(x)
    ref = cut.cpu()(x.cpu())
    assert torch.allclose(out.cpu(), ref, atol=1e-4)


def test_a_macs_target_is_met_on_a_stacked_bidirectional_gru():
    # the recurrent and inner-layer weights scale with the square of the kept hidden units: the planner's
    # MACs model must know it to land on the target (a linear model lands far off and its corrections oscillate)
    from flowprune.measure import count_macs_params

    torch.manual_seed(0)
    m = fp.build_model("gru1d", (1, 40), 10, hidden=32, layers=2, bidirectional=True)
    x, y = torch.randn(16, 1, 40), torch.randint(0, 10, (16,))
    res = fp.prune(m, [(x, y)], method="l1", target_macs=2.0, budget="global")
    reduction = count_macs_params(m)[0] / count_macs_params(res.model)[0]
    assert abs(reduction / 2.0 - 1) <= 0.03
