"""Stage 2: contrastive fine-tuning on song pairs users favoured (HTCL Sec. 2.2, Eq. 5).

    accelerate launch finetune.py --init_from runs/pretrain/final --catalog CATALOG --cache CACHE \
        --pairs pairs.csv --out_dir runs/finetune
    accelerate launch finetune.py --preset sample_data/preset.toml       # the bundled demo
    accelerate launch finetune.py ... --no-use_text                         # HTCL_w/o_text (L_aa only)
    python data.py mine-pairs --favourites log.csv ...  then --pairs those  # HTCL_w_CF
    python finetune.py -h
    accelerate launch finetune.py --preset presets/released.toml --init_from ... --catalog ... --pairs ...

Each pair is <trigger song, recommended song>; the recommended song's text comes
from the catalog, giving the paper's <trig_audio, rec_audio, rec_text> triplets.
A pair that touches a val or test song (the catalog's split column, else stage 1's seeded 10%
val) is dropped and counted: those songs are what validation and evaluate.py score.
The stage-1 artifact (--init_from) supplies the model and tokenizer. As in the
released code, only its two encoders are kept by default: the projection heads, the
fusion MLP and the three temperatures start fresh (seeded); --init_heads artifact
keeps every weight. The final artifact goes to out_dir/final. The training loop is
pretrain.train (the same loop as stage 1); the config -> CLI and preset plumbing is training.py's.
"""
import random
from dataclasses import dataclass
from typing import Literal

import data
import model as htcl
from pretrain import TrainConfig, load_songs, train
from training import parse_config


@dataclass
class FinetuneConfig(TrainConfig):
    init_from: str = "runs/pretrain/final"  # stage-1 artifact folder
    pairs: str = ""                   # CSV trigger_song_id,rec_song_id (favoured in a "similar songs" channel)
    init_heads: Literal["fresh", "artifact"] = "fresh"  # released code (paper silent): fresh heads, fusion and temperatures; artifact = load all
    val_pairs_fraction: float = 0.1   # released code: random 90/10 split (paper silent)
    out_dir: str = "runs/finetune"
    epochs: int = 20                  # released code (paper silent)
    global_batch: int = 240           # Sec. 3.1.3: 3 x A100, global batch 240
    batch_per_device: int = 80        # 240 / 3 GPUs
    lr: float = 1e-4                  # Sec. 3.1.3: audio encoder, heads, fusion, temperatures
    text_lr: float = 3e-5             # Sec. 3.1.3: BERT
    weight_aa: float = 1.0            # Eq. 5 / released code: weights (1, 1, 1)
    weight_af: float = 1.0
    weight_at: float = 1.0
    use_text: bool = True             # False = HTCL_w/o_text (Table 2): L_aa only
    use_trigger_text: bool = False    # True = released code: L_at over both songs, L_af both ways
    gradient_checkpointing: Literal["inherit", "on", "off"] = "inherit"  # inherit (the stage-1 artifact's setting) | on | off, both towers


def main(argv=None):
    cfg = parse_config(FinetuneConfig, "finetune", argv, needs="--init_from STAGE1_ARTIFACT --catalog CATALOG --pairs PAIRS")
    model, tokenizer = htcl.load_artifact(cfg.init_from)
    if cfg.init_heads == "fresh":  # released train_stage2.py: only the two encoders come from stage 1
        model.reset_heads(cfg.seed)
    # nanochat-style: say what the stage-1 artifact decided, so a run is self-explaining.
    print(f"init_from {cfg.init_from}: audio {model.cfg.audio.layers} layers x {model.cfg.audio.hidden}, "
          f"text {model.cfg.text_model} ({model.cfg.text_pooling} pooling), embed_dim {model.cfg.embed_dim}; "
          + ("encoders only: heads, fusion and temperatures start fresh (--init_heads fresh)"
             if cfg.init_heads == "fresh" else "every weight, temperatures included (--init_heads artifact)"))
    if cfg.gradient_checkpointing != "inherit":
        on = cfg.gradient_checkpointing == "on"
        model.set_gradient_checkpointing(audio=on, text=on)
    model.train()
    model.freeze_unused(stage=2, use_text=cfg.use_text)

    catalog, cache, _, val_rows = load_songs(cfg)
    if not cfg.pairs:
        raise SystemExit("--pairs is required (or a --preset that sets it)")
    pairs, _ = data.drop_held_out_pairs(data.load_pairs(cfg.pairs, catalog), catalog, cfg.seed, cfg.pairs)
    random.Random(cfg.seed).shuffle(pairs)
    n_val = int(round(cfg.val_pairs_fraction * len(pairs)))
    val_pairs, train_pairs = pairs[:n_val], pairs[n_val:]

    weights = (cfg.weight_aa, cfg.weight_af, cfg.weight_at)

    def stage2_loss(model, batch):
        return model(batch, stage=2, weights=weights, use_text=cfg.use_text,
                     use_trigger_text=cfg.use_trigger_text)

    texts = ("trig", "rec") if cfg.use_trigger_text else ("rec",) if cfg.use_text else ()  # what the loss reads
    train(cfg, model, tokenizer, stage2_loss, data.PairDataset(catalog, train_pairs, cache, on_error="skip", texts=texts),
          data.PairDataset(catalog, val_pairs, cache, texts=texts), data.SongDataset(catalog, val_rows, cache), stage=2)


if __name__ == "__main__":
    main()
