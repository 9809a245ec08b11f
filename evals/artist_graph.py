"""Artist similarity with GraphSAGE (Grotschla et al., RecSys MuRS 2024, after Korzeniowski et al. 2021).

Node features = an artist's song embeddings (mean), random, or any given matrix. The paper gives
little of the protocol; the authors' released code (lucastr98/gnn, graphgps/) decides:
  graphs   train: train-train edges over the train artists; val: + train-val
           edges (train + val artists); test: every edge but test-test. An
           edge passes messages first column -> second, as stored.
  model    Linear(d, 256) + BatchNorm1d; L x [SAGEConv(project, mean) -> L2
           -> ELU]; head 256-256-100; L2.
  training 16 full-graph steps per epoch x 200 epochs, each step on every
           directed train edge (both endpoints as anchors) with a fresh
           negative per anchor; triplet loss, Euclidean, margin 0.2; AdamW;
           ReduceLROnPlateau on the validation triplet loss.
  score    test artists rank the other test artists by Euclidean distance;
           NDCG@200 against the hidden test-test edges, after the last epoch.
NOTE(paper): the released code's NDCG counts one ideal item too many; both
that value ("_released_formula", what the paper reports) and standard NDCG are
always reported.

Command (from the repo root, on the bundled synthetic world):
  python evaluate.py artist-graph --catalog sample_data/catalog.csv --emb emb/htcl --features mean \
      --features random --edges sample_data/artist_graph.csv --artist_split sample_data/artist_split.csv
"""
import argparse
import dataclasses
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from evals.embeddings import (KINDS, add_command, align, embeddings_of, load_embeddings, load_inputs,
                              non_negative_float, non_negative_int, positive_float, positive_int, read_records)
from evals.metrics import as_float_tensor, markdown_table, mean_std, ndcg_at_k, one_thread, plus_minus


def _field(default, help, choices=None, kind=None):
    """A config field whose help text (and choices or parse-time check `kind`, if any) the CLI shows."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "kind": kind})


def check_device(name):
    """--device NAME -> NAME, if torch knows the device type and, for cuda, has a GPU to run on."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"artist-graph --device {name!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"artist-graph --device {name}: this torch ({torch.__version__}) sees no CUDA GPU")
    return name


@dataclasses.dataclass
class ArtistGraphConfig:
    hidden: int = _field(256, "encoder / layer width (paper; released dim_inner 256)")
    out_dim: int = _field(100, "head output: 256-256-100 (released head)")
    margin: float = _field(0.2, "triplet margin, Euclidean distance (paper)")
    lr: float = _field(1e-3, "learning rate, AdamW (paper)")
    weight_decay: float = _field(0.05, "weight decay, AdamW (paper)")
    steps_per_epoch: int = _field(16, "released 'batch_size 16' = 16 full-graph, all-triplet steps per epoch")
    epochs: int = _field(200, "released max_epoch; the logged number is the last epoch's")
    plateau_factor: float = _field(0.5, "ReduceLROnPlateau on the validation triplet loss (released)")
    plateau_patience: int = _field(20, "ReduceLROnPlateau patience, epochs (released)")
    min_lr: float = _field(1e-5, "ReduceLROnPlateau floor on the lr (released)")
    early_stop: int = _field(0, "ours: stop after this many epochs without a better val loss; 0 = off (released)")
    undirected: bool = _field(False, "ours: symmetrise the edges; released: first column -> second only")
    device: str = _field("cpu", "where the GNN trains and embeds: cpu, cuda, cuda:1, ... (cuda draws its "
                                "negatives on the GPU: a different random stream from cpu's)", kind=check_device)
    layer: str = _field("auto", "GraphSAGE layer: pyg (torch_geometric's SAGEConv, the released layer), "
                                "builtin (ours, the same computation), auto = pyg when importable",
                        ("auto", "pyg", "builtin"))


def message_passing_graphs(edges, split, undirected=False):
    """edges: (E, 2) node indices, first column -> second; split: (N,) "train" / "val" / "test".

    -> {"train", "val", "test": (2, *) message-passing edges (src, dst) of each split's graph,
        "pairs": (2, *) train-train edges both ways (the training triplets' anchor, positive),
        "truth_val", "truth_test": (2, *) val-val / test-test edges both ways (hidden; the ground truth)}.
    Direction is kept as stored unless `undirected`; repeats and self-loops are dropped.
    """
    e = torch.as_tensor(np.asarray(edges), dtype=torch.long).reshape(-1, 2)
    e = e[e[:, 0] != e[:, 1]]
    if undirected:
        e = torch.cat([e, e.flip(1)])
    e = torch.unique(e, dim=0)
    split = np.asarray(split, dtype=object)
    kind = {s: torch.as_tensor(split == s) for s in ("train", "val", "test")}
    a = {s: m[e[:, 0]] for s, m in kind.items()}
    b = {s: m[e[:, 1]] for s, m in kind.items()}
    within = {s: a[s] & b[s] for s in kind}
    between = lambda s, t: (a[s] & b[t]) | (a[t] & b[s])  # noqa: E731
    train_val = within["train"] | between("train", "val")
    test = ~within["test"] & (a["train"] | a["val"] | a["test"]) & (b["train"] | b["val"] | b["test"])
    both = lambda m: torch.unique(torch.cat([e[m], e[m].flip(1)]), dim=0).T.contiguous()  # noqa: E731
    return {"train": e[within["train"]].T.contiguous(), "val": e[train_val].T.contiguous(),
            "test": e[test].T.contiguous(), "pairs": both(within["train"]),
            "truth_val": both(within["val"]), "truth_test": both(within["test"])}


def receptive_nodes(edge_index, targets, n_layers, n_nodes):
    """Sorted nodes whose features reach `targets` through <= n_layers message-passing hops."""
    keep = torch.zeros(n_nodes, dtype=torch.bool)
    keep[torch.as_tensor(targets, dtype=torch.long)] = True
    for _ in range(n_layers):
        keep[edge_index[0, keep[edge_index[1]]]] = True
    return torch.nonzero(keep).squeeze(1)


def local_graph(edge_index, nodes, n_nodes, mean=True):
    """The subgraph on `nodes` -> (mean-aggregation CSR matrix (n, n), global -> local index).

    Row v holds 1 / in-degree(v) at each source u of an edge u -> v: A @ h is the mean over
    v's in-neighbours (zero for a node with none). Every edge between two kept nodes is kept,
    so with `nodes` from receptive_nodes the targets' outputs are exact. mean=False: 1 at each
    edge instead, PyG's adj_t, whose SAGEConv divides by the in-degree itself (the two agree for
    edges without repeats, as message_passing_graphs hands them)."""
    local = torch.full((n_nodes,), -1, dtype=torch.long)
    local[nodes] = torch.arange(len(nodes))
    src, dst = local[edge_index[0]], local[edge_index[1]]
    ok = (src >= 0) & (dst >= 0)
    src, dst, n = src[ok], dst[ok], len(nodes)
    in_degree = torch.zeros(n).index_add_(0, dst, torch.ones(len(dst)))
    values = 1.0 / in_degree[dst] if mean else torch.ones(len(dst))
    adj = torch.sparse_coo_tensor(torch.stack([dst, src]), values, (n, n),
                                  check_invariants=True).coalesce()
    # CSR sparse @ dense was 1.4-1.6x faster than index_add_ over the edge list (measured)
    with warnings.catch_warnings():  # torch's one-time "CSR support is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        return adj.to_sparse_csr(), local


class SAGEConv(nn.Module):
    """PyG's SAGEConv(project=True, normalize=True), mean aggregation, as the released layer builds it:
    h_v' = L2(lin_l(mean_{u -> v} relu(W_p h_u + b_p)) + lin_r(h_v)); the caller then applies ELU."""

    def __init__(self, d):
        super().__init__()
        self.project = nn.Linear(d, d)
        self.lin_l = nn.Linear(d, d)
        self.lin_r = nn.Linear(d, d, bias=False)

    def forward(self, h, adj):
        # NOTE(paper): L2 here, before the ELU, as PyG's normalize=True in the released layer does
        mean = torch.sparse.mm(adj, F.relu(self.project(h)))  # (n, d): mean over in-neighbours
        return F.normalize(self.lin_l(mean) + self.lin_r(h), dim=1)


def resolve_layer(name):
    """--layer -> "pyg" or "builtin". auto: pyg when torch_geometric imports, else builtin, with a note."""
    if name not in ("auto", "pyg", "builtin"):
        raise ValueError(f"artist-graph --layer: {name!r} is not one of auto, pyg, builtin")
    if name == "builtin":
        return name
    try:
        with warnings.catch_warnings():  # its import calls the deprecated torch.jit.script (torch 2.13)
            warnings.simplefilter("ignore", DeprecationWarning)
            import torch_geometric.nn  # noqa: F401
        return "pyg"
    except ImportError as e:
        if name == "pyg":
            raise ValueError(f"artist-graph --layer pyg: torch_geometric does not import ({e}); "
                             f"pip install torch-geometric, or --layer builtin") from None
        print("NOTE artist-graph: torch_geometric is not installed; --layer builtin (the same computation as "
              "its SAGEConv(project=True), tested against it)", file=sys.stderr)
        return "builtin"


def sage_layer(d, layer):
    """One GraphSAGE layer of width d: the released PyG SAGEConv(d, d, project=True, normalize=True)
    with mean aggregation, or our SAGEConv; both take (h, adjacency CSR) (adjacency: local_graph's,
    mean=True for builtin, mean=False for pyg, whose sparse mean divides by the degree itself)."""
    if layer == "pyg":
        from torch_geometric.nn import SAGEConv as PyGSAGEConv
        return PyGSAGEConv(d, d, aggr="mean", normalize=True, project=True)
    return SAGEConv(d)


class ArtistGNN(nn.Module):
    """features -> Linear(d, 256) + BatchNorm1d -> n_layers x (SAGEConv, ELU) -> head 256-256-100 -> L2.

    n_layers = 0 is the paper's "no graph" model: encoder + head, the graph is never read.
    layer: "builtin" or "pyg" (sage_layer); self.mean_adjacency says which adjacency it takes."""

    def __init__(self, d_in, n_layers, hidden=256, out_dim=100, layer="builtin"):
        super().__init__()
        self.layer, self.mean_adjacency = layer, layer == "builtin"
        self.encoder = nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden))
        self.layers = nn.ModuleList(sage_layer(hidden, layer) for _ in range(n_layers))
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                  nn.Linear(hidden, out_dim))

    def forward(self, x, adj=None):
        h = self.encoder(x)
        for layer in self.layers:
            h = F.elu(layer(h, adj))
        return F.normalize(self.head(h), dim=1)


def artist_gnn_flops(n_nodes, n_edges, d_in, n_layers, hidden=256, out_dim=100, train=True):
    """Analytic FLOPs of one full-graph ArtistGNN step over n_nodes nodes and n_edges message-passing
    edges (2 per multiply-add; BatchNorm, ELU, L2 and the triplet loss left out, all O(n * hidden)).
    Forward: encoder 2 n d_in h; a layer 3 x 2 n h^2 (project, lin_l, lin_r) + 2 E h (the sparse
    mean); head 2 n (2 h^2 + h out). train: the dense products x3 (backward = input and weight
    gradients), less the encoder's input gradient, which the features do not need; the sparse mean
    x2 (the fixed adjacency needs no gradient)."""
    encoder = 2 * n_nodes * d_in * hidden
    dense = encoder + n_layers * 3 * 2 * n_nodes * hidden * hidden + 2 * n_nodes * (2 * hidden * hidden
                                                                                    + hidden * out_dim)
    sparse = n_layers * 2 * n_edges * hidden
    return 3 * dense - encoder + 2 * sparse if train else dense + sparse


def forbidden_keys(pairs, candidates, n_nodes):
    """Sorted anchor * n_nodes + node keys that sample_negatives never returns: the `pairs` (2, *) and
    each candidate with itself. The same every step of a run: computed once."""
    return torch.unique(torch.cat([pairs[0] * n_nodes + pairs[1], candidates * n_nodes + candidates]))


def sample_negatives(anchors, pairs, candidates, n_nodes, generator, forbidden=None):
    """One negative per anchor, uniform among `candidates` that are neither the anchor nor one of its
    neighbours in `pairs` (2, *) (as PyG's structured_negative_sampling, which the released code uses):
    draw, then redraw the rejected ones until none is left. forbidden: forbidden_keys(pairs, candidates,
    n_nodes), if the caller has it. The draws come from `generator`, on its device (the tensors' device)."""
    if forbidden is None:
        forbidden = forbidden_keys(pairs, candidates, n_nodes)
    neg = torch.empty_like(anchors)
    todo = torch.arange(len(anchors), device=anchors.device)
    for _ in range(1000):  # each round keeps a draw with probability >= 1 / len(candidates)
        if not len(todo):
            return neg
        neg[todo] = candidates[torch.randint(len(candidates), (len(todo),), generator=generator,
                                             device=candidates.device)]
        todo = todo[torch.isin(anchors[todo] * n_nodes + neg[todo], forbidden)]
    raise ValueError(f"artist graph: node {int(anchors[todo[0]])} is linked to every candidate negative")


def _split_view(graph, targets, n_layers, n_nodes, mean=True):
    """The part of `graph` the targets' outputs need -> (nodes, adjacency, global -> local)."""
    nodes = receptive_nodes(graph, targets, n_layers, n_nodes)
    adj, local = local_graph(graph, nodes, n_nodes, mean)
    return nodes, adj, local


@one_thread()
def train_artist_gnn(features, graphs, split, n_layers, cfg=None, seed=0, log=None, on_epoch=None):
    """Train on the train graph with the released protocol -> (model in eval mode, history).

    history: {"val_loss": [...], "lr": [...], "epochs": epochs run}. The validation triplets are
    drawn once (val-val edges both ways, negatives among the val artists), as the released data
    file stores them; without val-val edges the plateau schedule and early stopping are off.
    on_epoch(epoch, model), if given, runs after each epoch (bench.py scores the test set with it).
    cfg.device: the graph, features and model go there; on CUDA the training negatives are drawn
    there too (a CUDA generator seeded with `seed`), so the host never builds them; the validation
    triplets are drawn on the host as on CPU. cfg.layer: resolve_layer's choice."""
    cfg = cfg or ArtistGraphConfig()
    device, layer = torch.device(check_device(cfg.device)), resolve_layer(cfg.layer)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    g_train = g if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
    x = as_float_tensor(features)
    n = x.shape[0]
    split = np.asarray(split, dtype=object)
    train_nodes = torch.as_tensor(np.flatnonzero(split == "train"))
    val_nodes = torch.as_tensor(np.flatnonzero(split == "val"))
    mean = layer == "builtin"
    adj_train, local_train = local_graph(graphs["train"], train_nodes, n, mean)
    x_train = x[train_nodes]
    anchors, positives = local_train[graphs["pairs"][0]], local_train[graphs["pairs"][1]]
    local_pairs = torch.stack([anchors, positives])
    candidates = torch.arange(len(train_nodes))
    forbidden = forbidden_keys(local_pairs, candidates, len(train_nodes))
    x_train, adj_train, anchors, positives, local_pairs, candidates, forbidden = (
        t.to(device) for t in (x_train, adj_train, anchors, positives, local_pairs, candidates, forbidden))
    val = None
    if graphs["truth_val"].shape[1]:
        va, vp = graphs["truth_val"]
        vn = sample_negatives(va, graphs["truth_val"], val_nodes, n, g)
        nodes, adj_val, local_val = _split_view(graphs["val"], val_nodes, n_layers, n, mean)
        val = tuple(t.to(device) for t in (x[nodes], adj_val, local_val[va], local_val[vp], local_val[vn]))
    model = ArtistGNN(x.shape[1], n_layers, cfg.hidden, cfg.out_dim, layer).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.plateau_factor,
                                                         patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    history = {"val_loss": [], "lr": [], "epochs": 0}
    best, since_best = float("inf"), 0
    for epoch in range(cfg.epochs):
        model.train()
        for _ in range(cfg.steps_per_epoch):
            z = model(x_train, adj_train)  # (n_train, out_dim): every train artist, every step
            negatives = sample_negatives(anchors, local_pairs, candidates, len(train_nodes), g_train, forbidden)
            loss = F.triplet_margin_loss(z[anchors], z[positives], z[negatives], margin=cfg.margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        history["epochs"] = epoch + 1
        history["lr"].append(opt.param_groups[0]["lr"])
        if on_epoch:
            on_epoch(epoch + 1, model)
        if val is None:
            continue
        model.eval()
        with torch.no_grad():
            zv = model(val[0], val[1])
            val_loss = float(F.triplet_margin_loss(zv[val[2]], zv[val[3]], zv[val[4]], margin=cfg.margin))
        history["val_loss"].append(val_loss)
        plateau.step(val_loss)
        if log:
            log(f"layers {n_layers} epoch {epoch + 1}: train loss {float(loss):.4f}, val loss {val_loss:.4f}, "
                f"lr {history['lr'][-1]:.1e}")
        # NOTE(paper): early stopping is ours and off by default (the released code runs all epochs)
        since_best = 0 if val_loss < best else since_best + 1
        best = min(best, val_loss)
        if cfg.early_stop and since_best >= cfg.early_stop:
            break
    return model.eval(), history


@torch.no_grad()
def embed_artists(model, features, graph, targets, n_layers):
    """Embeddings of `targets` (global ids) through `graph`, computed over their receptive field only,
    on the model's device -> (len(targets), out_dim) on the CPU."""
    x = as_float_tensor(features)
    device = next(model.parameters()).device
    nodes, adj, local = _split_view(graph, targets, n_layers, x.shape[0], getattr(model, "mean_adjacency", True))
    z = model.eval()(x[nodes].to(device), adj.to(device))
    return z[local[torch.as_tensor(targets, dtype=torch.long)].to(device)].cpu()


def released_ndcg_at_k(relevant, n_relevant, k):
    """NDCG@k as the released code computes it (calculate_ndcg_at_k): the DCG as ndcg_at_k, but the
    ideal DCG indexes cumsum(discounts) 0-based at min(n, k), i.e. sums min(n, k) + 1 ideal items.
    -> (Q,), NaN where n_relevant = 0."""
    rel = np.asarray(relevant, dtype=np.float64)[:, :k]
    discount = 1.0 / np.log2(np.arange(2, k + 3))  # ranks 1..k+1: the ideal list's extra item
    dcg = (rel * discount[:rel.shape[1]]).sum(1)
    n_relevant = np.asarray(n_relevant)
    ideal = np.cumsum(discount)[np.minimum(n_relevant, k)]
    return np.where(n_relevant > 0, dcg / ideal, np.nan)


@torch.no_grad()
def artist_ndcg(z, truth, k=200):
    """z: (n, D) embeddings of the eval artists; truth: (2, *) hidden edges in local indices 0..n-1,
    both ways. Each artist ranks the others by Euclidean distance; mean over the artists with >= 1
    hidden edge -> {"ndcg": standard NDCG@k, "ndcg_released": released formula, "queries": count}.
    NOTE(paper): that mean (the released protocol's), not the mean over non-zero NDCGs that the newest
    released custom_train.py logs: only the former puts the paper's 0-layer .017 at chance level."""
    n = z.shape[0]
    adjacency = torch.zeros(n, n, dtype=torch.bool)
    adjacency[truth[0], truth[1]] = True
    n_relevant = adjacency.sum(1)
    queries = torch.nonzero(n_relevant > 0).squeeze(1)
    if len(queries) == 0:
        return {"ndcg": float("nan"), "ndcg_released": float("nan"), "queries": 0}
    dist = torch.cdist(z[queries], z)  # (Q, n)
    dist[torch.arange(len(queries)), queries] = float("inf")  # never retrieve yourself
    idx = dist.topk(min(k, n - 1), dim=1, largest=False).indices
    relevant = adjacency[queries[:, None], idx].numpy()
    n_rel = n_relevant[queries].numpy()
    return {"ndcg": float(np.mean(ndcg_at_k(relevant, n_rel, k))),
            "ndcg_released": float(np.mean(released_ndcg_at_k(relevant, n_rel, k))), "queries": len(queries)}


def artist_graph_ndcg(features, edges, split, eval_split="test", layers=(0, 1, 2, 3, 4), k=200, seeds=(0,),
                      cfg=None, log=None):
    """The sweep over the number of GraphSAGE layers -> {n_layers: {"ndcg@k": (mean, std over seeds),
    "ndcg@k_released_formula": (mean, std), "epochs": [epochs run per seed], "queries": count}}."""
    cfg = cfg or ArtistGraphConfig()
    split = np.asarray(split, dtype=object)
    graphs = message_passing_graphs(edges, split, cfg.undirected)
    if graphs["pairs"].shape[1] == 0 or graphs[f"truth_{eval_split}"].shape[1] == 0:
        raise ValueError(f"artist graph: {graphs['pairs'].shape[1] // 2} train-train edges and "
                         f"{graphs[f'truth_{eval_split}'].shape[1] // 2} {eval_split}-{eval_split} edges; "
                         f"both must be non-empty")
    eval_nodes = torch.as_tensor(np.flatnonzero(split == eval_split))
    local = torch.full((len(split),), -1, dtype=torch.long)
    local[eval_nodes] = torch.arange(len(eval_nodes))
    truth = local[graphs[f"truth_{eval_split}"]]
    table = {}
    for n_layers in layers:
        runs = []
        for seed in seeds:
            model, history = train_artist_gnn(features, graphs, split, n_layers, cfg, seed, log)
            z = embed_artists(model, features, graphs[eval_split], eval_nodes, n_layers)
            runs.append({**artist_ndcg(z, truth, k), "epochs": history["epochs"]})
        table[n_layers] = {f"ndcg@{k}": mean_std([r["ndcg"] for r in runs]),
                           f"ndcg@{k}_released_formula": mean_std([r["ndcg_released"] for r in runs]),
                           "epochs": [r["epochs"] for r in runs], "queries": runs[0]["queries"]}
    return table


def read_artist_graph(edges_path, split_path):
    """artist_split CSV (artist_id, split) + edge CSV (artist_a, artist_b)
    -> (artist ids, split per artist, (E, 2) int edges). An edge to an unknown artist is an error."""
    artists, split, index = [], [], {}
    for line, rec in read_records(split_path, ("artist_id", "split")):
        aid = rec["artist_id"].strip()
        if not aid or aid in index:
            raise ValueError(f"{split_path}: line {line}, column 'artist_id': {'repeated' if aid else 'empty'} "
                             f"artist_id {aid!r}")
        value = rec["split"].strip()
        if value not in SPLITS:  # any other value would leave the artist in no graph, unscored
            raise ValueError(f"{split_path}: line {line}, column 'split': {value!r} for artist {aid!r}; expected "
                             f"one of {', '.join(SPLITS)} (lower case)")
        index[aid] = len(artists)
        artists.append(aid)
        split.append(value)
    edges, loops = [], []
    for line, rec in read_records(edges_path, ("artist_a", "artist_b")):
        a, b = rec["artist_a"].strip(), rec["artist_b"].strip()
        for v, col in ((a, "artist_a"), (b, "artist_b")):
            if v not in index:
                raise ValueError(f"{edges_path}: line {line}, column '{col}': artist '{v}' is not in {split_path}")
        if a == b:  # an artist is not its own neighbour (message_passing_graphs drops it): said, not silent
            loops.append(line)
            continue
        edges.append((index[a], index[b]))
    if loops:
        print(f"WARNING {edges_path}: dropped {len(loops)} self-loops (an artist linked to itself), lines "
              f"{', '.join(map(str, loops[:5]))}{' ...' if len(loops) > 5 else ''}", file=sys.stderr)
    return artists, np.array(split, dtype=object), np.array(edges, dtype=np.int64).reshape(-1, 2)


SPLITS = ("train", "val", "test")


def artist_features(kind, artists, catalog=None, song_emb=None, artist_column="artist_id", dim=2613, seed=0):
    """Node features: "mean" of each artist's song embeddings, "random", or NAME.npy
    (with NAME.ids.txt holding artist ids). "random" is the released code's: uniform [0, 1),
    2613-d (its feature width), seed 0."""
    if kind == "random":
        return np.random.default_rng(seed).random((len(artists), dim), dtype=np.float32)
    if kind == "mean":
        if catalog is None or song_emb is None:
            raise ValueError("artist-graph --features mean needs --catalog and --emb")
        if artist_column not in catalog.columns:
            raise ValueError(f"{catalog.path}: no column '{artist_column}' to group songs by artist")
        index = {a: i for i, a in enumerate(artists)}
        total = np.zeros((len(artists), song_emb.shape[1]), dtype=np.float64)
        count = np.zeros(len(artists))
        for r in range(len(catalog)):
            i = index.get(catalog.label(r, artist_column))
            if i is not None:
                total[i] += song_emb[r]
                count[i] += 1
        if (count == 0).any():
            print(f"WARNING artist-graph: {int((count == 0).sum())} artists have no song in {catalog.path}; "
                  f"their mean feature is zero", file=sys.stderr)
        return (total / np.maximum(count, 1)[:, None]).astype(np.float32)
    ids, x = load_embeddings(kind)
    return align(ids, x, artists, kind, what="artist")


def cmd_artist_graph(args):
    artists, split, edges = read_artist_graph(args.edges, args.artist_split)
    features = {}
    for f in args.features:
        if f == "mean":
            if not args.emb or not args.catalog:
                raise SystemExit("artist-graph --features mean needs --catalog and --emb")
            catalog, cache = load_inputs(args)
            for name, emb in embeddings_of(args, catalog, cache).items():
                features[f"mean({name})"] = artist_features("mean", artists, catalog, emb, args.artist_column)
        else:
            features[f] = artist_features(f, artists, dim=args.random_dim)
    cfg = ArtistGraphConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ArtistGraphConfig)})
    graphs = message_passing_graphs(edges, split, cfg.undirected)
    print(f"artist-graph: {len(artists)} artists, {graphs['pairs'].shape[1] // 2} train-train edges; message "
          f"passing {'both ways' if cfg.undirected else 'first column -> second'}: "
          f"{graphs[args.eval_split].shape[1]} directed edges in the {args.eval_split} graph; "
          f"{graphs['truth_' + args.eval_split].shape[1] // 2} hidden {args.eval_split}-{args.eval_split} edges; "
          f"layer {resolve_layer(cfg.layer)} on {cfg.device}")
    log = (lambda line: print(line, file=sys.stderr)) if args.verbose else None  # noqa: E731
    results = {}
    for name, x in features.items():
        results[name] = artist_graph_ndcg(x, edges, split, args.eval_split, args.layers, args.k,
                                          seeds=range(args.seeds), cfg=cfg, log=log)
    std, released = f"ndcg@{args.k}", f"ndcg@{args.k}_released_formula"
    print(markdown_table(["layers"] + [f"{f} {m}" for f in features for m in (std, released)],
                         [[n] + [plus_minus(results[f][n][m]) for f in features for m in (std, released)]
                          for n in args.layers]))
    print(f"{std}: standard NDCG; {released}: the released code's formula (one ideal item too many), which the "
          f"paper reports. Epochs run: " + "; ".join(f"{f} {[results[f][n]['epochs'] for n in args.layers]}"
                                                      for f in features))
    return {f: {str(n): v for n, v in r.items()} for f, r in results.items()}


def _parse_time(check):
    """A check that raises ValueError -> an argparse type (its message in argparse's one-line error)."""
    if check is None:
        return str

    def kind(value):
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return kind


def add_artist_graph_flags(q):
    """One flag per ArtistGraphConfig field (--early_stop, --undirected, ...), default from the dataclass."""
    for f in dataclasses.fields(ArtistGraphConfig):
        if f.type in (bool, "bool"):
            q.add_argument("--" + f.name, action="store_true", help=f.metadata["help"])
        elif f.type in (str, "str"):  # --device, --layer
            q.add_argument("--" + f.name, default=f.default, choices=f.metadata["choices"],
                           type=_parse_time(f.metadata["kind"]), help=f.metadata["help"])
        else:  # counts >= 1 (early_stop and patience >= 0), rates and margins > 0 (weight decay >= 0)
            kind = {int: non_negative_int if f.name in ("early_stop", "plateau_patience") else positive_int,
                    float: non_negative_float if f.name == "weight_decay" else positive_float}[type(f.default)]
            q.add_argument("--" + f.name, type=kind, default=f.default, help=f.metadata["help"])


def add_parser(subparsers):
    """The `artist-graph` sub-command."""
    q = add_command(subparsers, "artist-graph", cmd_artist_graph,
                    "GraphSAGE artist similarity NDCG@200 over 0-4 layers (Grotschla et al.)", source=False)
    q.add_argument("--edges", required=True, help="CSV artist_a,artist_b")
    q.add_argument("--artist_split", required=True, help="CSV artist_id,split")
    q.add_argument("--features", action="append", required=True,
                   help="mean (of each artist's --emb song embeddings), random, or NAME.npy with NAME.ids.txt "
                        "holding artist ids; repeat to compare")
    q.add_argument("--catalog", help="needed for --features mean")
    q.add_argument("--emb", action="append", help="song embeddings for --features mean")
    q.add_argument("--kind", default="audio", choices=KINDS, help="which embedding of an --emb folder/artifact")
    q.add_argument("--mode", default=None, choices=["full", "chunked"],
                   help="how an --emb artifact is embedded on the fly (default: the artifact's embed_mode)")
    q.add_argument("--cache", help="log-mel cache folder for an --emb artifact")
    q.add_argument("--batch_size", type=positive_int, default=16,
                   help="songs per forward pass when an --emb artifact is embedded on the fly (the GNN itself "
                        "takes full-graph steps)")
    q.add_argument("--artist_column", default="artist_id", help="catalog column naming a song's artist")
    q.add_argument("--eval_split", default="test", choices=["test", "val"],
                   help="artists scored; their mutual edges are hidden")
    q.add_argument("--layers", type=non_negative_int, nargs="+", default=[0, 1, 2, 3, 4], help="GraphSAGE depths compared")
    q.add_argument("--k", type=positive_int, default=200, help="K of NDCG@K")
    q.add_argument("--seeds", type=positive_int, default=1, help="training seeds; mean ± std is reported")
    q.add_argument("--random_dim", type=positive_int, default=2613, help="width of --features random (released: 2613)")
    q.add_argument("--verbose", action="store_true", help="print a line per epoch (losses, lr) on stderr")
    add_artist_graph_flags(q)
    return q
