"""Telemetry: MoE routing statistics checked against the layers by hand, and the metrics writer
read back with TensorBoard's own reader and with ``read_csv_metrics``."""

import math
import os
import sys
import warnings

import pytest
import torch
from torch import nn

import moesaic
from moesaic.telemetry import MetricsWriter, MoEStatsAccumulator, collect_moe_stats, read_csv_metrics

D, E, S = 8, 4, 32  # capacity = max(ceil(S / E * 0.5 * 2), 4) = 8 < 16 routes per expert on average


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = moesaic.MoE(D, nn.Linear(D, D), num_experts=E, k=2, capacity_factor=0.5)

    def forward(self, x):
        return x + self.mlp(x)[0]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = Net()
    moesaic.name_moe_layers(model)
    return model


NAMES = ["layers.0.mlp", "layers.1.mlp"]
KEYS = {"tokens_per_expert", "routes_per_expert", "dropped_fraction", "l_aux", "z_loss", "seq_aux_loss",
        "unrouted_tokens", "load_imbalance"}


def moe(model, name):
    return dict(model.named_modules())[name]


# --- collect_moe_stats --------------------------------------------------------------------------

def test_collect_matches_layer_attributes(net):
    net(torch.randn(S, D))
    stats = collect_moe_stats(net)
    assert list(stats) == NAMES
    for name in NAMES:
        layer, st = moe(net, name), stats[name]
        assert set(st) == KEYS
        assert st["tokens_per_expert"] == layer.tokens_per_expert.tolist()
        assert st["routes_per_expert"] == layer.exp_counts.tolist()
        assert all(type(v) is int for v in st["tokens_per_expert"] + st["routes_per_expert"])
        assert sum(st["routes_per_expert"]) == layer.num_routes == S * 2
        assert sum(st["tokens_per_expert"]) == layer.num_routes - layer.num_dropped_routes
        assert layer.num_dropped_routes > 0  # capacity_factor=0.5 drops routes
        assert st["dropped_fraction"] == layer.num_dropped_routes / layer.num_routes
        assert st["l_aux"] == layer.l_aux.item() and type(st["l_aux"]) is float
        assert st["z_loss"] == 0.0
        routes = st["routes_per_expert"]
        assert st["load_imbalance"] == pytest.approx(max(routes) / (sum(routes) / E))


def test_collect_skips_layers_without_forward(net):
    assert collect_moe_stats(net) == {}
    moe(net, "layers.1.mlp")(torch.randn(S, D))
    assert list(collect_moe_stats(net)) == ["layers.1.mlp"]


def test_no_routes_gives_zero_imbalance_and_drops(net):
    layer = moe(net, "layers.0.mlp")
    layer(torch.randn(S, D), used_token=torch.zeros(S))
    st = collect_moe_stats(layer)["layers.0.mlp"]
    assert st["routes_per_expert"] == [0] * E and st["load_imbalance"] == 0.0 and st["dropped_fraction"] == 0.0


def test_duplicate_names_raise():
    torch.manual_seed(0)
    model = Net()  # both layers keep the default name "ep_size_1"
    model(torch.randn(S, D))
    with pytest.raises(ValueError, match=r"'ep_size_1'.*moesaic\.name_moe_layers\(model\)"):
        collect_moe_stats(model)
    with pytest.raises(ValueError, match="name_moe_layers"):
        MoEStatsAccumulator().update(model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        collect_moe_stats("model")


# --- MoEStatsAccumulator ------------------------------------------------------------------------

def test_accumulator_sums_three_forwards(net):
    acc = MoEStatsAccumulator()
    assert acc.summary() == {}
    snaps = []
    for _ in range(3):
        net(torch.randn(S, D))
        snaps.append({n: (collect_moe_stats(net)[n], moe(net, n).num_routes, moe(net, n).num_dropped_routes)
                      for n in NAMES})
        acc.update(net)
        acc.update(net)  # same forward again: not counted twice
    assert acc.num_forwards == {n: 3 for n in NAMES}
    summary = acc.summary()
    assert list(summary) == NAMES
    for n in NAMES:
        st = summary[n]
        assert set(st) == KEYS
        tokens = [sum(s[n][0]["tokens_per_expert"][e] for s in snaps) for e in range(E)]
        routes = [sum(s[n][0]["routes_per_expert"][e] for s in snaps) for e in range(E)]
        assert st["tokens_per_expert"] == tokens and st["routes_per_expert"] == routes
        assert sum(routes) == 3 * S * 2
        assert st["dropped_fraction"] == sum(s[n][2] for s in snaps) / sum(s[n][1] for s in snaps)
        assert st["l_aux"] == pytest.approx(sum(s[n][0]["l_aux"] for s in snaps) / 3, rel=1e-6)
        assert st["load_imbalance"] == pytest.approx(max(routes) / (sum(routes) / E))

    acc.reset()
    assert acc.summary() == {}
    acc.update(net)  # no new forward since the last counted one
    assert acc.summary() == {}
    net(torch.randn(S, D))
    acc.update(net)
    assert acc.summary() == collect_moe_stats(net)


# --- MetricsWriter ------------------------------------------------------------------------------

def metrics_for(step):
    return {
        "loss": 0.5 * step,
        "moe": {"layers.1.mlp": {"tokens_per_expert": [step, 2 * step, 0, 7], "dropped_fraction": 0.1}},
        "group": {"decay": {"layers.1.mlp": {"expert_3": {"grad_norm": float("nan") if step == 2 else 1.25}}}},
    }


def test_writer_tensorboard_and_csv_round_trip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path) as w:
        for step in (0, 1, 2):
            w.write(step, metrics_for(step))

    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})  # 0: keep all
    ea.Reload()
    loss = ea.Scalars("loss")
    assert [e.step for e in loss] == [0, 1, 2] and [e.value for e in loss] == [0.0, 0.5, 1.0]
    tok = ea.Scalars("moe/layers.1.mlp/tokens_per_expert/1")
    assert [(e.step, e.value) for e in tok] == [(0, 0.0), (1, 2.0), (2, 4.0)]
    gn = ea.Scalars("group/decay/layers.1.mlp/expert_3/grad_norm")
    assert [e.step for e in gn] == [0, 1, 2] and [e.value for e in gn[:2]] == [1.25, 1.25]
    assert math.isnan(gn[2].value)
    hist = ea.Histograms("moe/layers.1.mlp/load_histogram")
    assert [h.step for h in hist] == [0, 1, 2]
    assert hist[2].histogram_value.num == 4 and hist[2].histogram_value.sum == 2 + 4 + 0 + 7

    series = read_csv_metrics(tmp_path / "metrics.csv")
    assert repr(read_csv_metrics(tmp_path)) == repr(series)  # a log_dir works too (repr: nan != nan)
    assert series["loss"] == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert series["moe/layers.1.mlp/tokens_per_expert/3"] == [(0, 7), (1, 7), (2, 7)]
    assert series["moe/layers.1.mlp/dropped_fraction"] == [(0, 0.1), (1, 0.1), (2, 0.1)]  # full precision
    gn_csv = series["group/decay/layers.1.mlp/expert_3/grad_norm"]
    assert gn_csv[:2] == [(0, 1.25), (1, 1.25)] and gn_csv[2][0] == 2 and math.isnan(gn_csv[2][1])
    assert "moe/layers.1.mlp/load_histogram" not in series
    with open(tmp_path / "metrics.csv") as f:
        assert f.readline().strip() == "step,tag,value"


def test_writer_appends_to_existing_csv_and_infinities(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(0, {"a": float("inf")})
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(1, {"a": float("-inf"), "b": torch.tensor(3)})
    assert read_csv_metrics(tmp_path) == {"a": [(0, math.inf), (1, -math.inf)], "b": [(1, 3)]}
    assert not [f for f in os.listdir(tmp_path) if "tfevents" in f]
    with open(tmp_path / "metrics.csv") as f:
        assert f.read().count("step,tag,value") == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        MetricsWriter(tmp_path / "other", tensorboard=False)


def test_writer_rejects_bad_input(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    with pytest.raises(ValueError, match="step must be >= 0"):
        w.write(-1, {"a": 1})
    with pytest.raises(TypeError, match="step must be an int, got str"):
        w.write("1", {"a": 1})
    with pytest.raises(TypeError, match="step must be an int, got bool"):
        w.write(True, {"a": 1})
    with pytest.raises(TypeError, match="metrics must be a dict, got list"):
        w.write(0, [1.0])
    with pytest.raises(TypeError, match="'a/b'.*got str"):
        w.write(0, {"ok": 1.0, "a": {"b": "high"}})
    with pytest.raises(TypeError, match="'x/1'.*got NoneType"):
        w.write(0, {"x": [1, None]})
    with pytest.raises(TypeError, match="'x/0'.*got list"):
        w.write(0, {"x": [[1]]})
    with pytest.raises(TypeError, match="keys must be non-empty str"):
        w.write(0, {1: 1.0})
    with pytest.raises(ValueError, match="'a/b' occurs twice"):
        w.write(0, {"a/b": 1.0, "a": {"b": 2.0}})
    w.close()
    assert read_csv_metrics(tmp_path) == {}  # nothing half-written
    with pytest.raises(RuntimeError, match="closed"):
        w.write(0, {"a": 1.0})
    with pytest.raises(ValueError, match="flush_every"):
        MetricsWriter(tmp_path, csv=False, flush_every=0)
    with pytest.raises(ValueError, match="write nothing"):
        MetricsWriter(tmp_path, tensorboard=False, csv=False)


def test_missing_tensorboard_degrades_to_csv_with_one_warning(tmp_path, monkeypatch):
    """`pip install moesaic` without extras: the engine's log_dir must work (CSV only), warning once."""
    import moesaic.telemetry.writer as writer

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    writer._warn_no_tensorboard_once.cache_clear()
    with pytest.raises(ImportError, match=r"pip install 'moesaic\[train\]'"):  # asked for explicitly: an error
        MetricsWriter(tmp_path / "tb", tensorboard=True)
    assert not (tmp_path / "tb").exists()
    with pytest.warns(RuntimeWarning, match="tensorboard package is not installed: metrics go to metrics.csv only"):
        w = MetricsWriter(tmp_path / "auto")
    with w:
        w.write(0, {"a": 1})
    assert read_csv_metrics(tmp_path / "auto") == {"a": [(0, 1)]}
    assert not [f for f in os.listdir(tmp_path / "auto") if "tfevents" in f]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second writer of the process stays silent
        MetricsWriter(tmp_path / "auto2").close()
    with MetricsWriter(tmp_path / "csv_only", tensorboard=False) as w:  # CSV works without it
        w.write(0, {"a": 1})
    assert read_csv_metrics(tmp_path / "csv_only") == {"a": [(0, 1)]}


def test_discard_after_drops_replayed_steps_from_csv_and_tensorboard(tmp_path):
    """A run resumed from step 2 replays steps 3 and 4: each must appear once in metrics.csv and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path) as w:  # the first session: steps 1..4, then killed; checkpoint at 2
        for step in (1, 2, 3, 4):
            w.write(step, {"loss": float(step)})
    with MetricsWriter(tmp_path) as w:  # the resumed session
        assert w.discard_after(2) == 2
        for step in (3, 4, 5):
            w.write(step, {"loss": 10.0 * step})
        assert w.discard_after(4) == 1  # the same writer goes back again (engine: save, train, load)
        w.write(5, {"loss": 500.0})
    assert read_csv_metrics(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 500.0)]
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 500.0)]
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        MetricsWriter(tmp_path, tensorboard=False).discard_after(-1)


def test_stats_feed_the_writer(net, tmp_path):
    acc = MoEStatsAccumulator()
    for _ in range(2):
        net(torch.randn(S, D))
        acc.update(net)
    summary = acc.summary()
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(5, {"moe": summary})
    series = read_csv_metrics(tmp_path)
    for e, n in enumerate(summary["layers.0.mlp"]["tokens_per_expert"]):
        assert series[f"moe/layers.0.mlp/tokens_per_expert/{e}"] == [(5, n)]
    assert series["moe/layers.1.mlp/l_aux"] == [(5, summary["layers.1.mlp"]["l_aux"])]
