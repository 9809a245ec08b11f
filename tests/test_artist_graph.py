"""Tests of evals/artist_graph.py's device and layer plumbing (the GraphSAGE artist-similarity protocol):
--device cpu trains what it trained before, PyG's SAGEConv(project=True) and ours agree given the same
weights, --layer resolves with clear errors, and the analytic FLOP count matches torch's counter.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_artist_graph.py
"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from evals import artist_graph  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    import evaluate as ev
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
