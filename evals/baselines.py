"""The two baselines every report can show beside the trained models, so that it says whether
training helped (HTCL Sec. 3.1.3 evaluates frozen embeddings; a trained model should beat both):

  untrained:ARTIFACT   the audio encoder of ARTIFACT's config at the run's seeded initialisation,
                       built as pretrain.py builds it (torch.manual_seed(seed), then model.HTCL),
                       never trained, embedded as the artifact is (evals.embeddings.embed_catalog)
  melstats             log-mel mean + std over time: per mel bin, over the song's valid frames,
                       2 x 128 = 256-d, from the same log-mel cache (or decoded audio) the model reads

Both are `--emb` specs (evals.embeddings.song_embeddings reads them); `--baselines` on `probe` and
`report` adds them to the --emb list (with_baselines). Also here: the collapse lines `report`
prints for every model (health_lines; the rule is evals.metrics.collapse_warning).

    python evaluate.py probe --catalog C --cache CACHE --emb runs/mine/finetune/final --baselines
    python evaluate.py report --catalog C --cache CACHE --emb runs/mine/emb --baselines --out runs/mine/report
"""
import json
import os

import numpy as np
import torch

import model as htcl
from data import SongDataset
from evals.metrics import collapse_warning, embedding_health

UNTRAINED, MELSTATS = "untrained:", "melstats"
BASELINES_HELP = ("add two rows: the untrained encoder (the first --emb artifact's, at its run's seeded init) "
                  "and log-mel mean + std over time (evals/baselines.py)")
DEFAULT_SEED = 3407  # pretrain.TrainConfig's; an artifact without training metadata is built with it


def is_baseline(spec):
    return spec == MELSTATS or spec.startswith(UNTRAINED)


def mel_stats(catalog, rows=None, cache=None):
    """(len(rows), 2 * n_mels) float32: each song's per-bin mean over its valid frames, then the
    per-bin standard deviation (ddof 0) over the same frames. Padding never enters: the cache
    stores each song's valid frames only, and a decoded song is its valid frames."""
    rows = list(range(len(catalog))) if rows is None else list(rows)
    songs = SongDataset(catalog, rows, cache)  # mel(row): (T, n_mels) valid frames; raises on a bad file
    out = []
    for r in rows:
        mel = np.asarray(songs.mel(r), dtype=np.float64)  # (T, n_mels)
        out.append(np.concatenate([mel.mean(0), mel.std(0)]))
    return np.asarray(out, dtype=np.float32)


def _artifact_config(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--emb {UNTRAINED}{folder}: {folder} is not an artifact (no config.json)")
    with open(path) as f:
        return json.load(f)


def run_seed(folder):
    """The seed the run's model was built with: stage 1's (a stage-2 artifact's init_from, when it is
    still there), else the artifact's own training seed, else pretrain's default."""
    training = _artifact_config(folder).get("training", {})
    parent = training.get("init_from")
    if training.get("stage") == 2 and parent and os.path.exists(os.path.join(parent, "config.json")):
        return run_seed(parent)
    return int(training.get("seed", DEFAULT_SEED))


def untrained_model(folder):
    """ARTIFACT's model at its run's seeded initialisation -> (HTCL in eval mode, seed).

    As pretrain.main: torch.manual_seed(seed), then model.HTCL(config). The audio encoder is built
    first, so it is the run's initial encoder exactly; the heads after it follow the text tower's
    random draws, exact when the text model folder named in config.json is still there (else the
    tower is built from the saved config, offline, with the same architecture)."""
    config = _artifact_config(folder)
    seed = run_seed(folder)
    config.pop("training", None)
    cfg = htcl.HTCLConfig.from_dict(config, source=os.path.join(folder, "config.json"))
    if os.path.isdir(cfg.text_model):
        cfg.text_model_config = {}  # the path pretrain.main took: from the text model's own folder
    cfg.text_gradient_checkpointing = cfg.audio.gradient_checkpointing = False
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = htcl.HTCL(cfg)
    finally:
        torch.random.set_rng_state(state)  # the caller's random stream is left as it was
    model.text_encoder = None  # audio embeddings only
    return model.eval(), seed


def baseline_embeddings(spec, catalog, mode=None, cache=None, batch_size=16):
    """A baseline --emb spec -> (len(catalog), D) float32, row r = catalog song r."""
    if spec == MELSTATS:
        return mel_stats(catalog, cache=cache)
    from evals.embeddings import DEVICE, embed_catalog
    folder = spec[len(UNTRAINED):]
    model, seed = untrained_model(folder)
    print(f"{spec}: {folder}'s audio encoder at its seeded init (seed {seed}), untrained: embedding "
          f"{len(catalog)} songs")
    return embed_catalog(model.to(DEVICE), None, catalog, mode=mode, kinds=("audio",), cache=cache,
                         batch_size=batch_size)["audio"]


def baseline_name(spec):
    return "untrained" if spec.startswith(UNTRAINED) else "mel mean+std"


def _artifact_of(spec):
    """The artifact behind an --emb: the folder itself, or the one an `embed` folder was made from."""
    from evals.embeddings import is_artifact
    if is_artifact(spec):
        return spec
    meta = os.path.join(spec, "meta.json") if os.path.isdir(spec) else None
    if meta and os.path.exists(meta):
        with open(meta) as f:
            artifact = json.load(f).get("artifact")
        if artifact and os.path.exists(os.path.join(artifact, "config.json")):
            return artifact
    return None


def with_baselines(specs):
    """--baselines: specs + the untrained encoder of the first --emb with an artifact behind it
    (an artifact folder, or an `embed` folder whose meta.json names one) + melstats."""
    artifacts = [a for a in map(_artifact_of, specs) if a]
    extra = [UNTRAINED + artifacts[0]] if artifacts else []
    if not artifacts:
        print("--baselines: no --emb is an artifact or an embed folder of one, so no untrained-encoder row")
    return list(specs) + [s for s in extra + [MELSTATS] if s not in specs]


def health_lines(embs):
    """{name: (N, D) embeddings} -> the lines `report` prints: each model's participation ratio and
    mean pairwise cosine, beside the untrained encoder's when it is one of them, and a collapse
    warning for each trained model that looks collapsed (evals.metrics.collapse_warning)."""
    health = {name: embedding_health(x) for name, x in embs.items()}
    ref = health.get("untrained")
    lines = []
    for name, h in health.items():
        beside = f" (untrained: {ref['participation_ratio']:.2f}, {ref['mean_cosine']:.3f})" \
            if ref and name != "untrained" else ""
        lines.append(f"report: {name}: participation ratio {h['participation_ratio']:.2f}, mean pairwise "
                     f"cosine {h['mean_cosine']:.3f}{beside}")
        warning = collapse_warning(h, ref, f"{name} embeddings") \
            if name not in ("untrained", "mel mean+std") and not name.startswith("random") else None
        if warning:
            lines.append(f"report: {warning}")
    return lines, health
