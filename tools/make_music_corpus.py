"""A small real-music corpus for the small-catalog recipe (presets/small.toml): excerpts of real
recordings shipped in Debian packages (game soundtracks, Ogg) and of music21's bundled scores
rendered by FluidSynth with a General MIDI soundfont, several excerpts per work.

Why: the bundled synthetic world cannot show whether training on a few hundred real songs helps
or collapses the embeddings; this corpus can, and anyone can rebuild it offline. The HTCL paper
(Pan et al., ICMR 2025, Sec. 2.1 / 2.2, 3.1.3) trains stage 1 on (audio, text) and stage 2 on
pairs of songs users favoured together; here stage 2's pairs are two excerpts of the same work.

Needs (Debian 12):
  apt-get install fluidsynth fluid-soundfont-gm drascula-music singularity-music hyperrogue-music \
      fretsonfire-songs-muldjord fretsonfire-songs-sectoid pushover-data planetblupi-music-ogg
  pip install music21
Run:
  python tools/make_music_corpus.py --out ~/corpus                 # ~26 min on 2 busy cores (music21 parsing)
  python data.py prepare --catalog ~/corpus/catalog.csv --cache ~/corpus/cache

Writes to --out (audio is never part of the repo):
  clips/*.flac    16 kHz mono excerpts of --clip_seconds, non-overlapping within a work
  catalog.csv     song_id,audio,title,artists,lyrics,style,work_id,split  (split by WORK: train | val)
  pairs.csv       trigger_song_id,rec_song_id: every ordered pair of excerpts of one training work
  labels.csv      song_id,style,work_id,split: the style probe's labels
Deterministic for a given --seed and set of installed packages; a source that is not installed is
skipped with a line saying so. Renders are kept in --out/render, so a second run is quick.
"""
import argparse
import csv
import glob
import os
import random
import subprocess
import sys
import tempfile
from collections import Counter

import numpy as np
import soundfile as sf
import soxr

SR = 16000
SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
DECAYING = [0, 6, 24, 46, 11, 45]  # GM piano, harpsichord, nylon guitar, harp, vibraphone, pizzicato

# Real recordings: style -> (glob of files, artists text). One file = one work.
REAL = {
    "adventure_game": ("/usr/share/scummvm/drascula/audio/track*.ogg", "Drascula soundtrack"),
    "electronic_ambient": ("/usr/share/games/singularity/music/*.ogg", "Endgame Singularity soundtrack"),
    "game_ambient": ("/usr/share/hyperrogue/music/*.ogg", "HyperRogue soundtrack"),
    "rock": ("/usr/share/games/fretsonfire/data/songs/*/*/song.ogg", "Frets on Fire"),
    "puzzle_game": ("/usr/share/pushover/themes/*.ogg", "Pushover soundtrack"),
    "kids_game": ("/usr/share/planetblupi/music/*.ogg", "Planet Blupi soundtrack"),
}

# Scores: style -> (music21 corpus composers/paths, file filter, GM programs to draw from, max works,
# artists text). A program is drawn per work, so a style is not one timbre.
SCORES = {
    "baroque_chorale": (["bach"], ".mxl", [19, 20, 48, 52, 0, 6], 30, "J. S. Bach"),
    "renaissance_mass": (["palestrina"], ".krn", [52, 53, 19, 74, 71], 30, "Palestrina"),
    "madrigal": (["monteverdi"], ".mxl", [6, 24, 46, 0, 52, 42], 30, "Monteverdi"),
    "medieval": (["trecento"], ".xml", [74, 75, 24, 46, 71, 68], 30, "Trecento"),
    "fiddle_tune": (["ryansMammoth"], ".abc", [40, 21, 73, 22, 105, 110], 35, "Ryan's Mammoth Collection"),
    "string_quartet": (["beethoven", "mozart", "haydn"], "", [40, 41, 42, 48, 49, 44], 15, "classical quartet"),
}


def say(msg):
    print(msg, flush=True)


def read_mono(path, max_seconds=None):
    """Any sound file (its first max_seconds) -> float32 mono at 16 kHz."""
    sr = sf.info(path).samplerate
    x, sr = sf.read(path, frames=int(max_seconds * sr) if max_seconds else -1, dtype="float32", always_2d=True)
    x = x.mean(1)
    return soxr.resample(x, sr, SR).astype(np.float32) if sr != SR else x


def excerpt_starts(duration, clip, n, skip=3.0):
    """Up to n start times of non-overlapping clips spread over [skip, duration), earliest first."""
    usable = duration - skip
    n = min(n, int(usable // clip))
    if n < 2:
        return []
    gap = (usable - n * clip) / n  # equal gaps, so excerpts sample the whole work
    return [skip + i * (clip + gap) + gap / 2 for i in range(n)]


def real_works(style, pattern, artists, max_minutes=4.0):
    """[(work_id, title, artists, lyrics, audio)] of one packaged soundtrack; first max_minutes only
    (some tracks are 20-minute loops)."""
    out = []
    for path in sorted(glob.glob(pattern)):
        x = read_mono(path, max_minutes * 60)
        if style == "rock":  # Frets on Fire: the backing track and the guitar stem, mixed
            g = os.path.join(os.path.dirname(path), "guitar.ogg")
            if os.path.exists(g):
                y = read_mono(g, max_minutes * 60)
                n = min(len(x), len(y))
                x = 0.5 * (x[:n] + y[:n])
        name = os.path.basename(os.path.dirname(path)) if style == "rock" else os.path.splitext(os.path.basename(path))[0]
        out.append((f"{style}/{name}", name.replace("_", " ").replace("-", " "), artists, "",
                    x[: int(max_minutes * 60 * SR)]))
    return out


def render_score(path, programs, rng, cache_wav):
    """A music21 corpus file -> (title, lyrics, audio) rendered by FluidSynth, all parts on one GM
    program drawn from `programs`; None if it cannot be parsed or rendered."""
    from music21 import converter, search
    choices = (rng.choice(programs), rng.choice(DECAYING))  # drawn even when cached: the same stream
    try:
        s = converter.parse(path)
        if hasattr(s, "scores"):  # an Opus: its first score
            s = s.scores[0]
        if path.endswith(".abc"):  # fiddle tunes are played with their repeats (elsewhere this made
            try:                   # MIDI files FluidSynth hangs on)
                s = s.expandRepeats()
            except Exception:  # inconsistent repeat marks: as written
                pass
        title = (s.metadata.title if s.metadata and s.metadata.title else "") or os.path.splitext(os.path.basename(path))[0]
        lyrics = " ".join((search.lyrics.LyricSearcher(s).indexText or "").split())[:1500]
        if not os.path.exists(cache_wav):
            # One GM program a work, set in the MIDI file's program changes. A sustained program
            # (strings, organ, choir) never stops sounding on some scores (a note-on without its
            # note-off, where voices share a channel), and FluidSynth then renders forever: such a
            # work is rendered again on a plucked or struck program, which decays.
            for program in choices:
                if _render(s, program, cache_wav):
                    break
            else:
                raise RuntimeError("FluidSynth did not finish")
        return title, lyrics, read_mono(cache_wav)
    except Exception as e:  # a corpus file music21 or FluidSynth cannot handle: skipped and counted
        say(f"  skip {path}: {type(e).__name__}: {str(e)[:80]}")
        return None


def _render(score, program, wav, timeout=15):
    """score -> wav on one GM program; False if FluidSynth did not finish within timeout seconds."""
    from music21 import midi
    mf = midi.translate.music21ObjectToMidiFile(score)
    for track in mf.tracks:
        for ev in track.events:
            if ev.type == midi.ChannelVoiceMessages.PROGRAM_CHANGE:
                ev.data = program
    with tempfile.TemporaryDirectory() as tmp:
        mid = os.path.join(tmp, "x.mid")
        mf.open(mid, "wb")
        mf.write()
        mf.close()
        try:
            subprocess.run(["fluidsynth", "-ni", "-q", "-g", "0.6", "-r", str(SR), "-F", wav, SOUNDFONT, mid],
                           check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            if os.path.exists(wav):
                os.remove(wav)
            return False
    return True


def score_works(style, spec, rng, render_dir, clip, min_excerpts):
    from music21 import corpus
    composers, ext, programs, max_works, artists = spec
    paths = sorted(str(p) for c in composers for p in corpus.getComposer(c) if str(p).endswith(ext))
    if style == "baroque_chorale":  # the chorales, not the cantata movements
        paths = [p for p in paths if "bwv" in os.path.basename(p)]
    if style == "string_quartet":
        paths = [p for p in paths if p.endswith((".mxl", ".krn"))]
    rng.shuffle(paths)
    out, seen = [], set()
    for path in paths:
        if len(out) == max_works:
            break
        name = os.path.splitext(path.split("corpus/")[-1])[0].replace("/", "_")
        if name in seen:  # one work in two encodings (e.g. .krn and .mxl): once
            continue
        seen.add(name)
        r = render_score(path, programs, rng, os.path.join(render_dir, f"{style}_{name}.wav"))
        if r is None:
            continue
        title, lyrics, x = r
        if len(x) < (min_excerpts * clip + 3) * SR:  # too short for two excerpts
            continue
        out.append((f"{style}/{name}", title, artists, lyrics, x[: int(4 * 60 * SR)]))
    return out


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each option's default."""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--out", required=True, help="output folder (outside the repo)")
    p.add_argument("--clip_seconds", type=float, default=12.0, help="excerpt length")
    p.add_argument("--clips_per_style", type=int, default=55, help="about this many excerpts per style")
    p.add_argument("--max_per_work", type=int, default=6, help="excerpts of one work at most")
    p.add_argument("--val_fraction", type=float, default=0.2, help="share of WORKS held out (split val)")
    p.add_argument("--seed", type=int, default=3407)
    args = p.parse_args(argv)
    if not os.path.exists(SOUNDFONT):
        sys.exit(f"Error: no soundfont at {SOUNDFONT}: apt-get install fluid-soundfont-gm")
    clips_dir, render_dir = os.path.join(args.out, "clips"), os.path.join(args.out, "render")
    os.makedirs(clips_dir, exist_ok=True)
    os.makedirs(render_dir, exist_ok=True)
    rng = random.Random(args.seed)

    works = {}  # style -> [(work_id, title, artists, lyrics, audio)]
    for style, (pattern, artists) in REAL.items():
        if not glob.glob(pattern):
            say(f"{style}: not installed ({pattern}), skipped")
            continue
        works[style] = real_works(style, pattern, artists)
        say(f"{style}: {len(works[style])} recordings")
    for style, spec in SCORES.items():
        works[style] = score_works(style, spec, random.Random(f"{args.seed}/{style}"), render_dir, args.clip_seconds, 2)
        say(f"{style}: {len(works[style])} rendered scores")

    # Excerpts: about clips_per_style per style, at least 2 per work (same-work pairs).
    rows, clip = [], args.clip_seconds
    for style, ws in works.items():
        ws = [w for w in ws if len(excerpt_starts(len(w[4]) / SR, clip, 2))]
        per_work = max(2, min(args.max_per_work, round(args.clips_per_style / max(1, len(ws)))))
        for work_id, title, artists, lyrics, x in ws:
            starts = excerpt_starts(len(x) / SR, clip, per_work)
            for k, t in enumerate(starts):
                sid = f"{work_id.replace('/', '_')}_{k}"
                y = x[int(t * SR): int(t * SR) + int(clip * SR)]
                y = y / max(1e-3, float(np.abs(y).max())) * 0.9  # peak-normalised: loudness says nothing
                path = os.path.join("clips", "".join(c if c.isalnum() or c in "._-" else "_" for c in sid) + ".flac")
                if not os.path.exists(os.path.join(args.out, path)):
                    sf.write(os.path.join(args.out, path), y, SR)
                rows.append({"song_id": sid, "audio": path, "title": f"{title} (excerpt {k + 1})",
                             "artists": artists, "lyrics": lyrics, "style": style, "work_id": work_id})

    # Split by work: 20% of each style's works held out, so no excerpt of a held-out work is trained on.
    split = {}
    for style in works:
        ids = sorted({r["work_id"] for r in rows if r["style"] == style})
        random.Random(f"{args.seed}/split/{style}").shuffle(ids)
        n_val = max(1, round(args.val_fraction * len(ids)))
        split.update({w: ("val" if i < n_val else "train") for i, w in enumerate(ids)})
    for r in rows:
        r["split"] = split[r["work_id"]]

    cols = ["song_id", "audio", "title", "artists", "lyrics", "style", "work_id", "split"]
    with open(os.path.join(args.out, "catalog.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["song_id", "style", "work_id", "split"])
        w.writerows([r["song_id"], r["style"], r["work_id"], r["split"]] for r in rows)
    by_work = {}
    for r in rows:
        if r["split"] == "train":
            by_work.setdefault(r["work_id"], []).append(r["song_id"])
    pairs = [(a, b) for ids in by_work.values() for a in ids for b in ids if a != b]
    with open(os.path.join(args.out, "pairs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trigger_song_id", "rec_song_id"])
        w.writerows(pairs)

    per_style = Counter(r["style"] for r in rows)
    n_works = len({r["work_id"] for r in rows})
    n_val = sum(r["split"] == "val" for r in rows)
    say(f"wrote {args.out}: {len(rows)} clips of {clip:g} s from {n_works} works in {len(per_style)} styles; "
        f"{len(rows) - n_val} train / {n_val} held-out clips (split by work); {len(pairs)} same-work pairs")
    for style, n in sorted(per_style.items()):
        say(f"  {style:20s} {n:4d} clips, {len({r['work_id'] for r in rows if r['style'] == style}):3d} works")


if __name__ == "__main__":
    main()
