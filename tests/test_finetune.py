"""Tests of finetune.py, stage 2 (Sec. 3.1.2, Eq. 5): the loss weights reach the loss it trains
with, and a bad --gradient_checkpointing value is refused.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_finetune.py
"""
import math
import os

import pytest
import torch

import model as htcl

from tests.helpers import SAMPLE, TINY_BERT, _pair_batch, read_log, tiny_model
from tests.own_songs import TINY_FLAGS, split_of, write_world
import data
import finetune


def test_finetune_refuses_an_unknown_checkpointing_setting(tmp_path, capsys):
    import finetune
    with pytest.raises(SystemExit):
        finetune.main(["--gradient_checkpointing", "sometimes", "--init_from", str(tmp_path / "none")])
    assert "invalid choice: 'sometimes' (choose from 'inherit', 'on', 'off')" in capsys.readouterr().err


# Checked by making its bug by hand: L_af on the rec song's audio (a full demo stage 2: L_af 1.12, L_aa
# 4.21).
def test_stage2_trains_from_the_stage1_artifact_and_its_artifact_loads(stage1, stage2):
    train, val = read_log(stage2)
    ln_b = math.log(64)
    last = train[-1]
    assert {"loss_aa", "loss_af", "loss_at"} <= set(last)
    # The favoured pairs carry signal: L_aa and L_af (both find the favoured song from the trigger's
    # audio) end below chance, and L_af is not much easier than L_aa (on this demo they end within
    # ~5% of each other). A miswired L_af that sees the recommended song's audio on both sides
    # drops to ~1.1 while L_aa stays near ln B. L_at keeps the audio-text alignment (stage 1 ends ~2.0).
    assert last["loss_aa"] < ln_b and 0.75 * last["loss_aa"] < last["loss_af"] < ln_b, last
    assert last["loss_at"] < 0.75 * ln_b, last
    assert val[-1]["val_loss"] < val[0]["val_loss"], val  # the held-out pairs' loss fell over the epochs
    m1, _ = htcl.load_artifact(stage1 / "final")
    m2, tok = htcl.load_artifact(stage2 / "final")
    assert m2.cfg == m1.cfg
    # Every tensor that stage 2 trains changed, and only those (here the unused text pooler is frozen).
    m2.freeze_unused(stage=2, use_text=True)
    trainable = {k for k, p in m2.named_parameters() if p.requires_grad}
    changed = {k for k, v in m2.state_dict().items() if not torch.equal(v, m1.state_dict()[k])}
    assert changed == trainable, (sorted(trainable - changed), sorted(changed - trainable))
    assert any(k.startswith("fusion.") for k in changed) and "logit_scale.af" in changed


# Checked by making its bug by hand: stage2_loss ignoring w_af / w_at; finetune.py not passing --weight_*.
def test_stage2_loss_weights_are_applied_in_the_model_and_by_finetune(tmp_path, monkeypatch):
    import finetune
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_BERT)
    batch = _pair_batch(tok, B=4, seed=1)
    m = tiny_model().eval()

    def weighted(parts):  # Eq. 5 with weights (0.5, 2, 3), from the unweighted parts
        return (0.5 * parts["aa"] + 2 * parts["af"] + 3 * parts["at"]).item()

    with torch.no_grad():
        for use_trigger_text in (False, True):
            _, parts = m(batch, stage=2, use_trigger_text=use_trigger_text)
            assert len({round(v.item(), 4) for v in parts.values()}) == 3  # distinct parts: a mix-up shows
            only_aa, _ = m(batch, stage=2, weights=(1.0, 0.0, 0.0), use_trigger_text=use_trigger_text)
            assert only_aa.item() == pytest.approx(parts["aa"].item(), rel=1e-6)
            mixed, _ = m(batch, stage=2, weights=(0.5, 2.0, 3.0), use_trigger_text=use_trigger_text)
            assert mixed.item() == pytest.approx(weighted(parts), rel=1e-6)
    # finetune.py passes --weight_* through to the loss it trains with
    htcl.save_artifact(m, tok, tmp_path / "art")
    captured = {}
    monkeypatch.setattr(finetune, "train", lambda cfg, model, tokenizer, loss_fn, *a, **k:
                        captured.update(model=model, loss_fn=loss_fn))
    finetune.main(["--init_from", str(tmp_path / "art"), "--catalog", os.path.join(SAMPLE, "catalog.csv"),
                   "--pairs", os.path.join(SAMPLE, "pairs.csv"), "--out_dir", str(tmp_path / "out"),
                   "--weight_aa", "0.5", "--weight_af", "2", "--weight_at", "3"])
    model = captured["model"].eval()
    with torch.no_grad():
        loss, parts = captured["loss_fn"](model, batch)
    assert loss.item() == pytest.approx(weighted(parts), rel=1e-6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoTokenizer
    folder = tmp_path_factory.mktemp("world")
    catalog, cache = write_world(str(folder))
    torch.manual_seed(0)
    cfg = htcl.HTCLConfig(audio=htcl.AudioConfig(conv_channels=16, hidden=16, layers=1, heads=2, ffn=32,
                                                 pos_conv_kernel=5, pos_conv_groups=2),
                          text_model=TINY_FLAGS[1], text_pretrained=False, proj_dims=(12, 8), fusion_dims=(8, 8))
    htcl.save_artifact(htcl.HTCL(cfg), AutoTokenizer.from_pretrained(TINY_FLAGS[1]), str(folder / "stage1"))
    return folder, catalog, cache


def _finetune_sets(folder, catalog, cache, pairs, monkeypatch):
    """finetune.main up to the loop: -> (train pair set, val pair set) it hands to train()."""
    got = {}
    monkeypatch.setattr(finetune, "train", lambda cfg, model, tok, loss, train_set, val_set, songs, stage:
                        got.update(train=train_set, val=val_set))
    finetune.main(["--init_from", str(folder / "stage1"), "--catalog", catalog, "--cache", cache, "--pairs", pairs,
                   "--out_dir", str(folder / "ft"), "--num_workers", "0"])
    return got["train"], got["val"]


def test_pairs_touching_a_val_or_test_song_are_dropped_and_counted(world, tmp_path, monkeypatch, capsys):
    folder, catalog, cache = world
    train_songs = [i for i in range(20) if split_of(i) == "train"]
    pairs = [(a, b) for a in train_songs for b in train_songs if a < b]  # 66 clean pairs
    leaks = [(0, 2), (3, 1), (5, 6), (10, 11), (15, 16)]  # s0, s5, s10, s15 test; s1, s6, s11, s16 val
    path = tmp_path / "pairs.csv"
    path.write_text("trigger_song_id,rec_song_id\n" + "".join(f"s{a},s{b}\n" for a, b in pairs + leaks))
    train_set, val_set = _finetune_sets(folder, catalog, cache, str(path), monkeypatch)
    out = capsys.readouterr().out
    assert f"dropped {len(leaks)} of {len(pairs) + len(leaks)} pairs touching a song outside the train split" in out
    c = data.load_catalog(catalog)
    held_out = set(data.split_rows(c, "val")) | set(data.split_rows(c, "test"))
    used = [p for s in (train_set, val_set) for p in s.pairs]
    assert len(used) == len(pairs) and not any(t in held_out or r in held_out for t, r in used)


def test_pairs_that_all_touch_held_out_songs_are_refused_naming_the_file(world, tmp_path, monkeypatch):
    folder, catalog, cache = world
    path = tmp_path / "leaky.csv"
    path.write_text("trigger_song_id,rec_song_id\ns0,s2\ns3,s1\n")
    with pytest.raises(data.CatalogError, match="leaky.csv: every one of its 2 pairs touches a val or test song"):
        _finetune_sets(folder, catalog, cache, str(path), monkeypatch)
