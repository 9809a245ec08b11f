"""Every GPU measurement of the speed work in one run, written as one JSON: the paper step's switches one
row each (tools/device_bench.py, Sec. 3.1.3's stage-1 step, bf16, batch 100), the profiler's top-5 kernels
before and after, and the artist-graph protocol on the real OLGA graph (Grotschla et al.: GraphSAGE 0-4
layers x 200 epochs, random features; both NDCG formulas next to the released logs; seconds and an
analytic FLOP count).

    python tools/device_run.py --out results.json --olga DIR          # on one H200: <= ~8.5 min
    python tools/device_run.py --out results.json --tiny              # CPU check of the script: ~1-2 min

Sections run one after another, each in a process of its own with a time limit (--budget_s shares it
out); one that fails or runs out of time records its error and whatever it finished, and the others
still run. The JSON: {"env", "bench", "profile", "artist", "seconds", "errors"}.

DIR is a folder with OLGA's edges.csv (src,dst) and split.csv (artist_id,split). A device machine sees
only the repository's copy, so copy the folder into runs/ (git-ignored) and carry it, e.g. with the
session's `run` tool:
    cp -r /path/to/olga runs/olga        # here, once
    run(command="python3 tools/device_run.py --olga runs/olga --out $OUT/device_run.json",
        carry=["runs/olga"], timeout_s=600)
Without --olga the artist section uses sample_data's synthetic graph. data.py imports soundfile and soxr,
which the device image lacks and which nothing here uses: where they do not import, stand-ins that raise
on use are registered (env.stand_ins says so); carrying their wheels instead also works.
"""
import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RELEASED_NDCG = {0: 0.017, 1: 0.158, 2: 0.305, 3: 0.344, 4: 0.349}  # released logs: their formula, mean of 3
SECTIONS = ("bench", "artist")  # "bench" also writes "profile" (the same process's models)


class _Missing(types.ModuleType):
    """A stand-in for an audio library that is not installed: importing works, using it raises."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"{self.__name__} is not installed here (tools/device_run.py measures no audio decoding)")


def audio_stand_ins():
    """Register stand-ins for soundfile and soxr where they do not import -> the names stood in for.
    transformers' audio helpers are imported first, so that they see soundfile missing, as it is; the
    stand-ins carry a module spec, since transformers asks importlib.util.find_spec about soundfile."""
    import importlib.machinery
    missing = []
    for name in ("soundfile", "soxr"):
        try:
            __import__(name)
        except (ImportError, OSError):
            missing.append(name)
    if missing:
        try:
            import transformers.audio_utils  # noqa: F401
        except ImportError:
            pass
    for name in missing:
        sys.modules[name] = _Missing(name)
        sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
    return missing


def environment(device_name):
    """Versions, the device, and the peak FLOP/s MFU is reported against."""
    import torch
    import bench
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "device": device_name, "device_name": None, "peak_flops_bf16_dense": None,
           "cpu_count": os.cpu_count(), "host": platform.node()}
    if device_name.startswith("cuda"):
        import torch as t
        env["device_name"] = t.cuda.get_device_name(t.device(device_name))
        env["peak_flops_bf16_dense"] = bench.gpu_peak_flops(t.device(device_name))
    for mod in ("transformers", "torch_geometric"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["git_commit"] = None
    return env


def _error(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


def _write(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Sections: each runs in a child process and saves what it has done so far to its part file.


def section_bench(args, save):
    """tools/device_bench.py's rows, then the profiler's top kernels of the same process's arms."""
    import torch
    from tools import device_bench
    device = torch.device(args.device)
    out = {"profile": {}}

    def partial(bench):
        out["bench"] = bench
        out["profile"]["fastest"] = device_bench.fastest_row(bench)
        save(out)

    def profile(group, arms):  # right after each group's timing: a later group's time-out keeps these
        out["profile"].update(device_bench.profile_arms(arms, device, steps=2 if args.tiny else 3))
        save(out)

    kw = dict(rounds=2, burst=1, warmup=1) if args.tiny else dict(rounds=5, burst=3, warmup=2)
    res = device_bench.run_bench(device, args.tiny, args.batch, budget_s=max(args.limit_s - 60, 20),
                                 say=lambda line: print(line, file=sys.stderr, flush=True), save=partial,
                                 after_group=profile, **kw)
    for name in device_bench.PROFILED:  # the same keys in every run
        out["profile"].setdefault(name, {"skipped": "not built (see its row)"})
    partial(res)


def read_olga(folder):
    """OLGA's edges.csv (src,dst) and split.csv (artist_id,split) -> (artists, split, (E, 2) edges)."""
    import csv
    import numpy as np
    paths = {name: os.path.join(folder, name) for name in ("edges.csv", "split.csv")}
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise ValueError(f"--olga {folder}: no {name} (expected edges.csv src,dst and split.csv artist_id,split)")

    def rows(path, columns):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: no column(s) {', '.join(missing)}; found {reader.fieldnames}")
            return [(line, r) for line, r in enumerate(reader, start=2)]

    artists, split, index = [], [], {}
    for line, r in rows(paths["split.csv"], ("artist_id", "split")):
        if r["artist_id"] in index:
            raise ValueError(f"{paths['split.csv']}: line {line}: artist_id {r['artist_id']!r} repeated")
        index[r["artist_id"]] = len(artists)
        artists.append(r["artist_id"])
        split.append(r["split"])
    edges = []
    for line, r in rows(paths["edges.csv"], ("src", "dst")):
        for col in ("src", "dst"):
            if r[col] not in index:
                raise ValueError(f"{paths['edges.csv']}: line {line}, column '{col}': artist {r[col]!r} is not in "
                                 f"{paths['split.csv']}")
        edges.append((index[r["src"]], index[r["dst"]]))
    return artists, np.array(split, dtype=object), np.array(edges, dtype=np.int64).reshape(-1, 2)


def load_graph(args):
    """(artists, split, edges, source): OLGA with --olga, else sample_data's synthetic world."""
    if args.olga:
        return (*read_olga(args.olga), f"OLGA ({args.olga})")
    from evals.artist_graph import read_artist_graph
    sample = os.path.join(ROOT, "sample_data")
    return (*read_artist_graph(os.path.join(sample, "artist_graph.csv"), os.path.join(sample, "artist_split.csv")),
            "sample_data (synthetic; pass --olga for the real graph)")


def artist_config(args, layer, **kw):
    from evals.artist_graph import ArtistGraphConfig
    tiny = dict(epochs=2, steps_per_epoch=4, hidden=32, out_dim=16) if args.tiny else {}
    return ArtistGraphConfig(device=args.device, layer=layer, **{**tiny, **kw})


def layer_check(x, graphs, split, args):
    """PyG's SAGEConv against ours on this device and graph: the train graph's forward with copied
    weights (max |difference|), and seconds of one training epoch at 2 layers with each (the second of
    two, so that the first pays the device's warm-up)."""
    import numpy as np
    import torch
    from evals import artist_graph as ag
    device = torch.device(args.device)
    layers = ["builtin"] + (["pyg"] if ag.resolve_layer("auto") == "pyg" else [])
    out = {"layers": layers}
    cfg = artist_config(args, "builtin")
    train_nodes = torch.as_tensor(np.flatnonzero(split == "train"))
    torch.manual_seed(0)
    models = {name: ag.ArtistGNN(x.shape[1], 2, cfg.hidden, cfg.out_dim, name) for name in layers}
    if "pyg" in models:
        models["pyg"].load_state_dict({k.replace(".project.", ".lin."): v
                                       for k, v in models["builtin"].state_dict().items()})
    z = {}
    for name, model in models.items():
        adj, _ = ag.local_graph(graphs["train"], train_nodes, len(split), mean=name == "builtin")
        with torch.no_grad():
            z[name] = model.to(device).eval()(torch.as_tensor(x[train_nodes.numpy()]).to(device), adj.to(device))
    if "pyg" in z:
        out["max_abs_diff"] = float((z["pyg"] - z["builtin"]).abs().max())
    for name in layers:
        for _ in range(2):
            t = time.perf_counter()
            ag.train_artist_gnn(x, graphs, split, 2, artist_config(args, name, epochs=1), seed=0)
            out[f"{name}_epoch_s"] = time.perf_counter() - t
    out["steps_per_epoch"] = cfg.steps_per_epoch
    return out


def run_flops(graphs, split, d_in, n_layers, cfg, epochs):
    """Analytic FLOPs of one run: its training steps, a validation forward an epoch, the test embedding."""
    import numpy as np
    from evals import artist_graph as ag
    n = len(split)
    view = {}
    for s in ("val", "test"):
        nodes, adj, _ = ag._split_view(graphs[s], np.flatnonzero(split == s), n_layers, n)
        view[s] = (len(nodes), adj.values().numel())
    step = ag.artist_gnn_flops(int((split == "train").sum()), graphs["train"].shape[1], d_in, n_layers,
                               cfg.hidden, cfg.out_dim)
    fwd = lambda s: ag.artist_gnn_flops(*view[s], d_in, n_layers, cfg.hidden, cfg.out_dim, train=False)  # noqa: E731
    return {"per_step": step, "per_run": epochs * (cfg.steps_per_epoch * step + fwd("val")) + fwd("test")}


def sweep_summary(runs, layers, k):
    """Per layer count: both NDCG formulas (mean, std over seeds), the released log beside them, seconds."""
    import numpy as np
    table = {}
    for n_layers in layers:
        rs = [r for r in runs if r["layers"] == n_layers]
        if not rs:
            continue
        ms = lambda key: [float(np.mean([r[key] for r in rs])), float(np.std([r[key] for r in rs]))]  # noqa: E731
        table[str(n_layers)] = {f"ndcg@{k}": ms("ndcg"), f"ndcg@{k}_released_formula": ms("ndcg_released"),
                                "released_log": RELEASED_NDCG.get(n_layers), "seeds": [r["seed"] for r in rs],
                                "train_s": ms("train_s"), "flops_per_step": rs[0]["flops_per_step"],
                                "flops_per_run": rs[0]["flops_per_run"],
                                "achieved_flops_per_s": float(np.mean([r["flops_per_run"] / r["train_s"] for r in rs]))}
    return table


def artist_sweep(x, graphs, split, layer, args, deadline, save):
    """0-4 layers x seeds (seed 0, then more while the next fits before `deadline`); save(summary) after
    every run -> the summary."""
    import numpy as np
    import torch
    from evals import artist_graph as ag
    cfg, k, layers = artist_config(args, layer), 200, (0, 1, 2, 3, 4)
    eval_nodes = torch.as_tensor(np.flatnonzero(split == "test"))
    local = torch.full((len(split),), -1, dtype=torch.long)
    local[eval_nodes] = torch.arange(len(eval_nodes))
    truth = local[graphs["truth_test"]]
    flops = {n: run_flops(graphs, split, x.shape[1], n, cfg, cfg.epochs) for n in layers}
    runs, seed_s, out = [], [], {"layer": layer, "epochs": cfg.epochs, "k": k}
    for seed in range(args.max_seeds):
        if seed_s and time.monotonic() + max(seed_s) > deadline:
            break
        t_seed = time.monotonic()
        for n_layers in layers:
            t = time.perf_counter()
            model, history = ag.train_artist_gnn(x, graphs, split, n_layers, cfg, seed)
            train_s = time.perf_counter() - t
            r = ag.artist_ndcg(ag.embed_artists(model, x, graphs["test"], eval_nodes, n_layers), truth, k)
            runs.append({"layers": n_layers, "seed": seed, "ndcg": r["ndcg"], "ndcg_released": r["ndcg_released"],
                         "queries": r["queries"], "epochs": history["epochs"], "train_s": train_s,
                         "flops_per_step": flops[n_layers]["per_step"], "flops_per_run": flops[n_layers]["per_run"]})
            print(f"  artist: {n_layers} layers seed {seed}: ndcg {r['ndcg']:.3f} (released formula "
                  f"{r['ndcg_released']:.3f}; log {RELEASED_NDCG[n_layers]}) in {train_s:.1f} s", file=sys.stderr,
                  flush=True)
            save({**out, "runs": runs, "table": sweep_summary(runs, layers, k), "sweep_s_per_seed": seed_s})
        seed_s.append(time.monotonic() - t_seed)
    out.update(runs=runs, table=sweep_summary(runs, layers, k), sweep_s_per_seed=seed_s)
    save(out)
    return out


def section_artist(args, save_top):
    """The graph's counts, the PyG-vs-ours check, then the sweep with the layer that passed -> "artist"."""
    import numpy as np
    from evals import artist_graph as ag
    save = lambda obj: save_top({"artist": obj})  # noqa: E731
    deadline = time.monotonic() + args.limit_s - 15
    artists, split, edges, source = load_graph(args)
    graphs = ag.message_passing_graphs(edges, split)
    out = {"graph": {"source": source, "artists": len(artists), "stored_edges": len(edges),
                     **{s: int((split == s).sum()) for s in ("train", "val", "test")},
                     "train_graph_edges": graphs["train"].shape[1], "test_graph_edges": graphs["test"].shape[1],
                     "hidden_test_edges": graphs["truth_test"].shape[1] // 2},
           "features": "random, uniform [0, 1) (artist_features 'random', seed 0)"}
    x = ag.artist_features("random", artists, dim=64 if args.tiny else 2613)
    out["features_dim"] = int(x.shape[1])
    save(out)
    try:
        out["layer_check"] = layer_check(x, graphs, split, args)
    except Exception as e:  # noqa: BLE001 -- the sweep still runs, with our layer
        out["layer_check"] = {"error": _error(e), "traceback": traceback.format_exc()[-2000:]}
    check = out["layer_check"]
    layer = "pyg" if check.get("max_abs_diff") is not None and check["max_abs_diff"] < 1e-3 else "builtin"
    save(out)

    def partial(sweep):
        out["sweep"] = sweep
        save(out)

    artist_sweep(x, graphs, np.asarray(split, dtype=object), layer, args, deadline, partial)


def run_child(args):
    """--_section NAME --_part PATH: one section in this process; its part file has what it finished,
    and on an exception the error and the traceback's end."""
    state = {}

    def save(obj):
        state.update(obj)
        _write(args._part, state)

    try:
        state["stand_ins"] = audio_stand_ins()
        {"bench": section_bench, "artist": section_artist}[args._section](args, save)
    except Exception as e:  # noqa: BLE001 -- recorded for the parent, which goes on with the next section
        traceback.print_exc()
        save({"error": _error(e), "traceback": traceback.format_exc()[-3000:]})
        return 1
    return 0


def run_limited(cmd, timeout):
    """Run cmd in a session of its own -> its exit status, or None if it ran past `timeout`: then the
    whole group is killed (Inductor's compile workers too, which would otherwise hold on to the GPU)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def limits(budget_s, tiny):
    """Seconds each section may run: the bench (with its compile) ~55% of the budget, the artist sweep
    the rest."""
    bench = budget_s * (0.5 if tiny else 0.55)
    return {"bench": bench, "artist": budget_s - bench - 10}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the JSON file written (after every section)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on a CPU: a check of the script (~1-2 min)")
    p.add_argument("--olga", default=None, help="folder with OLGA's edges.csv and split.csv (see the docstring)")
    p.add_argument("--device", default=None, help="default: cuda if there is one, else cpu")
    p.add_argument("--batch", type=int, default=None, help="paper-step batch (default 100; --tiny 4)")
    p.add_argument("--budget_s", type=float, default=None, help="seconds for all sections (default 450; --tiny 100)")
    p.add_argument("--max_seeds", type=int, default=3, help="artist sweep: seeds at most (released logs: 3)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--_section", help=argparse.SUPPRESS)
    p.add_argument("--_part", help=argparse.SUPPRESS)
    p.add_argument("--limit_s", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._section:
        return run_child(args)
    t0 = time.monotonic()
    stand_ins = audio_stand_ins()
    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget = args.budget_s or (100 if args.tiny else 450)
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; known: {', '.join(SECTIONS)}")
    if args.olga and not os.path.isdir(args.olga):
        raise SystemExit(f"--olga {args.olga}: not a folder (copy OLGA's edges.csv and split.csv there; see --help)")
    result = {"env": {**environment(args.device), "stand_ins": stand_ins, "tiny": args.tiny,
                      "budget_s": budget, "argv": sys.argv[1:]}, "errors": {}}
    _write(args.out, result)
    for section in sections:
        limit = limits(budget, args.tiny)[section]
        part = f"{args.out}.{section}.part"
        if os.path.exists(part):
            os.remove(part)
        cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--_section", section, "--_part", part,
               "--limit_s", str(limit), "--device", args.device, "--max_seeds", str(args.max_seeds)]
        cmd += (["--tiny"] if args.tiny else []) + (["--olga", args.olga] if args.olga else []) + (
            ["--batch", str(args.batch)] if args.batch else [])
        t = time.monotonic()
        print(f"device_run: {section} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
        rc = run_limited(cmd, limit + 30)  # + the child's start and last save
        why = None if rc == 0 else f"exit {rc}" if rc is not None else \
            f"timed out after {limit + 30:.0f} s (what it finished is kept)"
        got = {}
        if os.path.exists(part):
            with open(part) as f:
                got = json.load(f)
            os.remove(part)
        if why or "error" in got:
            result["errors"][section] = {"why": why, "error": got.pop("error", None),
                                         "traceback": got.pop("traceback", None)}
        result.update({k: v for k, v in got.items() if k != "stand_ins"})
        result.setdefault("seconds_per_section", {})[section] = time.monotonic() - t
        result["seconds"] = time.monotonic() - t0
        _write(args.out, result)
    print(summary(result))
    return 0 if not result["errors"] else 1


def summary(result):
    """A few lines: the rows' median samples/s and MFU, the top kernels' names, the sweep table."""
    lines = [f"device_run: {result['env'].get('device_name') or result['env']['device']}, torch "
             f"{result['env']['torch']}, {result.get('seconds', 0):.0f} s; errors: {list(result['errors']) or 'none'}"]
    for group in ("chain", "text", "compile"):
        for r in result.get("bench", {}).get(group, []):
            if "samples_per_s" in r:
                mfu = f", MFU {100 * r['mfu'][1]:.1f}%" if r.get("mfu") else ""
                lines.append(f"  {group}/{r['name']}: {r['samples_per_s'][1]:.2f} samples/s "
                             f"(x{r['speedup_vs_previous_row']:.2f} vs the row above){mfu}")
            else:
                lines.append(f"  {group}/{r['name']}: {r.get('error') or r.get('skipped')}")
    for arm, prof in result.get("profile", {}).items():  # "fastest" is a name, the rest dicts
        if isinstance(prof, dict) and "top" in prof:
            lines.append(f"  top kernels, {arm}: " + "; ".join(f"{t['name'][:40]} {100 * t['share']:.0f}%"
                                                               for t in prof["top"]))
    for n, row in result.get("artist", {}).get("sweep", {}).get("table", {}).items():
        k = next(key for key in row if key.startswith("ndcg@") and not key.endswith("formula"))
        lines.append(f"  artist {n} layers: {k} {row[k][0]:.3f}, released formula {row[k + '_released_formula'][0]:.3f}"
                     f" (log {row['released_log']}), {row['train_s'][0]:.1f} s a run, seeds {row['seeds']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
