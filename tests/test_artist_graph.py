"""Tests of evals/artist_graph.py, the artist-graph protocol (GraphSAGE on the artist similarity
graph): the released splits and message directions, the SAGE layer, negatives, the plateau
schedule, both NDCG formulas, and the command line; the device and layer plumbing: --device cpu trains
what it trained before, PyG's SAGEConv(project=True) and ours agree given the same weights, --layer and
--device are checked, and the analytic FLOP count matches torch's counter.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_artist_graph.py
"""
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate as ev
from evals import artist_graph, embeddings

from tests.helpers import _write_world


def _artist_world(n=60, seed=8, p=0.15):
    rng = np.random.default_rng(seed)
    split = rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2])
    edges = rng.integers(0, n, (int(p * n * n / 2), 2))  # one direction each, self-loops and repeats included
    return split, edges


def test_message_passing_graphs_follow_the_released_splits_and_stored_direction():
    split, edges = _artist_world()
    stored = {(i, j) for i, j in edges.tolist() if i != j}
    pairs = lambda t: set(map(tuple, t.T.tolist()))  # noqa: E731
    for undirected in (False, True):
        g = artist_graph.message_passing_graphs(edges, split, undirected)
        kept = stored | {(j, i) for i, j in stored} if undirected else stored
        s = lambda i, j: {split[i], split[j]}  # noqa: E731
        assert pairs(g["train"]) == {e for e in kept if s(*e) == {"train"}}
        assert pairs(g["val"]) == {e for e in kept if s(*e) in ({"train"}, {"train", "val"})}
        assert pairs(g["test"]) == {e for e in kept if s(*e) != {"test"}}
        for name in ("train", "val", "test"):  # the ground truth never passes a message
            a, b = split[g[name][0].numpy()], split[g[name][1].numpy()]
            assert not ((a == "test") & (b == "test")).any()
        both = stored | {(j, i) for i, j in stored}
        assert pairs(g["truth_test"]) == {e for e in both if s(*e) == {"test"}}
        assert pairs(g["truth_val"]) == {e for e in both if s(*e) == {"val"}}
        assert pairs(g["pairs"]) == {e for e in both if s(*e) == {"train"}}
        symmetric = all((j, i) in pairs(g["test"]) for i, j in pairs(g["test"]))
        assert symmetric == undirected  # stored one way each: messages flow first column -> second only


def test_sage_layer_is_the_projected_mean_over_in_neighbours_then_l2():
    layer = artist_graph.SAGEConv(3)
    h = torch.randn(4, 3)
    edges = torch.tensor([[1, 2, 0, 3], [0, 0, 1, 1]])  # 0 <- {1, 2}, 1 <- {0, 3}; 2 and 3 receive nothing
    adj, _ = artist_graph.local_graph(edges, torch.arange(4), 4)
    proj = torch.relu(layer.project(h))
    mean = torch.stack([(proj[1] + proj[2]) / 2, (proj[0] + proj[3]) / 2, torch.zeros(3), torch.zeros(3)])
    expect = F.normalize(layer.lin_l(mean) + layer.lin_r(h), dim=1)
    assert torch.allclose(layer(h, adj), expect, atol=1e-6)


def test_zero_layers_is_the_encoder_then_the_head():
    torch.manual_seed(0)
    model = artist_graph.ArtistGNN(5, n_layers=0, hidden=8, out_dim=4).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.encoder[1].running_mean.uniform_(-1, 1)
        model.encoder[1].running_var.uniform_(0.5, 2)
    x = torch.randn(7, 5)
    lin, bn = model.encoder
    h = (x @ lin.weight.T + lin.bias - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    h1 = torch.relu(h @ model.head[0].weight.T + model.head[0].bias)
    out = (h1 @ model.head[2].weight.T + model.head[2].bias) @ model.head[3].weight.T + model.head[3].bias
    g1, _ = artist_graph.local_graph(torch.tensor([[0, 1, 2], [1, 2, 3]]), torch.arange(7), 7)
    assert torch.allclose(model(x, g1), F.normalize(out, dim=1), atol=1e-5)
    assert torch.allclose(model(x, None), model(x, g1))
    deep = artist_graph.ArtistGNN(5, n_layers=2, hidden=8, out_dim=4).eval()
    assert not torch.allclose(deep(x, g1), deep(x, artist_graph.local_graph(torch.tensor([[4], [0]]), torch.arange(7), 7)[0]))


def test_forward_over_the_receptive_field_equals_the_full_graph():
    split, edges = _artist_world(n=80, seed=3, p=0.04)
    g = artist_graph.message_passing_graphs(edges, split)
    x = torch.randn(80, 6)
    targets = np.flatnonzero(split == "test")
    model = artist_graph.ArtistGNN(6, n_layers=2, hidden=8, out_dim=4).eval()
    full = model(x, artist_graph.local_graph(g["test"], torch.arange(80), 80)[0])[targets]
    assert len(artist_graph.receptive_nodes(g["test"], targets, 2, 80)) < 80  # something was left out
    assert torch.allclose(artist_graph.embed_artists(model, x, g["test"], targets, 2), full, atol=1e-5)
    assert not torch.allclose(artist_graph.embed_artists(model, x, g["test"], targets, 1), full, atol=1e-3)


def test_negatives_are_never_the_anchor_or_a_neighbour_and_cover_the_rest():
    split, edges = _artist_world(n=30, seed=5, p=0.3)
    pairs = artist_graph.message_passing_graphs(edges, split)["pairs"]
    candidates = torch.as_tensor(np.flatnonzero(split == "train"))
    neighbours = {i: {j for a, j in pairs.T.tolist() if a == i} for i in range(30)}
    anchors = pairs[0].repeat(200)
    neg = artist_graph.sample_negatives(anchors, pairs, candidates, 30, torch.Generator().manual_seed(0))
    drawn = {}
    for a, n in zip(anchors.tolist(), neg.tolist()):
        assert n != a and n not in neighbours[a] and split[n] == "train"
        drawn.setdefault(a, set()).add(n)
    for a in drawn:  # uniform over the allowed ones: with 200+ draws each, every one shows up
        allowed = set(candidates.tolist()) - neighbours[a] - {a}
        assert drawn[a] == allowed


def _tiny_graph_cfg(**kw):
    return artist_graph.ArtistGraphConfig(hidden=16, out_dim=8, steps_per_epoch=2, **kw)


def test_plateau_schedule_steps_on_the_validation_loss():
    split, edges = _artist_world(n=50, seed=2, p=0.2)
    g = artist_graph.message_passing_graphs(edges, split)
    x = artist_graph.artist_features("random", split, dim=12)
    cfg = _tiny_graph_cfg(epochs=12, lr=0.3, plateau_patience=1, min_lr=1e-3)
    _, hist = artist_graph.train_artist_gnn(x, g, split, 1, cfg)
    # ReduceLROnPlateau's rule (mode min, relative threshold 1e-4), replayed on the logged val losses
    lr, best, bad, expect = cfg.lr, float("inf"), 0, [cfg.lr]
    for v in hist["val_loss"][:-1]:
        best, bad = (v, 0) if v < best * (1 - 1e-4) else (best, bad + 1)
        if bad > cfg.plateau_patience:
            lr, bad = max(lr * cfg.plateau_factor, cfg.min_lr), 0
        expect.append(lr)
    assert hist["lr"] == pytest.approx(expect)
    assert len(set(hist["lr"])) > 1  # the schedule did step in this run


def test_same_seed_same_result_and_early_stop_truncates_the_run():
    split, edges = _artist_world(n=50, seed=4, p=0.2)
    x = artist_graph.artist_features("random", split, dim=12)
    cfg = _tiny_graph_cfg(epochs=4)
    a = artist_graph.artist_graph_ndcg(x, edges, split, layers=(1,), k=10, cfg=cfg)
    b = artist_graph.artist_graph_ndcg(x, edges, split, layers=(1,), k=10, cfg=cfg)
    c = artist_graph.artist_graph_ndcg(x, edges, split, layers=(1,), k=10, seeds=(1,), cfg=cfg)
    assert a == b and a != c
    stopped = artist_graph.artist_graph_ndcg(x, edges, split, layers=(1,), k=10, cfg=_tiny_graph_cfg(epochs=30, early_stop=1))
    assert stopped[1]["epochs"][0] < 30


def test_ndcg_both_formulas_hand_worked():
    # eval artists on a line at 0, 1, 3, 6; artist 0 ranks 1, 2, 3 (1 is nearest)
    z = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    one = artist_graph.artist_ndcg(z, torch.tensor([[0, 1], [1, 0]]))  # artist 0 - 1: each finds the other first
    assert one["queries"] == 2 and one["ndcg"] == pytest.approx(1.0)
    assert one["ndcg_released"] == pytest.approx(1 / (1 + 1 / math.log2(3)))  # ~0.613
    # artist 0 with two relevant neighbours, 1 (rank 1) and 3 (rank 3); 1 and 3 each have one
    two = artist_graph.artist_ndcg(z, torch.tensor([[0, 0, 1, 3], [1, 3, 0, 0]]))
    q0_std = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    q0_rel = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    # artist 1 ranks 0 (d 1) then 2 (d 2): 0 at rank 1; artist 3 ranks 2 (d 3), 1 (d 5), 0 (d 6): rank 3
    q1_std, q1_rel = 1.0, 1 / (1 + 1 / math.log2(3))
    q3_std, q3_rel = 1 / math.log2(4), (1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert two["ndcg"] == pytest.approx((q0_std + q1_std + q3_std) / 3)
    assert two["ndcg_released"] == pytest.approx((q0_rel + q1_rel + q3_rel) / 3)


def test_graph_layers_recover_hidden_edges_from_random_features():
    """Communities: with random features only message passing can place eval artists."""
    rng = np.random.default_rng(9)
    n, groups = 150, 6
    group = rng.integers(0, groups, n)
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < (0.3 if group[i] == group[j] else 0.005)]
    split = rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2])
    x = artist_graph.artist_features("random", split, dim=16)
    cfg = artist_graph.ArtistGraphConfig(hidden=32, out_dim=16, epochs=6, undirected=True)
    table = artist_graph.artist_graph_ndcg(x, edges, split, "test", layers=(0, 2), k=50, cfg=cfg)
    assert table[2]["ndcg@50"][0] > table[0]["ndcg@50"][0] + 0.15, table
    assert table[2]["ndcg@50_released_formula"][0] < table[2]["ndcg@50"][0]


def test_artist_graph_cli_reports_both_formulas_and_every_flag_acts(tmp_path, capsys, monkeypatch):
    _write_world(tmp_path)
    args = ["artist-graph", "--edges", str(tmp_path / "artist_graph.csv"), "--artist_split",
            str(tmp_path / "artist_split.csv"), "--features", "random", "--layers", "1", "--epochs", "2",
            "--k", "5", "--hidden", "16", "--out_dim", "8", "--random_dim", "6"]
    out = ev.main(args)
    table = capsys.readouterr().out
    assert "random ndcg@5 |" in table and "random ndcg@5_released_formula" in table
    assert set(out["random"]["1"]) >= {"ndcg@5", "ndcg@5_released_formula"}
    assert out["random"]["1"]["ndcg@5_released_formula"][0] < out["random"]["1"]["ndcg@5"][0]
    assert ev.main(args + ["--undirected"])["random"]["1"] != out["random"]["1"]
    seen = {}
    real = embeddings.song_embeddings
    monkeypatch.setattr(embeddings, "song_embeddings", lambda *a, **kw: seen.setdefault("args", a) and real(*a, **kw))
    ev.main(args + ["--features", "mean", "--catalog", str(tmp_path / "catalog.csv"), "--emb",
                    str(tmp_path / "e.npy"), "--batch_size", "7"])
    assert seen["args"][-1] == 7  # --batch_size reaches the on-the-fly embedding of an --emb


def test_random_artist_features_are_the_released_uniform_2613_d_and_seeded():
    x = artist_graph.artist_features("random", ["a"] * 40)
    assert x.shape == (40, 2613) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() < 1 and abs(x.mean() - 0.5) < 0.01  # uniform [0, 1), not Gaussian
    assert np.array_equal(x, artist_graph.artist_features("random", ["b"] * 40))
    assert not np.array_equal(x, artist_graph.artist_features("random", ["a"] * 40, seed=1))


def _graph(tmp_path, splits, edges):
    (tmp_path / "split.csv").write_text("artist_id,split\n" + "".join(f"a{i},{s}\n" for i, s in enumerate(splits)))
    (tmp_path / "edges.csv").write_text("artist_a,artist_b\n" + "".join(f"a{a},a{b}\n" for a, b in edges))
    return str(tmp_path / "edges.csv"), str(tmp_path / "split.csv")


def test_a_split_value_other_than_train_val_test_is_refused_naming_file_and_line(tmp_path):
    """Bug checked: 'Test' left that artist in no graph, unscored, and moved NDCG by 0.03."""
    edges, split = _graph(tmp_path, ["train", "train", "Test", "test"], [(0, 1), (2, 3)])
    with pytest.raises(ValueError, match=r"split.csv: line 4, column 'split': 'Test' for artist 'a2'; expected one "
                                         r"of train, val, test"):
        artist_graph.read_artist_graph(edges, split)


def test_self_loops_are_dropped_and_counted_aloud(tmp_path, capsys):
    edges, split = _graph(tmp_path, ["train", "train", "test"], [(0, 1), (1, 1), (2, 2), (0, 2)])
    artists, _, e = artist_graph.read_artist_graph(edges, split)
    assert e.tolist() == [[0, 1], [0, 2]]
    assert "dropped 2 self-loops (an artist linked to itself), lines 3, 4" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--k", "-3"), ("--k", "0"), ("--seeds", "0"), ("--epochs", "-1"),
                                         ("--lr", "0"), ("--layers", "-1"), ("--random_dim", "0")])
def test_flag_values_of_the_wrong_sign_are_usage_errors(tmp_path, capsys, flag, value):
    """Bug checked: --k -3 was torch's 'selected index k out of range' after all the training."""
    edges, split = _graph(tmp_path, ["train", "train", "test", "test"], [(0, 1), (2, 3)])
    with pytest.raises(SystemExit) as e:
        ev.main(["artist-graph", "--edges", edges, "--artist_split", split, "--features", "random", flag, value])
    assert e.value.code == 2 and f"{flag}: expected a" in capsys.readouterr().err


# --- device and layer plumbing ------------------------------------------------------------


def small_world(n=60, seed=8, p=0.15):
    """A random split and edge list (one direction each; self-loops and repeats included)."""
    rng = np.random.default_rng(seed)
    split = rng.choice(["train", "val", "test"], n, p=[0.6, 0.2, 0.2]).astype(object)
    edges = rng.integers(0, n, (int(p * n * n / 2), 2))
    return split, edges


def old_training_loop(x, graphs, split, n_layers, cfg, seed):
    """train_artist_gnn as it was before the device plumbing (CPU, builtin layer, the negatives'
    forbidden keys rebuilt each step), written out here: the reference the CPU path must reproduce."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    train_nodes = torch.as_tensor(np.flatnonzero(split == "train"))
    val_nodes = torch.as_tensor(np.flatnonzero(split == "val"))
    adj, local = artist_graph.local_graph(graphs["train"], train_nodes, n)
    anchors, positives = local[graphs["pairs"][0]], local[graphs["pairs"][1]]
    pairs = torch.stack([anchors, positives])
    va, _ = graphs["truth_val"]
    artist_graph.sample_negatives(va, graphs["truth_val"], val_nodes, n, g)  # the validation draw comes first
    model = artist_graph.ArtistGNN(x.shape[1], n_layers, cfg.hidden, cfg.out_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.epochs * cfg.steps_per_epoch):
        z = model(x[train_nodes], adj)
        neg = artist_graph.sample_negatives(anchors, pairs, torch.arange(len(train_nodes)), len(train_nodes), g)
        loss = F.triplet_margin_loss(z[anchors], z[positives], z[neg], margin=cfg.margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def test_cpu_device_trains_what_the_loop_trained_before():
    split, edges = small_world()
    graphs = artist_graph.message_passing_graphs(edges, split)
    x = torch.rand(len(split), 12, generator=torch.Generator().manual_seed(1))
    # patience past the run: the old loop above has no plateau schedule
    cfg = artist_graph.ArtistGraphConfig(hidden=16, out_dim=8, epochs=3, steps_per_epoch=4, plateau_patience=99,
                                         device="cpu", layer="builtin")
    model, history = artist_graph.train_artist_gnn(x, graphs, split, 2, cfg, seed=3)
    old = old_training_loop(x, graphs, split, 2, cfg, seed=3)
    test = np.flatnonzero(split == "test")
    new_z = artist_graph.embed_artists(model, x, graphs["test"], test, 2)
    old_z = artist_graph.embed_artists(old, x, graphs["test"], test, 2)
    assert history["epochs"] == 3 and new_z.device.type == "cpu"
    assert torch.allclose(new_z, old_z, atol=1e-6)
    untrained = artist_graph.ArtistGNN(12, 2, 16, 8).eval()  # the comparison can fail: training moved the weights
    assert not torch.allclose(artist_graph.embed_artists(untrained, x, graphs["test"], test, 2), old_z, atol=1e-2)


def test_precomputed_forbidden_keys_draw_the_same_negatives():
    split, edges = small_world(seed=2)
    g = artist_graph.message_passing_graphs(edges, split)
    a, b = g["pairs"]
    cand = torch.unique(a)
    forbidden = artist_graph.forbidden_keys(g["pairs"], cand, len(split))
    one = artist_graph.sample_negatives(a, g["pairs"], cand, len(split), torch.Generator().manual_seed(5))
    two = artist_graph.sample_negatives(a, g["pairs"], cand, len(split), torch.Generator().manual_seed(5), forbidden)
    assert torch.equal(one, two)
    neighbours = set(zip(a.tolist(), b.tolist()))
    assert not any((i, j) in neighbours or i == j for i, j in zip(a.tolist(), two.tolist()))


def _random_csr_graph(n, n_edges, seed):
    """A random directed graph without repeated edges (as message_passing_graphs hands them); node 0
    receives no message (a zero mean for it)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(0, n, (2, n_edges), generator=g)
    return torch.unique(e[:, e[1] != 0], dim=1)


def test_pyg_sageconv_agrees_with_ours_given_the_same_weights():
    pyg = pytest.importorskip("torch_geometric")
    torch.manual_seed(0)
    n, d = 30, 8
    edges = _random_csr_graph(n, 90, seed=1)
    ours = artist_graph.ArtistGNN(5, 2, hidden=d, out_dim=4, layer="builtin")
    theirs = artist_graph.ArtistGNN(5, 2, hidden=d, out_dim=4, layer="pyg")
    assert type(theirs.layers[0]).__module__.startswith("torch_geometric"), pyg.__version__
    state = {}  # ours -> PyG's names: project -> lin; lin_l, lin_r as they are (PyG's Linear keeps weight, bias)
    for k, v in ours.state_dict().items():
        state[k.replace(".project.", ".lin.")] = v
    theirs.load_state_dict(state)
    adj_mean, _ = artist_graph.local_graph(edges, torch.arange(n), n, mean=True)
    adj_ones, _ = artist_graph.local_graph(edges, torch.arange(n), n, mean=False)
    x = torch.randn(n, 5)
    outs, grads = [], []
    for model, adj in ((ours, adj_mean), (theirs, adj_ones)):
        model.train()
        z = model(x, adj)
        z[:10].sub(z[10:20]).square().sum().backward()
        outs.append(z.detach())
        grads.append({k.replace(".project.", ".lin."): p.grad.clone() for k, p in model.named_parameters()})
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5), k
    # the agreement is not vacuous: PyG's layer reads the graph (another graph, other outputs)
    other, _ = artist_graph.local_graph(_random_csr_graph(n, 90, seed=2), torch.arange(n), n, mean=False)
    assert not torch.allclose(theirs(x, other), outs[1], atol=1e-3)


def test_pyg_layer_trains_like_ours_on_the_protocol():
    pytest.importorskip("torch_geometric")
    split, edges = small_world(seed=4)
    graphs = artist_graph.message_passing_graphs(edges, split)
    x = torch.rand(len(split), 12, generator=torch.Generator().manual_seed(1))
    cfg = dict(hidden=16, out_dim=8, epochs=2, steps_per_epoch=3)
    runs = {}
    for layer in ("builtin", "pyg"):
        model, history = artist_graph.train_artist_gnn(x, graphs, split, 1, artist_graph.ArtistGraphConfig(
            **cfg, layer=layer), seed=0)
        runs[layer] = (model, history)
    assert runs["pyg"][0].layer == "pyg" and runs["builtin"][0].layer == "builtin"
    # same seed: PyG's layer initialises its weights twice (its Linear, then SAGEConv), so the draws
    # differ; both still train to a finite validation loss on the same triplets
    assert all(np.isfinite(runs[k][1]["val_loss"]).all() for k in runs)


def test_resolve_layer_names_and_a_missing_pyg(monkeypatch, capsys):
    assert artist_graph.resolve_layer("builtin") == "builtin"
    with pytest.raises(ValueError, match="--layer: 'sage' is not one of auto, pyg, builtin"):
        artist_graph.resolve_layer("sage")
    monkeypatch.setitem(sys.modules, "torch_geometric", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torch_geometric.nn", None)
    with pytest.raises(ValueError, match="--layer pyg: torch_geometric does not import"):
        artist_graph.resolve_layer("pyg")
    assert artist_graph.resolve_layer("auto") == "builtin"
    assert "NOTE artist-graph: torch_geometric is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("n_layers", [0, 2])
def test_analytic_flops_match_torchs_counter_on_a_dense_adjacency(n_layers, monkeypatch):
    """torch's FlopCounterMode counts the matmuls of a training step (forward and backward). With the
    adjacency as a dense matrix the mean costs 2 n^2 h forward and as much backward (no gradient for the
    adjacency); the analytic count has 2 E h for each instead, for the sparse mean."""
    from torch.utils.flop_counter import FlopCounterMode
    n, d_in, h, out = 40, 24, 16, 8
    adj, _ = artist_graph.local_graph(_random_csr_graph(n, 150, seed=3), torch.arange(n), n)
    E = adj.values().numel()
    model = artist_graph.ArtistGNN(d_in, n_layers, h, out).train()
    x = torch.randn(n, d_in)
    monkeypatch.setattr(torch.sparse, "mm", torch.mm)  # the counter sees the dense mean's two products
    with FlopCounterMode(display=False) as counter:
        model(x, adj.to_dense()).sum().backward()
    dense_mean, sparse_mean = 2 * (2 * n * n * h), 2 * (2 * E * h)
    expect = counter.get_total_flops() - n_layers * (dense_mean - sparse_mean)
    assert artist_graph.artist_gnn_flops(n, E, d_in, n_layers, h, out) == expect
    assert artist_graph.artist_gnn_flops(n, E, d_in, n_layers, h, out, train=False) < expect / 2


def test_device_and_layer_flags_are_checked_at_parse_time(capsys):
    base = ["artist-graph", "--edges", "e.csv", "--artist_split", "s.csv", "--features", "random"]
    for flags, message in ((["--device", "gpu0"], "--device 'gpu0': not a torch device"),
                           (["--layer", "sage"], "invalid choice: 'sage'")):
        with pytest.raises(SystemExit):
            ev.main(base + flags)
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: this torch .* sees no CUDA GPU"):
            artist_graph.check_device("cuda")
    assert artist_graph.check_device("cpu") == "cpu"
