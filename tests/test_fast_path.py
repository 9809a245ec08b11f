"""Tests of the training fast path (the speed switches of pretrain.make_fast and the loop that
never waits for the device between log steps); none of it may change what is trained.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_fast_path.py
    HTCL_SKIP_COMPILE_TESTS=1 python -m pytest -q tests/   # without the torch.compile test (~1 min on 2 cores)

Each test checks against the eager, masked, syncing computation it replaces: compiled vs eager
towers, the unmasked audio path vs an all-False mask, bucketed text and frames vs the batch's
own length, the step skipped on the device vs a step not taken, and the number of host syncs
between log steps (zero) counted by patching every tensor method that makes the host wait.
"""
import copy
import json
import os
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import model as htcl  # noqa: E402
import pretrain  # noqa: E402
import training  # noqa: E402
from tests.helpers import sample_songs_cache  # noqa: E402

TINY_BERT = os.path.join(ROOT, "sample_data", "tiny-bert")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices; a second thread only adds contention on a shared machine
    yield
    torch.set_num_threads(before)


def tiny_model(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    audio = htcl.AudioConfig(conv_channels=32, hidden=32, layers=2, heads=2, ffn=64, dropout=dropout)
    cfg = htcl.HTCLConfig(audio=audio, text_model=TINY_BERT, text_pretrained=False, text_pooling="mean",
                          proj_dims=(24, 16), fusion_dims=(16, 16))
    return htcl.HTCL(cfg)


def no_dropout(model):
    """Dropout off everywhere (the audio encoder reads cfg.dropout, BERT its nn.Dropout modules), so
    that a compiled and an eager model, whose random streams differ, compute the same thing."""
    model.cfg.audio.dropout = 0.0
    for layer in model.audio_encoder.layers:
        layer.dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def mel_batch(lengths, T=None, seed=0, n_mels=128):
    """Random log-mels of songs of `lengths` frames, zero-padded to T (default the longest), as
    data.Collator pads them: (mel (B, T, n_mels), padding_mask (B, T), True at padded frames)."""
    g = torch.Generator().manual_seed(seed)
    T = T or max(lengths)
    mel = torch.randn(len(lengths), T, n_mels, generator=g)
    mask = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]
    return mel * ~mask[..., None], mask


def texts(n, seed=0, max_words=40):
    import random
    rng = random.Random(seed)
    words = "ocean calm night dream slow soft dance fast bright rain fire".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, max_words))) for _ in range(n)]


def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TINY_BERT)


# -----------------------------------------------------------------------------
# The unmasked audio path (nothing padded: no attention mask, plain mean).


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_unmasked_path_gives_the_masked_paths_embedding_when_nothing_is_padded(pooling):
    enc = tiny_model().audio_encoder.eval()
    enc.pooling = pooling
    mel, _ = mel_batch([90, 90, 90])
    nothing = torch.zeros(3, 90, dtype=torch.bool)  # the masked path, with a mask that marks nothing
    with torch.no_grad():
        a, b = enc(mel, None), enc(mel, nothing)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the gradients: training takes the same step on either path
    enc.train()
    grads = []
    for mask in (None, nothing):
        enc.zero_grad()
        torch.manual_seed(1)  # the same dropout draws on both paths
        enc(mel, mask).square().sum().backward()
        grads.append({k: p.grad.clone() for k, p in enc.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_unmasked_path_passes_no_mask_to_sdpa(monkeypatch):
    """The point of the path: SDPA may only choose its flash kernel when attn_mask is None."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kw):
        seen.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    enc = tiny_model().audio_encoder.eval()
    mel, mask = mel_batch([90, 60])
    with torch.no_grad():
        enc(mel, None)
        assert seen == [None, None]  # both layers
        enc(mel, mask)
    assert all(m is not None and m.dtype == torch.bool for m in seen[2:]) and len(seen) == 4


@pytest.mark.parametrize("rec_frames", [80, 70], ids=["same-length", "rec-shorter"])
def test_stage2_with_unpadded_songs_equals_the_masked_computation(rec_frames):
    """Masks of None: one unmasked pass when both songs fill the batch, else the shorter ones are
    padded and masked inside, as all-False masks would be."""
    model = tiny_model().eval()
    mel_t, _ = mel_batch([80] * 4, seed=1)
    mel_r, _ = mel_batch([rec_frames] * 4, seed=2)
    batch = {"trig_mel": mel_t, "rec_mel": mel_r, "rec_tokens": data.Collator(tokenizer(), 64).tokenize(texts(4))}
    nothing = {"trig_padding_mask": torch.zeros(4, 80, dtype=torch.bool),
               "rec_padding_mask": torch.zeros(4, rec_frames, dtype=torch.bool)}
    with torch.no_grad():
        masked = model(dict(batch, **nothing), stage=2)
        none = model(dict(batch, trig_padding_mask=None, rec_padding_mask=None), stage=2)
    torch.testing.assert_close(none[0], masked[0], rtol=1e-5, atol=1e-6)
    for k in masked[1]:
        torch.testing.assert_close(none[1][k], masked[1][k], rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# Host-side batch preparation: empty masks become None, bucketed lengths change no embedding.


def test_train_collator_drops_empty_masks_and_buckets_frames_without_changing_embeddings():
    tok = tokenizer()
    items = [{"mel": torch.randn(n, 128), "text": t, "row": i} for i, (n, t) in enumerate(zip([100, 60, 90], texts(3)))]
    plain = pretrain.TrainCollator(data.Collator(tok, 64))(items)
    bucketed = pretrain.TrainCollator(data.Collator(tok, 64), frame_bucket=128)(items)
    assert plain["mel"].shape[1] == 100 and bucketed["mel"].shape[1] == 128
    assert bucketed["padding_mask"][:, 100:].all() and not bucketed["padding_mask"][0, :100].any()
    enc = tiny_model().audio_encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(plain["mel"], plain["padding_mask"]),
                                   enc(bucketed["mel"], bucketed["padding_mask"]), rtol=1e-5, atol=1e-6)
    same = [dict(it, mel=torch.randn(100, 128)) for it in items]
    assert pretrain.TrainCollator(data.Collator(tok, 64))(same)["padding_mask"] is None  # nothing padded
    capped = pretrain.TrainCollator(data.Collator(tok, 64), frame_bucket=1000)(
        [dict(it, mel=torch.randn(data.MAX_FRAMES, 128)) for it in items])
    assert capped["mel"].shape[1] == data.MAX_FRAMES and capped["padding_mask"] is None  # 1251: never padded on


@pytest.mark.parametrize("max_len", [512, 100])
def test_text_bucket_pads_to_a_multiple_capped_at_max_length_and_keeps_the_text_embedding(max_len):
    tok = tokenizer()
    batch = texts(5, seed=3, max_words=8) + ["word " * 300]  # one text long enough to be truncated at 100
    plain = data.Collator(tok, max_len).tokenize(batch[:5])
    bucketed = data.Collator(tok, max_len, text_bucket=64).tokenize(batch[:5])
    L = plain["input_ids"].shape[1]
    assert bucketed["input_ids"].shape[1] == min(-(-L // 64) * 64, max_len) > L
    for k, v in plain.items():
        assert torch.equal(bucketed[k][:, :L], v) and not bucketed[k][:, L:].any()  # pad id 0, mask 0, type 0
    long = data.Collator(tok, max_len, text_bucket=64).tokenize(batch)
    assert long["input_ids"].shape[1] == max_len  # 512 is a multiple; 100 is the cap, not 128
    model = tiny_model().eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(plain), model.encode_text(bucketed), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_text_masks_as_4d_or_none_give_the_2d_masks_embedding(pooling):
    """TextEncoder hands transformers a ready 4-D mask (no host sync inside), or none at all when
    nothing is padded (TrainCollator): the same embeddings as transformers' own 2-D mask handling."""
    model = tiny_model().eval()
    model.text_encoder.pooling = pooling
    assert model.text_encoder.mask_4d  # transformers 5, SDPA
    tok = tokenizer()
    padded = data.Collator(tok, 64).tokenize(texts(4, seed=5, max_words=8))
    full = data.Collator(tok, 64).tokenize(["ocean calm night dream"] * 3)
    assert padded["attention_mask"].min() == 0 and full["attention_mask"].min() == 1
    with torch.no_grad():
        four_d = model.encode_text(padded)
        model.text_encoder.mask_4d = False  # transformers' own path
        torch.testing.assert_close(four_d, model.encode_text(padded), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encode_text(dict(full, attention_mask=None)), model.encode_text(full),
                                   rtol=1e-5, atol=1e-6)
    items = [{"mel": torch.randn(50, 128), "text": "ocean calm night dream", "row": i} for i in range(3)]
    assert pretrain.TrainCollator(data.Collator(tok, 64))(items)["tokens"]["attention_mask"] is None


# -----------------------------------------------------------------------------
# torch.compile (Inductor, on CPU here): the compiled towers compute what the eager ones do.


@pytest.mark.skipif(os.environ.get("HTCL_SKIP_COMPILE_TESTS") == "1", reason="HTCL_SKIP_COMPILE_TESTS=1")
def test_compiled_towers_match_eager_losses_and_gradients():
    """pretrain.make_fast with --compile, on a padded stage-1 batch: loss and every gradient as eager.
    About 30-60 s on 2 busy cores, most of it Inductor compiling two tiny graphs."""
    tok = tokenizer()
    mel, mask = mel_batch([128, 100, 128, 70])
    batch = {"mel": mel, "padding_mask": mask, "tokens": data.Collator(tok, 64, text_bucket=64).tokenize(texts(4))}
    eager = no_dropout(tiny_model().train())
    compiled = no_dropout(copy.deepcopy(eager))
    for m in (eager, compiled):
        m.freeze_unused(stage=1)
    cfg = pretrain.PretrainConfig(compile=True)
    pretrain.make_fast(cfg, compiled, torch.device("cpu"))
    assert compiled.audio_encoder._compiled_call_impl is not None  # compiled in place: names unchanged
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    results = []
    for m in (eager, compiled):
        loss, _ = m(batch, stage=1)
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 20
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-3, atol=1e-5, msg=k)


# -----------------------------------------------------------------------------
# A non-finite step is skipped on the device: no weight, no optimizer state changes.


def _guard_setup(fused):
    model = tiny_model(dropout=0.0).audio_encoder
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused, foreach=None if fused else False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, pretrain.lr_lambda(10, 3))
    accelerator = types.SimpleNamespace(scaler=None, device=torch.device("cpu"))
    said = []
    guard = training.NonFiniteGuard(accelerator, optimizer, 3, "OUT", said.append)
    mel, mask = mel_batch([60, 50])

    def attempt(bad):
        loss = model(mel, mask).square().mean() * (float("nan") if bad else 1.0)
        loss.backward()
        guard.step(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()  # as the loop: counted as applied until the next settle
    return model, optimizer, scheduler, guard, attempt, said


@pytest.mark.parametrize("fused", [True, False], ids=["fused-on-device", "host-check"])
def test_nonfinite_step_changes_no_weight_no_optimizer_state_and_the_schedule_is_taken_back(fused):
    model, optimizer, scheduler, guard, attempt, said = _guard_setup(fused)
    assert guard.on_device == fused
    attempt(bad=False)
    assert guard.settle(1, scheduler) == (1, True)
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    lr = scheduler.get_last_lr()
    attempt(bad=True)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    after = optimizer.state_dict()
    assert all(torch.equal(after["state"][i][k], v) for i, s in state["state"].items() for k, v in s.items())
    assert guard.settle(2, scheduler) == (1, False)  # the skipped step is taken back, nothing new applied
    assert scheduler.last_epoch == 1 and scheduler.get_last_lr() == lr and guard.skipped == 1
    assert said and "1 update(s) with a non-finite loss/gradient skipped" in said[-1]
    attempt(bad=False)
    assert guard.settle(2, scheduler) == (2, True)
    assert not torch.equal(model.state_dict()["cls_token"], weights["cls_token"])  # a finite step applies


def test_nonfinite_steps_in_a_row_stop_the_run_at_the_next_settle():
    model, optimizer, scheduler, guard, attempt, said = _guard_setup(True)
    attempt(bad=True)
    attempt(bad=True)
    attempt(bad=False)  # breaks the run: two in a row, under the limit of 3
    attempt(bad=True)
    attempt(bad=True)
    assert guard.settle(5, scheduler) == (1, True) and guard.skipped == 4
    attempt(bad=True)  # the third in a row, across a settle
    with pytest.raises(SystemExit, match="3 non-finite steps in a row"):
        guard.settle(2, scheduler)


# -----------------------------------------------------------------------------
# The real loop makes no host sync between log steps.

SYNCS = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__repr__",
         "__format__", "nonzero", "unique"]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """48 songs of sample_data in a log-mel cache; no split column, so the seeded 90/10 split."""
    return sample_songs_cache(tmp_path_factory.mktemp("world"), 48)


def test_training_loop_makes_no_host_sync_between_log_steps(tmp_path, small_world, monkeypatch):
    catalog, cache = small_world
    # The text tower's length groups read the lengths of a CPU mask: no device sync, and a path that
    # runs on the CPU only (TextEncoder.forward), so it stays out of this count of what a GPU would wait on.
    monkeypatch.setattr(htcl, "length_groups", lambda mask: None)
    cfg = training.parse_config(pretrain.PretrainConfig, "pretrain", [
        "--preset", os.path.join(ROOT, "sample_data", "preset.toml"), "--catalog", str(catalog),
        "--cache", str(cache), "--out_dir", str(tmp_path), "--batch_per_device", "8", "--global_batch", "8",
        "--epochs", "1", "--max_steps", "4", "--log_every", "100", "--checkpoint_every", "0",
        "--num_workers", "1"])  # the batches are made in a worker process: host work, not a device sync
    catalog_, cache_, train_rows, val_rows = pretrain.load_songs(cfg)
    train_set = data.SongDataset(catalog_, train_rows, cache_)
    val_set = data.SongDataset(catalog_, val_rows, cache_)
    torch.manual_seed(cfg.seed)
    model = htcl.HTCL(cfg.model)
    model.freeze_unused(stage=1)

    count, marks = [0], {}
    host_side = os.path.join("torch", "utils", "data")  # samplers and DataLoader plumbing: host tensors by design

    def counted(original):
        def wrapper(*a, **kw):
            if host_side not in sys._getframe(1).f_code.co_filename:
                count[0] += 1
            return original(*a, **kw)
        return wrapper
    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    for name in ("equal", "allclose", "nonzero", "unique", "masked_select"):
        monkeypatch.setattr(torch, name, counted(getattr(torch, name)))
    getitem = torch.Tensor.__getitem__

    def indexed(self, index):  # a boolean-mask index has a data-dependent size: a sync on a GPU
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            count[0] += 1
        return getitem(self, index)
    monkeypatch.setattr(torch.Tensor, "__getitem__", indexed)

    def mark(name, fn):
        def wrapped(*a, **kw):
            marks.setdefault(name + " in", []).append(count[0])
            out = fn(*a, **kw)
            marks.setdefault(name + " out", []).append(count[0])
            return out
        return wrapped
    monkeypatch.setattr(training.NonFiniteGuard, "settle", mark("settle", training.NonFiniteGuard.settle))
    monkeypatch.setattr(training.IntervalLog, "step", mark("log", training.IntervalLog.step))
    calls = []

    def loss_fn(m, batch):
        if m.training:
            calls.append(count[0])
        return m(batch, stage=1)
    pretrain.train(cfg, model, tokenizer(), loss_fn, train_set, val_set, val_set, stage=1)

    assert len(calls) == 4, calls
    # from the first training step to the settle after the fourth (the first log step): no sync at all
    assert marks["settle in"][0] == calls[0], (calls, marks)
    assert len(marks["log in"]) == 1  # the log step, and only it, among the training steps
    assert marks["log out"][0] > marks["settle in"][0]  # where the host does read the device
    rows = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == [4] and rows[0]["loss"] > 0
