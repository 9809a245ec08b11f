"""
The synthetic "music service" this folder holds: a tiny world with known structure that stands in
for the paper's private industrial data, so every part of HTCL runs and can be checked on a CPU.

Paper: Pan et al., "HTCL", ICMR 2025 (arXiv 2505.23298). What it stands in for:
  Sec. 2.1 / 3.1.3  songs with audio and text (title, artists, lyrics)      -> catalog.csv, audio/
  Sec. 2.2          <trigger song, recommended song> pairs users favoured     -> pairs.csv
  Table 2           users' favourite sequences (HTCL_w_CF mines them)         -> favourites.csv
  Sec. 3.1.3        semantic labels (genre, language), matching (favourites),
                    ranking impressions for DIN (clicks, favours)             -> catalog.csv, impressions.csv
  artist-similarity graph (GraphSAGE protocol) and its artist split           -> artist_graph.csv, artist_split.csv
  CrossMuSim descriptions (aspects, caption)                                  -> catalog.csv
  a tiny BERT (config + WordPiece vocabulary, no weights)                     -> tiny-bert/

Songs carry a genre, a language and a hidden taste factor; artists mostly share all three.
  genre    is audible (timbre = harmonic series, rhythm = tempo + accent pattern + drums)
           and written (title and lyrics words),
  language is audible (formant bands of a whispered "voice" in syllables) and written (lyrics),
  hidden   is audible only (a drone at a factor-specific pitch); no text mentions it.
Users favour songs mostly by hidden factor, a little by genre, so stage 1 (audio <-> text)
cannot learn the hidden factor from text and stage 2 (favoured pairs) can: the paper's story.
Half the favourites come through a "similar songs" channel (recommended from the previous
song, so they also lean towards its hidden factor and genre), half from taste alone.
pairs.csv holds the channel's <trigger, favourite> pairs, HTCL's triplets; HTCL_w_CF's pairs
are mined from the favourites' co-occurrence, both channels alike (`data.py mine-pairs`).

Everything derives from --seed: a rerun is byte-identical. The steps below draw from one random
stream in a fixed order (artists, songs, texts, favourites, pairs, impressions, artist graph);
audio and the CrossMuSim descriptions draw from streams of their own.

Command (from any folder; sample_data/regenerate.sh is the bundled world's):
  python sample_data/make_world.py --out sample_data --songs 640 --users 250 --seed 3407 \\
      --artists 60 --max_pairs 4000
"""

import argparse
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data.py, from any folder
from data import SAMPLE_RATE, Song, mine_cooccurrence_pairs, write_csv  # noqa: E402

GENRES = {  # timbre: harmonic roll-off k^-r, odd harmonics only; rhythm: bpm, 8th-note accents, note decay (s)
    "ambient":    dict(rolloff=2.4, odd=False, bpm=66, decay=1.00, accents=(1, 0, .5, 0, .8, 0, .4, 0),
                       kick=0.0, hats=0.0, scale=(0, 2, 4, 7, 9)),
    "rock":       dict(rolloff=0.9, odd=False, bpm=124, decay=0.20, accents=(1, .6, .8, .6, 1, .6, .8, .6),
                       kick=0.8, hats=0.3, scale=(0, 3, 5, 7, 10)),
    "jazz":       dict(rolloff=1.6, odd=True, bpm=100, decay=0.35, accents=(1, 0, .7, .5, 0, .8, .6, 0),
                       kick=0.0, hats=0.5, scale=(0, 2, 3, 5, 7, 9, 10)),
    "electronic": dict(rolloff=0.7, odd=True, bpm=128, decay=0.08, accents=(1, .8, 1, .8, 1, .8, 1, .8),
                       kick=1.0, hats=0.6, scale=(0, 2, 3, 5, 7, 8, 10)),
    "folk":       dict(rolloff=1.9, odd=False, bpm=84, decay=0.50, accents=(1, .4, .7, .4, 1, .4, .7, .4),
                       kick=0.0, hats=0.0, scale=(0, 2, 4, 5, 7, 9, 11)),
    "hiphop":     dict(rolloff=1.2, odd=False, bpm=90, decay=0.12, accents=(1, 0, 0, .7, .9, 0, .6, 0),
                       kick=1.0, hats=0.4, scale=(0, 3, 5, 7, 10)),
}
GENRE_WORDS = {
    "ambient": "drift haze ocean still glow breath vapor horizon calm mist float echo".split(),
    "rock": "guitar thunder highway rebel fire stone loud steel riot engine wild road".split(),
    "jazz": "blue smoke velvet swing saxophone midnight cafe brass cool lounge rain bebop".split(),
    "electronic": "neon pulse circuit laser voltage synth chrome digital grid signal rave techno".split(),
    "folk": "river meadow harvest cabin willow lantern barn fiddle valley home wood mountain".split(),
    "hiphop": "street block rhyme flow hustle beat crown city cipher gold corner mic".split(),
}
GENERIC_WORDS = "love night day heart dream light time world you me forever again down up sweet".split()
LANGUAGES = {  # two vowels as (F1, F2, F3) Hz; syllables/s; letters the made-up words are built from
    "kora": dict(vowels=((750, 1250, 2600), (500, 900, 2400)), rate=5.0, consonants="ktrg", letters="ao"),
    "lumi": dict(vowels=((300, 2300, 3000), (350, 800, 2250)), rate=4.0, consonants="lmnh", letters="iu"),
    "sefa": dict(vowels=((550, 1850, 2550), (650, 1650, 3400)), rate=6.0, consonants="sfvz", letters="ea"),
    "dobu": dict(vowels=((400, 1050, 3300), (600, 1400, 2000)), rate=4.5, consonants="dbpw", letters="ou"),
}
# CrossMuSim-style descriptions (aspects = tag keywords, caption = a few sentences), written from a
# song's genre, language and voicing; like the rest of the text they never mention the hidden factor.
GENRE_ASPECTS = {
    "ambient": "calm dreamy slow soft floating atmospheric".split(),
    "rock": "loud energetic guitar driving raw distorted".split(),
    "jazz": "smooth swing saxophone mellow relaxed improvised".split(),
    "electronic": "danceable synth energetic pulsing club futuristic".split(),
    "folk": "warm acoustic fiddle nostalgic gentle rustic".split(),
    "hiphop": "groovy beat urban confident rhymes bouncy".split(),
}
GENRE_SCENES = {
    "ambient": ("sleep", "meditation"), "rock": ("driving", "the gym"), "jazz": ("a late dinner", "a rainy day"),
    "electronic": ("a party", "running"), "folk": ("a campfire", "a slow morning"), "hiphop": ("the street", "a workout"),
}
HIDDEN_DRONE_HZ = (200, 270, 365, 492, 665, 897, 1211)  # hidden factor h -> drone pitch (x1, x1.5, x2)
SYNTH_SECONDS = (3.5, 5.0)  # song durations; 1.5% of songs are 0.8-1.5 s to exercise MIN_FRAMES padding
TASTE_GENRE, TASTE_HIDDEN = 0.7, 4.0  # a user's taste weights: hidden >> genre, so ~90% of favourites carry it


# -----------------------------------------------------------------------------
# One song's audio


def _band_noise(rng, n, centers, widths, gains):
    """White noise shaped in the frequency domain by Gaussian bumps: formant-like bands."""
    f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    shape = sum(g * np.exp(-0.5 * ((f - c) / w) ** 2) for c, w, g in zip(centers, widths, gains))
    return np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * shape, n=n)


def _unit(x):
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def synth_audio(rng, genre, language, hidden, seconds, voiced=True):
    """One synthetic song -> float32 mono waveform at 16 kHz (see the module docstring)."""
    g, sr = GENRES[genre], SAMPLE_RATE
    n = int(seconds * sr)
    t = np.arange(n) / sr
    # melody: one note per 8th, pitch from the genre's scale, genre timbre via a wavetable
    step = 60.0 / (g["bpm"] * rng.uniform(0.95, 1.05)) / 2  # tempo jitter +-5%
    k = (t // step).astype(int)
    tin = t - k * step  # time since this 8th-note's onset
    n_steps = k[-1] + 1
    semis = np.array(g["scale"])[rng.integers(0, len(g["scale"]), n_steps)] + 12 * rng.integers(0, 2, n_steps)
    freq = 110.0 * 2 ** (rng.uniform(0, 18) / 12) * 2 ** (semis[k] / 12)  # tonic between A2 and ~D#4
    accents = np.array(g["accents"])[np.arange(n_steps) % 8] * rng.uniform(0.8, 1.0, n_steps)
    env = accents[k] * np.exp(-tin / g["decay"]) * np.minimum(1.0, tin / 0.005)
    harm = np.arange(1, 11)
    amps = harm ** -g["rolloff"] * np.where(g["odd"] & (harm % 2 == 0), 0.1, 1.0)
    u = np.arange(2048) / 2048
    table = (amps[:, None] * np.sin(2 * np.pi * harm[:, None] * u)).sum(0)
    phase = (np.cumsum(freq) / sr) % 1.0
    melody = env * np.interp(phase * 2048, np.arange(2049), np.append(table, table[0]))
    # drums: a falling-pitch kick on each beat, band noise "hats" on each accented 8th
    tb = t % (2 * step)
    kick = np.exp(-tb / 0.1) * np.sin(2 * np.pi * (45 * tb + 75 * 0.03 * (1 - np.exp(-tb / 0.03))))
    hats = _band_noise(rng, n, [4500], [700], [1.0]) * accents[k] * np.exp(-tin / 0.03)
    voice = _voice(rng, LANGUAGES[language], seconds, n) if voiced else np.zeros(n)
    # hidden factor: a drone (root, fifth, octave) at a factor-specific pitch, slowly swelling
    # in one stretch covering 40-100% of the song, quiet, and detuned up to +-5% (classes are 35%
    # apart), so it is audible but not the loudest thing in the mix
    c = HIDDEN_DRONE_HZ[hidden] * rng.uniform(0.95, 1.05)
    ph = rng.uniform(0, 2 * np.pi, 3)
    drone = (np.sin(2 * np.pi * c * t + ph[0]) + 0.5 * np.sin(2 * np.pi * 1.5 * c * t + ph[1])
             + 0.35 * np.sin(2 * np.pi * 2 * c * t + ph[2]))
    drone *= 1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t)
    span = rng.uniform(0.4, 1.0) * seconds
    on = rng.uniform(0, seconds - span)
    drone *= np.clip(np.minimum(t - on, on + span - t) / 0.3, 0, 1)  # 0.3 s fade in and out
    gain = lambda: rng.uniform(0.7, 1.3)  # per-song mix randomness  # noqa: E731
    x = (_unit(melody) * gain() + _unit(kick) * g["kick"] * 0.8 * gain()
         + _unit(hats) * g["hats"] * 0.5 * gain() + (_unit(voice) * 0.7 * gain() if voiced else 0)
         + _unit(drone) * 0.25 * gain())
    # background noise, pink-ish (1/sqrt f amplitude), at 15-30 dB SNR
    f = np.fft.rfftfreq(n, 1 / sr)
    noise = _unit(np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) / np.sqrt(np.maximum(f, 20)), n=n))
    x = x + noise * np.sqrt(np.mean(x ** 2)) * 10 ** (-rng.uniform(15, 30) / 20)
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.02)
    x = x * fade
    return (x / (np.abs(x).max() + 1e-12) * rng.uniform(0.3, 0.9)).astype(np.float32)


def _voice(rng, lang, seconds, n):
    """Whispered vowels of the language (formant bands), in syllables grouped into phrases -> (n,)."""
    sr, voice = SAMPLE_RATE, np.zeros(n)
    jitter = rng.uniform(0.96, 1.04)  # the singer's vocal tract length
    envs = [np.zeros(n), np.zeros(n)]
    rate = lang["rate"] * rng.uniform(0.9, 1.1)
    s, phrase_end = rng.uniform(0, 0.5), 0.0
    while s < seconds:
        if s > phrase_end:  # phrases of 1.5-3 s separated by 0.3-1 s rests
            phrase_end = s + rng.uniform(1.5, 3.0)
        m = int(0.7 / rate * sr)  # syllable length
        a = int(s * sr)
        b = min(n, a + m)
        envs[rng.integers(0, 2)][a:b] += np.hanning(m)[: b - a]
        s += 1.0 / rate * rng.uniform(0.85, 1.15)
        if s > phrase_end:
            s += rng.uniform(0.3, 1.0)
    for v, e in zip(lang["vowels"], envs):
        voice += e * _band_noise(rng, n, np.array(v) * jitter, (90, 120, 150), (1.0, 0.6, 0.35))
    return voice


# -----------------------------------------------------------------------------
# The world, step by step (each step draws from `rng` in the order make_world calls it)


@dataclass
class Artists:
    genre: np.ndarray     # (A,) index into GENRES
    language: np.ndarray  # (A,) index into LANGUAGES
    hidden: np.ndarray    # (A,) index into HIDDEN_DRONE_HZ
    name: list            # A unique made-up names


@dataclass
class Songs:
    artist: np.ndarray    # (N,) index into Artists
    genre: np.ndarray     # (N,) mostly the artist's, likewise language and hidden
    language: np.ndarray
    hidden: np.ndarray
    voiced: np.ndarray    # (N,) bool; instrumentals have no voice and empty lyrics
    pop: np.ndarray       # (N,) log popularity
    split: np.ndarray     # (N,) "train" | "val" | "test"


def _made_up_word(rng, lang, syllables):
    L = LANGUAGES[lang]
    return "".join(rng.choice(list(L["consonants"])) + rng.choice(list(L["letters"])) for _ in range(syllables))


def _softmax(logits):
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _taste(songs, genre, hidden):
    """A user's logits over songs: a weak genre taste, a strong hidden-factor taste, popularity."""
    return TASTE_GENRE * (songs.genre == genre) + TASTE_HIDDEN * (songs.hidden == hidden) + songs.pop


def make_artists(rng, num_artists):
    """Artists: one genre (balanced), one language (skewed, like a real catalog), one hidden factor."""
    languages = list(LANGUAGES)
    genre = rng.permutation(np.arange(num_artists) % len(GENRES))
    language = rng.choice(len(languages), num_artists, p=[0.35, 0.3, 0.2, 0.15])
    hidden = rng.integers(0, len(HIDDEN_DRONE_HZ), num_artists)  # independent of genre: text cannot reveal it
    names = []
    for a in range(num_artists):
        while True:
            name = " ".join(_made_up_word(rng, languages[language[a]], int(rng.integers(2, 4))).capitalize()
                            for _ in range(int(rng.integers(1, 3))))
            if name not in names:
                names.append(name)
                break
    return Artists(genre, language, hidden, names)


def make_songs(rng, artists, num_songs):
    """Songs: every artist gets >= 3 (when there are enough songs), the rest follow artist
    popularity; genre, language and hidden factor mostly the artist's; split 80/10/10 by genre."""
    N, A, G = num_songs, len(artists.name), len(GENRES)
    base = np.repeat(np.arange(A), 3) if N >= 3 * A else np.empty(0, int)
    artist = rng.permutation(np.concatenate([base, rng.choice(A, N - len(base), p=rng.dirichlet(np.full(A, 2.0)))]))
    keep = lambda own, p, K: np.where(rng.random(N) < p, own, rng.integers(0, K, N))  # noqa: E731
    genre = keep(artists.genre[artist], 0.85, G)
    language = keep(artists.language[artist], 0.9, len(LANGUAGES))
    hidden = keep(artists.hidden[artist], 0.8, len(HIDDEN_DRONE_HZ))
    voiced = rng.random(N) >= 0.05  # 5% instrumentals
    pop = rng.normal(0, 0.5, N)
    split = np.empty(N, dtype=object)
    for gi in range(G):  # stratified by genre
        rows = rng.permutation(np.flatnonzero(genre == gi))
        n_tr, n_va = int(round(0.8 * len(rows))), int(round(0.1 * len(rows)))
        split[rows[:n_tr]], split[rows[n_tr:n_tr + n_va]], split[rows[n_tr + n_va:]] = "train", "val", "test"
    return Songs(artist, genre, language, hidden, voiced, pop, split)


def song_id(i):
    return f"s{i + 1:04d}"


def write_audio(out, seed, songs):
    """Every song's audio file into out/audio/ (emptied first) -> its path relative to `out`.
    Mostly 16 kHz mono MP3 (CBR 16 kbps: small, and byte-deterministic unlike OGG, whose stream
    serial number is random); a few FLAC at 22.05 kHz and stereo WAV at 44.1 kHz so the decoder,
    downmix and resampler paths are exercised. Each song has a stream of its own, [seed, i]."""
    genres, languages = list(GENRES), list(LANGUAGES)
    shutil.rmtree(os.path.join(out, "audio"), ignore_errors=True)
    os.makedirs(os.path.join(out, "audio"))
    paths = []
    for i in range(len(songs.genre)):
        srng = np.random.default_rng([seed, i])
        kind = "flac" if i % 64 == 7 else "wav" if i % 211 == 100 else "mp3"  # 1 in 64, 1 in 211
        seconds = srng.uniform(0.8, 1.5) if srng.random() < 0.015 else srng.uniform(*SYNTH_SECONDS)
        seconds = min(seconds, {"flac": 3.0, "wav": 1.5, "mp3": seconds}[kind])  # lossless: keep short
        x = synth_audio(srng, genres[songs.genre[i]], languages[songs.language[i]], int(songs.hidden[i]),
                        seconds, bool(songs.voiced[i]))
        audio = f"audio/{song_id(i)}.{kind}"
        path = os.path.join(out, audio)
        if kind == "flac":
            sf.write(path, soxr.resample(x, SAMPLE_RATE, 22050), 22050, subtype="PCM_16")
        elif kind == "wav":
            y = soxr.resample(x, SAMPLE_RATE, 44100)
            sf.write(path, np.stack([y * 1.1, y * 0.9], 1).clip(-1, 1), 44100, subtype="PCM_16")
        else:
            sf.write(path, x, SAMPLE_RATE, format="MP3", subtype="MPEG_LAYER_III",
                     compression_level=0.95, bitrate_mode="CONSTANT")
        paths.append(audio)
    return paths


def make_song_texts(rng, artists, songs):
    """[title, artists, lyrics] of every song: genre and language are written, the hidden factor never is."""
    genres, languages = list(GENRES), list(LANGUAGES)
    texts = []
    for i in range(len(songs.genre)):
        genre, lang = genres[songs.genre[i]], languages[songs.language[i]]
        gw = GENRE_WORDS[genre]
        title = " ".join(rng.choice(gw) if rng.random() < 0.5 else rng.choice(GENERIC_WORDS)
                         for _ in range(int(rng.integers(1, 4)))).title()
        own = songs.artist[i]
        artist_str = artists.name[own]
        if rng.random() < 0.1:  # a featured artist of the same genre
            artist_str += ", " + artists.name[rng.choice(np.flatnonzero(artists.genre == artists.genre[own]))]
        lyrics = ""
        if songs.voiced[i]:
            lyrics = "\n".join(" ".join(rng.choice(gw) if rng.random() < 0.2 else
                                        _made_up_word(rng, lang, int(rng.integers(1, 4)))
                                        for _ in range(int(rng.integers(3, 8))))
                               for _ in range(int(rng.integers(2, 5))))
        texts.append([title, artist_str, lyrics])
    return texts


def _synth_description(rng, genre, language, voiced):
    """[aspects, caption] of one synthetic song: the genre and 2-4 of its aspect words as tags, and
    2-3 short sentences (sound, voice, scene)."""
    words = GENRE_ASPECTS[genre]
    picked = [words[j] for j in rng.permutation(len(words))[:int(rng.integers(2, 5))]]
    aspects = [genre] + picked + ([] if voiced else ["instrumental"])
    article = "An" if picked[0][0] in "aeiou" else "A"
    sentences = [f"{article} {picked[0]} {genre} track with a {picked[1]} feel."]
    sentences.append(f"The vocals are in {language}." if voiced else "There are no vocals.")
    if rng.random() < 0.5:
        sentences.append(f"Good for {GENRE_SCENES[genre][int(rng.integers(2))]}.")
    return [", ".join(aspects), " ".join(sentences)]


def catalog_rows(seed, songs, audio, texts):
    """catalog.csv's rows: id, audio, the texts, the labels, and CrossMuSim's aspects and caption.
    The descriptions draw from a stream of their own (spawn key 12), added after the rest of the
    world was fixed, so that every other file stayed byte-identical."""
    genres, languages = list(GENRES), list(LANGUAGES)
    arng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(12,)))
    rows = []
    for i, (title, artist_str, lyrics) in enumerate(texts):
        genre, lang = genres[songs.genre[i]], languages[songs.language[i]]
        rows.append([song_id(i), audio[i], title, artist_str, lyrics, genre, lang, f"h{songs.hidden[i]}",
                     f"a{songs.artist[i] + 1:03d}", songs.split[i]])
    for i, row in enumerate(rows):
        row += _synth_description(arng, genres[songs.genre[i]], languages[songs.language[i]], bool(songs.voiced[i]))
    return rows


def make_users_and_favourites(rng, songs, users):
    """Each user: a strong hidden-factor taste and a weak genre taste; 35-60 favourites. Half the
    favourites come from a "similar songs" channel: songs recommended from the previous song (the
    trigger), so they also lean towards it; the other half from the user's taste alone.
    -> (favourites [(user, row, timestamp)], their CSV rows, the channel's (trigger, favourite) pairs)."""
    N = len(songs.genre)
    favs, fav_rows, similar_pairs = [], [], []
    for u in range(users):
        uid, ug, uh = f"u{u + 1:04d}", rng.integers(0, len(GENRES)), rng.integers(0, len(HIDDEN_DRONE_HZ))
        taste = _taste(songs, ug, uh)
        ts, prev, chosen = 1_700_000_000 + int(rng.integers(0, 7 * 86400)), None, np.zeros(N, bool)
        for _ in range(min(int(rng.integers(35, 61)), N - 1)):
            logits = taste.copy()
            similar = prev is not None and rng.random() < 0.5
            if similar:
                logits += 1.5 * (songs.hidden == songs.hidden[prev]) + 0.5 * (songs.genre == songs.genre[prev])
            logits[chosen] = -np.inf
            song = int(rng.choice(N, p=_softmax(logits)))
            if similar:
                similar_pairs.append((prev, song))
            prev = song
            chosen[prev] = True
            ts += int(rng.exponential(3 * 3600)) + 30
            favs.append((uid, prev, float(ts)))
            fav_rows.append([uid, song_id(prev), ts])
    return favs, fav_rows, similar_pairs


def make_pairs(rng, seed, songs, favs, similar_pairs, max_pairs):
    """Stage-2 pairs: HTCL's <trigger, recommended, favoured> triplets are the similar-songs
    channel's (trigger, favourite) pairs, both songs in train, capped at max_pairs. Co-occurrence
    of favourites (which HTCL_w_CF mines) also pairs songs favoured for the user's taste alone."""
    train = songs.split == "train"
    # Kept so the bundled files stay byte-identical: earlier versions capped consecutive favourites here.
    consecutive = [p for p in mine_cooccurrence_pairs(favs, window=2) if train[p[0]] and train[p[1]]]
    if len(consecutive) > max_pairs:
        rng.choice(len(consecutive), max_pairs, replace=False)
    pairs = [p for p in similar_pairs if train[p[0]] and train[p[1]]]
    if len(pairs) > max_pairs:  # a stream of its own (spawn key 13), for the same reason
        prng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(13,)))
        pairs = [pairs[k] for k in np.sort(prng.choice(len(pairs), max_pairs, replace=False))]
    return pairs


def make_impressions(rng, songs, users):
    """Impressions for DIN (CTR: days 1-7 train, day 8 test): half personalised, half random songs;
    clicks follow taste; favouring a clicked song follows the hidden factor much more.
    -> rows [user_id, song_id, day, clicked, favoured]."""
    N = len(songs.genre)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    rows = []
    for u in range(users):
        uid = f"u{u + 1:04d}"
        # impressions users are a fresh draw of tastes
        ug, uh = rng.integers(0, len(GENRES)), rng.integers(0, len(HIDDEN_DRONE_HZ))
        p_user = _softmax(_taste(songs, ug, uh))
        for day in range(1, 9):
            k = int(rng.integers(8, 17))
            songs_today = np.where(rng.random(k) < 0.5, rng.choice(N, k, p=p_user), rng.integers(0, N, k))
            for s in songs_today:
                gm, hm = float(songs.genre[s] == ug), float(songs.hidden[s] == uh)
                clicked = rng.random() < sig(-1.5 + 0.7 * gm + 1.3 * hm + 0.3 * songs.pop[s])
                favoured = clicked and rng.random() < sig(-1.0 + 2.0 * hm + 0.3 * gm)
                rows.append([uid, song_id(s), day, int(clicked), int(favoured)])
    return rows


def make_artist_graph(rng, artists):
    """The "similar to" artist graph (like AllMusic/OLGA), likelier for a shared genre or hidden
    factor, and a 60/20/20 artist split (so the val and test artists have enough edges among
    themselves to score NDCG) -> (edge rows [artist_a, artist_b], split rows [artist_id, split])."""
    A = len(artists.name)
    edges = []
    for a in range(A):
        for b in range(a + 1, A):
            p = 0.03 + 0.3 * (artists.genre[a] == artists.genre[b]) + 0.45 * (artists.hidden[a] == artists.hidden[b])
            if rng.random() < p:
                edges.append([f"a{a + 1:03d}", f"a{b + 1:03d}"])
    order = rng.permutation(A)
    a_split = np.where(np.arange(A) < 0.6 * A, "train", np.where(np.arange(A) < 0.8 * A, "val", "test"))
    return edges, sorted([f"a{order[j] + 1:03d}", a_split[j]] for j in range(A))


def write_tiny_bert(bert_dir, texts):
    """A tiny BERT into bert_dir (replaced): config + WordPiece vocab from the song texts (no
    weights: the model is built from the config) -> vocabulary size.
    NOTE: tokenizers' WordPieceTrainer breaks ties in hash-map order, so its vocab changes from run
    to run; instead the vocab is every character (word-initial and "##" continuation) plus the
    words seen at least twice, most frequent first, using the same BERT normalizer and
    pre-tokenizer. WordPiece then spells rarer words out in characters."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertConfig, BertTokenizer
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for text in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    frequent = [w for w, c in sorted(words.items(), key=lambda wc: (-wc[1], wc[0])) if c >= 2 and len(w) > 1]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + frequent
    vocab = {w: i for i, w in enumerate(tokens[:4000])}
    shutil.rmtree(bert_dir, ignore_errors=True)
    tok = BertTokenizer(vocab=vocab, do_lower_case=True)
    tok.model_max_length = 512
    tok.save_pretrained(bert_dir)
    BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=128, max_position_embeddings=512).save_pretrained(bert_dir)
    return len(vocab)


CATALOG_HEADER = ["song_id", "audio", "title", "artists", "lyrics", "genre", "language", "hidden_factor",
                  "artist_id", "split", "aspects", "caption"]


def make_world(out, songs=640, users=250, seed=3407, artists=60, max_pairs=4000):
    """Write the synthetic world to `out`: catalog.csv + audio/, favourites.csv, pairs.csv,
    impressions.csv, artist_graph.csv, artist_split.csv and tiny-bert/. Everything derives from
    `seed`; a rerun is byte-identical. audio/ and tiny-bert/ are replaced; other files in `out`
    are left alone. -> counts of what was written."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    artist_table = make_artists(rng, artists)
    song_table = make_songs(rng, artist_table, songs)
    audio = write_audio(out, seed, song_table)
    texts = make_song_texts(rng, artist_table, song_table)
    write_csv(os.path.join(out, "catalog.csv"), CATALOG_HEADER, catalog_rows(seed, song_table, audio, texts))
    favs, fav_rows, similar_pairs = make_users_and_favourites(rng, song_table, users)
    write_csv(os.path.join(out, "favourites.csv"), ["user_id", "song_id", "timestamp"], fav_rows)
    pairs = make_pairs(rng, seed, song_table, favs, similar_pairs, max_pairs)
    write_csv(os.path.join(out, "pairs.csv"), ["trigger_song_id", "rec_song_id"],
              [[song_id(a), song_id(b)] for a, b in pairs])
    imp_rows = make_impressions(rng, song_table, users)
    write_csv(os.path.join(out, "impressions.csv"), ["user_id", "song_id", "day", "clicked", "favoured"], imp_rows)
    edges, artist_split = make_artist_graph(rng, artist_table)
    write_csv(os.path.join(out, "artist_graph.csv"), ["artist_a", "artist_b"], edges)
    write_csv(os.path.join(out, "artist_split.csv"), ["artist_id", "split"], artist_split)
    bert_texts = [Song(song_id(i), audio[i], *text).text for i, text in enumerate(texts)]
    vocab = write_tiny_bert(os.path.join(out, "tiny-bert"), bert_texts)

    counts = {"songs": songs, "artists": artists, "users": users, "favourites": len(fav_rows), "pairs": len(pairs),
              "impressions": len(imp_rows), "artist_edges": len(edges), "vocab": vocab}
    print(f"make_world -> {out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the seeded synthetic music service: catalog, audio, "
                                            "user logs, artist graph and a tiny BERT.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--out", required=True, default=argparse.SUPPRESS,
                   help="output folder (its audio/ and tiny-bert/ are replaced)")
    p.add_argument("--songs", type=int, default=640, help="songs in the catalog")
    p.add_argument("--users", type=int, default=250, help="users (favourites and impressions)")
    p.add_argument("--seed", type=int, default=3407, help="everything derives from it")
    p.add_argument("--artists", type=int, default=60, help="artists (each gets >= 3 songs when there are enough)")
    p.add_argument("--max_pairs", type=int, default=4000, help="cap on pairs.csv rows")
    args = p.parse_args(argv)
    make_world(args.out, args.songs, args.users, args.seed, args.artists, args.max_pairs)


if __name__ == "__main__":
    main()
