"""
Tests of shards.py: WebDataset tar shards of log-mels for paper-scale stage-1 pretraining (Sec. 3.1.3
inputs), their index, parts and merge, and the streaming reader's rank/worker split and exact resume,
on a local folder, over http(s), and on a real S3 server (moto's, on 127.0.0.1).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_shards.py   (needs tests/requirements.txt)
"""

import csv
import functools
import glob
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import shards  # noqa: E402
from tests.helpers import PRESET, read_log, run as run_ok, tiny_model  # noqa: E402

SAMPLE = REPO / "sample_data"
PER_SONG = shards.SONG_BYTES + shards.SAMPLE_OVERHEAD  # shard_bytes = k * PER_SONG -> k songs a shard
THREADS = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV = {**os.environ, **THREADS}


def fake_mel(path):
    """A stand-in for data.song_mel: a deterministic (17..56, 128) array per file name, no decoding."""
    seed = zlib.crc32(os.path.basename(path).encode())
    return np.random.default_rng(seed).standard_normal((17 + seed % 40, 128)).astype(np.float32)


def make_catalog(folder, n, start=0):
    """The first n songs of sample_data/catalog.csv, audio paths made absolute, -> path."""
    with open(SAMPLE / "catalog.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader)[start:start + n], reader.fieldnames
    for r in rows:
        r["audio"] = str(SAMPLE / r["audio"])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "catalog.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)
    return path


def rows_of(ds, num_workers, epoch=0, start_batch=0, batch_size=None):
    """Batches of a ShardDataset through a DataLoader -> [(rows, mel checksum)] per batch."""
    ds.set_epoch(epoch, start_batch)
    loader = DataLoader(ds, batch_size or ds.batch_size, num_workers=num_workers, collate_fn=data.Collator(None))
    return [(b["row"].tolist(), round(float(b["mel"].double().sum()), 6)) for b in loader]


def tar_digests(folder):
    return {os.path.basename(p): hashlib.sha1(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(folder, "shard-*.tar")))}


def run_cli(*args, script="shards.py"):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **THREADS}, cwd=REPO, timeout=300)  # the s3 fixture's env


def run_prepare(*args):
    """data.py prepare --shards ...: the user's one entry for writing shards."""
    return run_cli("prepare", *args, script="data.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """48 songs in 12 shards of 4, written once with the fake log-mel."""
    root = tmp_path_factory.mktemp("world")
    cat = make_catalog(root, 48)
    out = root / "shards"
    counts = shards.write(cat, str(out), shard_bytes=4 * PER_SONG, mel_fn=fake_mel)
    return {"root": root, "catalog": cat, "out": str(out), "counts": counts}


def test_format_index_and_webdataset_reader(world, tmp_path):
    out, catalog = world["out"], data.load_catalog(world["catalog"])
    ix = json.load(open(os.path.join(out, "index.json")))
    assert (ix["num_shards"], ix["rows_per_shard"], ix["samples"], ix["failed"], ix["parts"]) == (12, 4, 48, 0, 1)
    assert ix["mel_hash"] == shards.mel_hash() and ix["mel_settings"]["max_frames"] == 1251
    assert [s["name"] for s in ix["shards"]] == [f"shard-{k:06d}.tar" for k in range(12)]
    assert sum(s["bytes"] for s in ix["shards"]) == ix["bytes"] == sum(
        os.path.getsize(os.path.join(out, s["name"])) for s in ix["shards"])
    # the standard reader sees the samples: json + fp16 mel of only the real frames
    import webdataset as wds
    seen = []
    for s in wds.WebDataset(os.path.join(out, "shard-000003.tar"), shardshuffle=False).decode():
        meta, mel = s["json"], s["mel.npy"]
        song = catalog[meta["row"]]
        assert s["__key__"] == f"{meta['row']:09d}" and meta["song_id"] == song.song_id
        assert meta["text"] == song.text  # X_t as SongDataset feeds BERT
        assert meta["catalog"]["audio"] == catalog.raw_audio[meta["row"]]
        assert meta["catalog"]["genre"] == song.labels["genre"] and set(meta["catalog"]) == set(catalog.columns)
        assert mel.dtype == np.float16 and mel.shape == (meta["frames"], 128)
        assert np.array_equal(mel, fake_mel(song.audio).astype(np.float16))
        seen.append(meta["row"])
    assert len(seen) == 4 and seen != sorted(range(min(seen), min(seen) + 4))  # a permutation of rows
    # deterministic bytes: the same catalog and layout give identical shards
    shards.write(world["catalog"], str(tmp_path / "again"), shard_bytes=4 * PER_SONG, mel_fn=fake_mel)
    assert tar_digests(tmp_path / "again") == tar_digests(out)


def test_two_ranks_two_workers_see_every_song_once(world):
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(SAMPLE / "tiny-bert"))
    per_rank, epochs = [], []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            ds = shards.ShardDataset(world["out"], 4, rank=rank, world_size=2, num_workers=2, shuffle_buffer=6)
            assert ds.dropped == 0 and len(DataLoader(ds, 4)) == 6
            batches = rows_of(ds, 2, epoch)
            per_rank.append(len(batches))
            seen += [r for rows, _ in batches for r in rows]
        assert sorted(seen) == list(range(48))  # every sample exactly once across 2 ranks x 2 workers
        epochs.append(seen)
    assert set(per_rank) == {6} and epochs[0] != epochs[1]  # a new order every epoch
    ds = shards.ShardDataset(world["out"], 4, num_workers=0)
    assert rows_of(ds, 0, 1) == rows_of(ds, 0, 1)  # seeded: the same epoch, the same batches
    batch = next(iter(DataLoader(ds, 4, collate_fn=data.Collator(tok))))  # the items data.Collator batches
    assert batch["mel"].shape[0] == 4 and batch["mel"].dtype == torch.float32
    assert set(batch) == {"mel", "padding_mask", "tokens", "row"} and batch["tokens"]["input_ids"].shape[0] == 4


def test_a_split_of_the_rows_is_streamed_once_over_ranks_and_workers(world):
    catalog = data.load_catalog(world["catalog"])
    rows = [r for r in range(48) if r % 5 != 2]  # 38 of 48 (a train split), scattered over every shard
    seen, order = [], shards.plan_layout(catalog, 4 * PER_SONG)[1]
    for rank in (0, 1):
        ds = shards.ShardDataset(world["out"], 3, rank=rank, world_size=2, num_workers=2, catalog=catalog, rows=rows)
        assert list(ds.counts) == [sum(r % 5 != 2 for r in order[k * 4:(k + 1) * 4]) for k in range(12)]
        assert ds.dropped == 38 - 36 and len(ds) == 18  # 38 // (4 streams x 3) = 3 batches a stream
        batches = rows_of(ds, 2, epoch=1)
        assert rows_of(ds, 2, epoch=1, start_batch=4) == batches[4:]  # exact resume inside the subset
        seen += [r for b, _ in batches for r in b]
    assert len(seen) == len(set(seen)) == 36 and set(seen) <= set(rows)
    assert ds.plan() != shards.ShardDataset(world["out"], 3, rank=1, world_size=2, num_workers=2).plan()
    other = data.load_catalog(make_catalog(world["root"] / "other", 48, start=1))
    with pytest.raises(shards.ShardError, match="written from another catalog"):
        shards.ShardDataset(world["out"], 3, catalog=other, rows=rows)
    every = sorted(it["row"] for rank in (0, 1) for it in
                   DataLoader(shards.ShardSongs(world["out"], rank, 2, catalog=catalog, rows=rows),
                              None, num_workers=2))
    assert every == rows  # embedding: each rank its own shards, every wanted song once


def test_unequal_shards_every_rank_same_batches(tmp_path):
    cat = make_catalog(tmp_path, 45)  # 12 shards, the last of one song
    shards.write(cat, str(tmp_path / "s"), shard_bytes=4 * PER_SONG, mel_fn=fake_mel)
    seen, lengths = [], set()
    for rank in (0, 1):
        ds = shards.ShardDataset(str(tmp_path / "s"), 4, rank=rank, world_size=2, num_workers=2)
        assert ds.dropped == 45 - 32  # 45 // (4 streams x 4) = 2 batches a stream
        batches = rows_of(ds, 2, epoch=3)
        lengths.add(len(batches))
        assert all(len(rows) == 4 for rows, _ in batches)
        seen += [r for rows, _ in batches for r in rows]
    assert lengths == {4} and len(seen) == len(set(seen)) == 32


@pytest.mark.parametrize("start", [1, 3, 4, 5])
def test_exact_resume_replay(world, start):
    ds = shards.ShardDataset(world["out"], 3, rank=1, world_size=2, num_workers=2, shuffle_buffer=5)
    full = rows_of(ds, 2, epoch=2)
    assert len(full) == 8  # 48 // (4 streams x 3) = 4 batches a worker, 2 workers
    assert rows_of(ds, 2, epoch=2, start_batch=start) == full[start:]
    with pytest.raises(shards.ShardError, match="num_workers=2 but the DataLoader has 0"):
        rows_of(ds, 0, epoch=2)
    saved = ds.plan()
    shards.ShardDataset(world["out"], 3, rank=1, world_size=2, num_workers=2, shuffle_buffer=5).check_plan(saved)
    with pytest.raises(shards.ShardError, match="num_workers 2 -> 1"):
        shards.ShardDataset(world["out"], 3, rank=1, world_size=2, num_workers=1, shuffle_buffer=5).check_plan(saved)


READER = """
import json, sys, time
sys.path.insert(0, {repo!r})
import data, shards
from torch.utils.data import DataLoader
url, start, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ds = shards.ShardDataset(url, 3, rank=1, world_size=2, num_workers=2, shuffle_buffer=5)
ds.set_epoch(2, start_batch=start)
with open(log, "a") as f:
    for b in DataLoader(ds, 3, num_workers=2, collate_fn=data.Collator(None)):
        f.write(json.dumps([b["row"].tolist(), round(float(b["mel"].double().sum()), 6)]) + "\\n")
        f.flush()
        time.sleep(0.4)  # a training step
"""


def _kill_after(proc, done, timeout=180):
    """SIGKILL proc once done() is true; fails if it ends first or takes too long."""
    t0 = time.time()
    while not done():
        assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()}"
        assert time.time() - t0 < timeout, "too slow to reach the kill point"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_reader_resume_after_sigkill(world, tmp_path):
    script, log = tmp_path / "reader.py", tmp_path / "log.jsonl"
    script.write_text(READER.format(repo=str(REPO)))
    lines = lambda: [ln for ln in open(log).read().split("\n")[:-1]] if log.exists() else []  # noqa: E731
    proc = subprocess.Popen([sys.executable, str(script), world["out"], "0", str(log)], env=ENV,
                            stderr=subprocess.PIPE, text=True)
    _kill_after(proc, lambda: len(lines()) >= 3)
    consumed = [json.loads(x) for x in lines()]  # what a checkpoint records: batches done
    assert 3 <= len(consumed) < 8
    resumed = tmp_path / "resumed.jsonl"
    subprocess.run([sys.executable, str(script), world["out"], str(len(consumed)), str(resumed)], env=ENV,
                   check=True, timeout=300)
    after = [json.loads(x) for x in open(resumed).read().splitlines()]
    ds = shards.ShardDataset(world["out"], 3, rank=1, world_size=2, num_workers=2, shuffle_buffer=5)
    unkilled = [list(b) for b in rows_of(ds, 2, epoch=2)]
    assert consumed + after == unkilled


WRITER = """
import sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
import shards, test_shards
def slow_mel(path):
    time.sleep(0.08)
    return test_shards.fake_mel(path)
shards.write(sys.argv[1], sys.argv[2], shard_bytes=2 * test_shards.PER_SONG, mel_fn=slow_mel)
"""


def test_writer_resume_after_sigkill(tmp_path):
    cat = make_catalog(tmp_path, 40)  # 20 shards of 2
    script, out = tmp_path / "writer.py", tmp_path / "killed"
    script.write_text(WRITER.format(repo=str(REPO), tests=str(REPO / "tests")))
    proc = subprocess.Popen([sys.executable, str(script), cat, str(out)], env=ENV, stderr=subprocess.PIPE, text=True)
    _kill_after(proc, lambda: len(glob.glob(str(out / "shard-*.json"))) >= 3)
    sides = glob.glob(str(out / "shard-*.json"))
    assert all(os.path.exists(s[:-5] + ".tar") for s in sides)  # a sidecar only after its tar
    assert not os.path.exists(out / "index.json")
    counts = shards.write(cat, str(out), shard_bytes=2 * PER_SONG, mel_fn=fake_mel)
    assert counts["kept"] >= len(sides) and counts["written"] == 20 - counts["kept"]
    assert not glob.glob(str(out / ".*tmp*"))  # the killed run's temp file is gone
    shards.write(cat, str(tmp_path / "clean"), shard_bytes=2 * PER_SONG, mel_fn=fake_mel)
    assert tar_digests(out) == tar_digests(tmp_path / "clean") and len(tar_digests(out)) == 20
    again = shards.write(cat, str(out), shard_bytes=2 * PER_SONG, mel_fn=fake_mel)
    assert (again["kept"], again["written"]) == (20, 0)


def test_parts_merge_and_refusals(world, tmp_path, monkeypatch):
    out = str(tmp_path / "parts")
    for i in (0, 2):
        shards.write(world["catalog"], out, part=(i, 3), shard_bytes=4 * PER_SONG, mel_fn=fake_mel)
    with pytest.raises(shards.ShardError, match=r"parts 1/3 not written yet.*--shard 1/3"):
        shards.merge(out)
    with pytest.raises(shards.ShardError, match="no index.json"):
        shards.ShardDataset(out, 4)
    shards.write(world["catalog"], out, part=(1, 3), shard_bytes=4 * PER_SONG, mel_fn=fake_mel)
    assert json.load(open(os.path.join(out, "index.json")))["parts"] == 3  # the last part to finish merged
    ix = shards.merge(out)
    single = json.load(open(os.path.join(world["out"], "index.json")))
    assert ix["shards"] == single["shards"] and ix["parts"] == 3 and tar_digests(out) == tar_digests(world["out"])
    with pytest.raises(shards.ShardError, match="another part count"):
        shards.write(world["catalog"], out, part=(0, 2), shard_bytes=4 * PER_SONG, mel_fn=fake_mel)
    with pytest.raises(shards.ShardError, match="another catalog, --shard_size_mb, seed"):
        shards.write(world["catalog"], out, part=(0, 3), shard_bytes=4 * PER_SONG, seed=1, mel_fn=fake_mel)
    # a part index copied from another layout: refused by merge, naming the part
    p1 = os.path.join(out, "index-part-00001-of-00003.json")
    bad = json.load(open(p1)) | {"seed": 5}
    json.dump(bad, open(p1, "w"))
    with pytest.raises(shards.ShardError, match="index-part-00001-of-00003.json: another layout"):
        shards.merge(out)
    # a reader with other mel settings refuses the shards, naming both hashes
    written = shards.mel_hash()
    monkeypatch.setattr(data, "TOP_DB", 60.0)
    with pytest.raises(shards.ShardError) as e:
        shards.ShardDataset(world["out"], 4)
    assert written in str(e.value) and shards.mel_hash() in str(e.value) and "\n" not in str(e.value)


def test_real_audio_and_bad_files(tmp_path):
    cat = make_catalog(tmp_path, 6)
    rows = list(csv.reader(open(cat, newline="", encoding="utf-8")))
    broken = tmp_path / "broken.mp3"
    broken.write_bytes(b"not audio at all" * 64)
    rows[2][1], rows[5][1] = str(tmp_path / "missing.mp3"), str(broken)  # catalog rows 1 and 4 (0: header)
    csv.writer(open(cat, "w", newline="", encoding="utf-8")).writerows(rows)
    out = str(tmp_path / "s")
    r = run_prepare("--catalog", cat, "--shards", out, "--shard_size_mb", 2 * PER_SONG / 1e6, "--num_workers", 2)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and err[-1].startswith("error: ") and "2 of 6 songs" in err[-1]
    assert "bad-part-00000-of-00001.csv" in err[-1] and "2 failed" in r.stdout
    bad = list(csv.DictReader(open(os.path.join(out, "bad-part-00000-of-00001.csv"))))
    assert sorted(b["path"] for b in bad) == sorted([str(tmp_path / "missing.mp3"), str(broken)])
    assert any("FileNotFoundError" in b["reason"] for b in bad) and any("cannot decode" in b["reason"] for b in bad)
    ix = json.load(open(os.path.join(out, "index.json")))
    assert (ix["samples"], ix["failed"]) == (4, 2)
    catalog = data.load_catalog(cat)
    items = list(shards.ShardDataset(out, 1))
    assert sorted(it["row"] for it in items) == [0, 2, 3, 5]
    for it in items:  # the real front end, stored in fp16
        ref = data.song_mel(catalog[it["row"]].audio).numpy().astype(np.float16).astype(np.float32)
        assert torch.equal(it["mel"], torch.from_numpy(ref)) and it["text"] == catalog[it["row"]].text
    r = run_cli("info", out)
    assert r.returncode == 0 and "4 songs, 2 failed to decode" in r.stdout
    # a subset of the rows (a split) counts its samples per shard without reading them: row 1 failed
    sub = shards.ShardDataset(out, 1, catalog=catalog, rows=[0, 1, 2, 3])
    assert len(sub) == 3 and sorted(it["row"] for it in sub) == [0, 2, 3]
    assert sorted(it["row"] for it in shards.ShardSongs(out, catalog=catalog, rows=[1, 4, 5])) == [5]


def test_cli_help_and_errors(tmp_path):
    r = run_prepare("--help")
    assert r.returncode == 0 and "--shard_size_mb" in r.stdout and "--shards" in r.stdout and "1000" in r.stdout
    cat = make_catalog(tmp_path, 2)
    for args, words in [(["info", tmp_path], "no index.json"),
                        (["merge", "--out", tmp_path], "no part indexes")]:
        r = run_cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], r.stderr
    for args, words in [(["--catalog", cat, "--shards", tmp_path, "--shard", "3/2"], "--shard wants i/n"),
                        (["--catalog", cat], "give one of --cache DIR"),
                        (["--catalog", cat, "--shards", tmp_path / "s", "--cache", tmp_path / "c"], "give one of"),
                        (["--catalog", tmp_path / "none.csv", "--shards", tmp_path], "none.csv"),
                        (["--catalog", cat, "--shards", "http://127.0.0.1:9/x"], "read-only")]:
        r = run_prepare(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and words in lines[-1] and "Traceback" not in r.stderr, r.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (a real HTTP server, not a mocked client) with a bucket."""
    import logging
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}.items():
            mp.setenv(k, v)  # the CLI and DataLoader workers find the endpoint here
        import s3fs
        s3fs.S3FileSystem(endpoint_url=url).mkdir("bucket")
        yield {"storage_options": {"endpoint_url": url}}
    server.stop()


def test_s3_write_read_resume(world, s3):
    out, opts = "s3://bucket/mels", s3["storage_options"]
    for i in (0, 1):
        shards.write(world["catalog"], out, part=(i, 2), shard_bytes=4 * PER_SONG, mel_fn=fake_mel,
                     storage_options=opts)
    r = run_cli("merge", "--out", out)  # endpoint from AWS_ENDPOINT_URL
    assert r.returncode == 0, r.stderr
    r = run_cli("info", out)
    assert r.returncode == 0 and "12 shards, 48 songs" in r.stdout
    seen = []
    for rank in (0, 1):
        ds = shards.ShardDataset(out, 4, rank=rank, world_size=2, num_workers=2, storage_options=opts)
        batches = rows_of(ds, 2, epoch=1)
        local = shards.ShardDataset(world["out"], 4, rank=rank, world_size=2, num_workers=2)
        assert batches == rows_of(local, 2, epoch=1)  # the same bytes, the same stream
        assert rows_of(ds, 2, epoch=1, start_batch=3) == batches[3:]
        seen += [r for rows, _ in batches for r in rows]
    assert sorted(seen) == list(range(48))
    # atomic puts: an object appears whole, so a rerun keeps every shard
    again = shards.write(world["catalog"], out, part=(1, 2), shard_bytes=4 * PER_SONG, mel_fn=fake_mel,
                         storage_options=opts)
    assert again["written"] == 0
    bench = shards.loader_benchmark(out, 4, 2, 10, storage_options=opts)
    assert bench["batches"] == 10 and bench["samples_per_s"] > 0
    # the user's entry, on object storage: data.py prepare --shards s3://... (real decoding, 4 songs, 2 shards)
    r = run_prepare("--catalog", make_catalog(world["root"] / "s3cli", 4), "--shards", "s3://bucket/cli",
                    "--shard_size_mb", 2 * PER_SONG / 1e6)
    assert r.returncode == 0, r.stderr
    assert sorted(it["row"] for it in shards.ShardDataset("s3://bucket/cli", 1, storage_options=opts)) == [0, 1, 2, 3]


def test_http_read_only(world):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=world["out"])
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        ds = shards.ShardDataset(url, 4, num_workers=2)
        assert rows_of(ds, 2, epoch=0) == rows_of(shards.ShardDataset(world["out"], 4, num_workers=2), 2, epoch=0)
        with pytest.raises(shards.ShardError, match="read-only"):
            shards.write(world["catalog"], url + "/new", mel_fn=fake_mel)
    finally:
        server.shutdown()


def test_loader_benchmark_local(world):
    cold = shards.loader_benchmark(world["out"], 4, 2, 8, cold=True)
    warm = shards.loader_benchmark(world["out"], 4, 2, 8)
    for b in (cold, warm):
        assert b["batches"] == 8 and b["samples"] == 32 and b["mb_per_s"] > 0
        assert b["cpu_seconds"] > 0 and b["samples_per_cpu_s"] == pytest.approx(32 / b["cpu_seconds"], rel=0.05)  # cpu_seconds rounded


def test_loader_report_rows(tmp_path):
    """bench.py's shards rows on a tiny paper-size set: every row, its rates against one H200."""
    rows = shards.loader_report(make_catalog(tmp_path, 8), str(tmp_path / "r"), batch_size=2, worker_counts=(1,))
    assert [r["key"] for r in rows] == ["loader_shards_cold_w1", "loader_shards_warm_w1", "loader_shards_notext_w1",
                                        "loader_shards_s3_w1"]
    ix = shards.open_index(str(tmp_path / "r" / "local"))[2]
    assert ix["samples"] == 8 and ix["bytes"] > 8 * 1251 * 128 * 2  # full 120 s songs
    for r in rows:
        assert r["vs_gpu"] == pytest.approx(r["rate"] / 641, abs=0.01) and r["per_core"] > 0 and r["mb_per_s"] > 0


# -----------------------------------------------------------------------------
# Streaming training (pretrain.py --shards) and embedding (evaluate.py embed --shards) on real log-mels

LAUNCH2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """48 sample songs (36 in the train split) written by `data.py prepare --shards`: 12 shards of 4."""
    root = tmp_path_factory.mktemp("real")
    cat = make_catalog(root, 48)
    r = run_prepare("--catalog", cat, "--shards", root / "shards", "--shard_size_mb", 4 * PER_SONG / 1e6,
                    "--num_workers", 2)
    assert r.returncode == 0, r.stderr
    return {"root": root, "catalog": cat, "out": str(root / "shards")}


def train_flags(real, out, *more):
    return ["--preset", PRESET, "--catalog", real["catalog"], "--cache", "", "--shards", real["out"],
            "--out_dir", out, "--num_workers", 2, "--shuffle_buffer", 5, "--log_every", 1, *more]


RECORDER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import pretrain
seen, inner = [], pretrain.stage1_loss
def recording(model, batch):  # the training batches this process saw
    if model.training:
        seen.append(batch["row"].tolist())
    return inner(model, batch)
pretrain.stage1_loss = recording
pretrain.main(sys.argv[1:])
out = sys.argv[sys.argv.index("--out_dir") + 1]
json.dump(seen, open(os.path.join(out, "rows-%s.json" % os.environ.get("RANK", "0")), "w"))
"""


def test_pretrain_two_processes_two_workers_see_every_training_song_once(real, tmp_path):
    script, out = tmp_path / "record.py", tmp_path / "ddp"
    script.write_text(RECORDER.format(repo=str(REPO)))
    log = run_ok(*LAUNCH2, script, *train_flags(real, out, "--batch_per_device", 3, "--global_batch", 12,
                                                 "--epochs", 1, "--checkpoint_every", 0))
    assert "2 process(es) x 3 x 2 accumulation = global batch 12" in log and "3 steps/epoch" in log
    per_rank = [json.load(open(out / f"rows-{r}.json")) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [6, 6] and all(len(x) == 3 for b in per_rank for x in b)
    seen = [r for b in per_rank for x in b for r in x]
    catalog = data.load_catalog(real["catalog"])
    train_rows = data.split_rows(catalog, "train")
    assert len(train_rows) == 36 and sorted(seen) == train_rows  # 2 processes x 2 workers: each song once
    train, _ = read_log(out)
    assert [r["step"] for r in train] == [1, 2, 3]


def test_pretrain_resume_after_sigkill_mid_epoch_replays_the_same_losses(real, tmp_path):
    """kill -9 mid-epoch, --resume: the batches after the restart (and so every loss) are those of
    an unkilled run, as test_smoke's test of the memory-mapped cache checks."""
    common = [sys.executable, "pretrain.py", *train_flags(real, "OUT", "--batch_per_device", 3, "--global_batch", 3,
                                                          "--epochs", 2, "--checkpoint_every", 5)]
    at = lambda out: [str(out) if c == "OUT" else c for c in common]  # noqa: E731
    run_ok(*at(tmp_path / "full"))
    p = subprocess.Popen([str(c) for c in at(tmp_path / "cut")], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "cut" / "checkpoints" / "step_000000015"  # 12 steps an epoch: 3 batches into epoch 1
    _kill_after(p, ckpt.exists, timeout=300)
    assert not (tmp_path / "cut" / "final").exists(), "the run finished before the kill"
    shutil.copytree(tmp_path / "cut", tmp_path / "other")
    out = run_ok(*at(tmp_path / "cut"), "--resume")
    import re
    resumed = re.search(r"resumed from .*step_(\d+): epoch (\d+), step \d+, (\d+) batches into the epoch", out)
    assert resumed and int(resumed.group(3)) % 2 == 1, out[-2000:]  # mid-epoch, at an odd batch: worker 1 next
    full, full_val = read_log(tmp_path / "full")
    cut = {r["step"]: r for r in read_log(tmp_path / "cut")[0]}
    assert sorted(cut) == [r["step"] for r in full] == list(range(1, 25))
    for b in full:
        assert cut[b["step"]]["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (cut[b["step"]], b)
    assert read_log(tmp_path / "cut")[1][-1]["val_loss"] == pytest.approx(full_val[-1]["val_loss"], rel=1e-5)
    # a resume with another data plan cannot give the same batches: refused in one line
    r = subprocess.run([str(c) for c in at(tmp_path / "other") + ["--resume", "--shuffle_buffer", "7"]], cwd=REPO,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "shuffle_buffer 5 -> 7" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A small seeded HTCL (random weights: embeddings only have to be the same, not good) saved as pretrain does."""
    import model as htcl
    from transformers import AutoTokenizer
    folder = tmp_path_factory.mktemp("artifact") / "final"
    htcl.save_artifact(tiny_model(0), AutoTokenizer.from_pretrained(str(SAMPLE / "tiny-bert")), str(folder))
    return folder


def test_embed_over_shards_two_processes_give_the_embeddings_of_one(real, artifact, tmp_path):
    from evals import embeddings
    embed = [REPO / "evaluate.py", "embed", "--artifact", artifact, "--catalog", real["catalog"], "--shards",
             real["out"], "--text", "--fused", "--batch_size", 5]
    run_ok(sys.executable, *embed, "--out", tmp_path / "one")
    log = run_ok(*LAUNCH2, *embed, "--out", tmp_path / "two")
    assert log.count("embed: 48 songs x audio 16-d, text 16-d, fused 16-d") == 1  # rank 0 merges and writes
    catalog = data.load_catalog(real["catalog"])
    for kind in ("audio", "text", "fused"):
        ids1, x1 = embeddings.load_embeddings(str(tmp_path / "one"), kind)
        ids2, x2 = embeddings.load_embeddings(str(tmp_path / "two"), kind)
        assert ids1 == ids2 == [catalog[r].song_id for r in range(48)]  # catalog order, whoever embedded a song
        assert x1.shape == (48, 16) and np.allclose(x1, x2, atol=1e-5)
        gap = np.abs(x1[:, None] - x1[None]).max(-1) + np.eye(48)  # songs differ by more than the tolerance
        assert gap.min() > 2e-5, (kind, gap.min())
    assert not os.path.exists(tmp_path / "two" / ".parts")  # merged, then removed
    # independently: embed_catalog (the --cache path, one process, catalog order) on the shards' log-mels
    mels = {it["row"]: it["mel"] for it in shards.ShardSongs(real["out"])}

    class ShardMels:  # what SongDataset asks of a MelCache
        cache_dir = real["out"]
        has = staticmethod(lambda row: True)
        mel = staticmethod(lambda row: mels[row])
    model, tok = __import__("model").load_artifact(str(artifact), "cpu")
    ref = embeddings.embed_catalog(model, tok, catalog, range(48), kinds=("audio", "text", "fused"), cache=ShardMels,
                                   batch_size=5)
    for kind, x in ref.items():
        assert np.allclose(embeddings.load_embeddings(str(tmp_path / "one"), kind)[1], x, atol=1e-5), kind


def test_embed_merge_waits_for_this_jobs_parts_and_names_missing_songs(real, artifact, tmp_path):
    from evals import embed_shards
    catalog = data.load_catalog(real["catalog"])
    job = embed_shards.job_key(str(artifact), real["out"], range(48), "full", ["audio"])
    part = {"job": np.array(job), "rows": np.array([3, 1]), "audio": np.eye(2, 4, dtype=np.float32)}
    embed_shards._write_part(embed_shards._part_path(str(tmp_path), 0, 2), part)
    embed_shards._write_part(embed_shards._part_path(str(tmp_path), 1, 2), {**part, "job": np.array("other run")})
    with pytest.raises(shards.ShardError, match="part-00001-of-00002.npz: no part of this job after 0 s"):
        embed_shards.merge_parts(str(tmp_path), 2, job, catalog, [1, 3], timeout=0)
    embed_shards._write_part(embed_shards._part_path(str(tmp_path), 1, 2), {**part, "rows": np.zeros(0, np.int64),
                                                                              "audio": np.zeros((0, 4), np.float32)})
    merged = embed_shards.merge_parts(str(tmp_path), 2, job, catalog, [1, 3], timeout=0)
    assert np.array_equal(merged["audio"], np.eye(2, 4, dtype=np.float32)[[1, 0]])  # put back in the wanted order
    with pytest.raises(shards.ShardError, match=r"1 songs have no log-mel in the shards .* e\.g\. \['s0003'\]"):
        embed_shards.merge_parts(str(tmp_path), 2, job, catalog, [1, 2, 3], timeout=0)
