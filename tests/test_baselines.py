"""Tests of evals/baselines.py: log-mel mean + std against a hand computation, the untrained encoder
against the run's own initial weights, and `--baselines` on probe and report.

    python -m pytest -q tests/test_baselines.py
"""
import math

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.own_songs import stage1_argv, write_world  # noqa: E402

import data  # noqa: E402
import evaluate as ev  # noqa: E402
import pretrain  # noqa: E402
from evals import baselines, embeddings  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    catalog, cache = write_world(str(folder))
    # lr 0: Adam changes no weight, so the artifact holds the run's seeded initial weights
    pretrain.main(stage1_argv(catalog, cache, folder / "init", "--lr", "0", "--text_lr", "0", "--seed", "11"))
    pretrain.main(stage1_argv(catalog, cache, folder / "trained", "--seed", "11", "--lr", "3e-3"))
    return folder, catalog, cache


def test_mel_stats_are_the_per_bin_mean_and_std_over_the_songs_frames(world):
    folder, catalog, cache = world
    c = data.load_catalog(catalog)
    got_cache = baselines.mel_stats(c, cache=data.MelCache.open(cache, c))
    got_audio = baselines.mel_stats(c, rows=[3, 0])  # decoded on the fly, rows in the order given
    assert got_cache.shape == (len(c), 256) and got_audio.shape == (2, 256)
    for k, row in enumerate([3, 0]):
        mel = data.song_mel(c[row].audio)  # (T, 128)
        T = len(mel)
        for b in (0, 17, 127):  # by hand: a sum over frames, then the root mean squared deviation
            mean = sum(float(mel[t, b]) for t in range(T)) / T
            std = math.sqrt(sum((float(mel[t, b]) - mean) ** 2 for t in range(T)) / T)
            for got in (got_cache[row], got_audio[k]):
                assert got[b] == pytest.approx(mean, abs=1e-4) and got[128 + b] == pytest.approx(std, abs=1e-4)
    # the two tones' pitches differ, so their spectra do: the features tell the genres apart
    assert np.abs(got_cache[0] - got_cache[1]).max() > 1


def test_the_untrained_encoder_is_the_runs_seeded_initial_weights(world):
    folder, _, _ = world
    init = load_file(folder / "init" / "final" / "model.safetensors")
    model, seed = baselines.untrained_model(str(folder / "trained" / "final"))
    assert seed == 11 and model.text_encoder is None
    state = model.state_dict()
    audio = [k for k in init if k.startswith(("audio_encoder.", "audio_proj."))]
    assert audio and all(k in state for k in audio)
    for k in audio:
        assert np.array_equal(state[k].numpy(), init[k].numpy()), k
    trained = load_file(folder / "trained" / "final" / "model.safetensors")
    assert any(not np.array_equal(trained[k].numpy(), init[k].numpy()) for k in audio)  # training did move them


def test_probe_and_report_with_baselines_add_the_two_rows_and_the_collapse_lines(world, capsys):
    folder, catalog, cache = world
    artifact = str(folder / "trained" / "final")
    emb = folder / "emb"
    ev.main(["embed", "--artifact", artifact, "--catalog", catalog, "--cache", cache, "--out", str(emb)])
    r = ev.main(["probe", "--catalog", catalog, "--cache", cache, "--emb", str(emb), "--baselines",
                 "--label", "genre", "--seeds", "1", "--epochs", "5"])
    assert set(r) == {"emb/genre", "untrained/genre", "mel mean+std/genre"}
    # the baseline rows are the baselines themselves: the same numbers as asked for by spec
    c = data.load_catalog(catalog)
    direct = embeddings.song_embeddings("untrained:" + artifact, c, cache=data.MelCache.open(cache, c))
    model, _ = baselines.untrained_model(artifact)
    from evals.embeddings import embed_catalog
    assert np.allclose(direct, embed_catalog(model, None, c, cache=data.MelCache.open(cache, c))["audio"], atol=1e-6)
    capsys.readouterr()
    ev.main(["report", "--catalog", catalog, "--cache", cache, "--emb", str(emb), "--baselines",
             "--probe_seeds", "1", "--out", str(folder / "report")])  # no --favourites: HR@100 is "-"
    out = capsys.readouterr().out
    assert "| untrained |" in out and "| mel mean+std |" in out and "no --favourites given" in out
    assert "report: emb: participation ratio" in out and "(untrained: " in out
