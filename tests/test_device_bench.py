"""Tests of tools/device_bench.py (the paper step's switches, alternating in one process): the arms compute
the same loss, only differently; the alternation rotates and keeps to its deadline; the rows' ratios; the
profiler's top kernels.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_device_bench.py
"""
import time
from dataclasses import replace

import pytest
import torch

from tools import device_bench as db


def no_dropout(model):
    for layer in model.audio_encoder.layers:
        layer.dropout = 0.0
    model.cfg.audio.dropout = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def test_chain_is_cumulative_one_change_a_row():
    arms = db.chain_arms()
    assert [a.name for a in arms] == ["baseline", "bert_sdpa", "no_mask", "no_host_sync", "tf32", "compile"]
    fields = [f for f in vars(arms[0]) if f not in ("name", "what")]
    for before, after in zip(arms, arms[1:]):
        changed = [f for f in fields if getattr(before, f) != getattr(after, f)]
        assert len(changed) == 1, (after.name, changed)
    assert db.compile_arms()[0] == replace(arms[4], name="tf32_again", what=db.compile_arms()[0].what)


def test_arm_batches_pass_masks_only_where_the_arm_says_or_something_is_padded():
    sz = db.sizes(True, 3)
    batches = db.make_batches(sz, vocab=50)
    cpu = torch.device("cpu")
    masked = db.arm_batch(db.chain_arms()[0], batches, cpu)
    assert masked["padding_mask"] is not None and not masked["padding_mask"].any()
    assert masked["tokens"]["attention_mask"].all()
    unmasked = db.arm_batch(db.chain_arms()[2], batches, cpu)
    assert unmasked["padding_mask"] is None and unmasked["tokens"]["attention_mask"] is None
    lengths = {kind: batches[kind]["tokens"]["input_ids"].shape[1] for kind in batches}
    longest = int(batches["short_longest"]["tokens"]["attention_mask"].sum(1).max())
    assert lengths["short_max"] == sz["max_text"] and lengths["short_longest"] == longest
    assert lengths["short_bucket"] % sz["bucket"] == 0 and longest <= lengths["short_bucket"] < longest + sz["bucket"]
    short = db.arm_batch(db.text_arms()[1], batches, cpu)  # padded texts keep their mask even without "mask"
    assert short["tokens"]["attention_mask"] is not None and not short["tokens"]["attention_mask"].all()


def test_every_eager_arm_computes_the_baselines_loss():
    """The switches change how the step runs, never what it computes: masks or none, BERT's eager or
    fused attention, texts padded to 512, the longest or a bucket give one loss (dropout off)."""
    base = no_dropout(db.base_model(tiny=True))
    sz = db.sizes(True, 3)
    batches = db.make_batches(sz, base.text_encoder.model.config.vocab_size)
    losses = {}
    for arm in db.chain_arms()[:-1] + db.text_arms():
        built = db.make_arm(arm, base, batches, torch.device("cpu"), amp=False)
        batch = db.arm_batch(arm, batches, torch.device("cpu"))
        with torch.no_grad():
            losses[arm.name] = float(built["model"](batch, stage=1)[0])
    full = [losses[n] for n in ("baseline", "bert_sdpa", "no_mask", "no_host_sync", "tf32")]
    short = [losses[a.name] for a in db.text_arms()]
    assert max(full) - min(full) < 1e-5 and max(short) - min(short) < 1e-5
    # other texts, another loss (the comparison can fail): the groups differ by far more than within
    assert abs(full[0] - short[0]) > 10 * max(max(full) - min(full), max(short) - min(short), 1e-6)


def test_alternation_rotates_the_order_and_stops_at_the_deadline_after_min_rounds():
    calls = []
    arms = {n: {"step": (lambda n=n: calls.append(n))} for n in "abc"}
    arms["broken"] = {"error": "ValueError: x"}
    times = db.alternate(arms, torch.device("cpu"), rounds=3, burst=2, deadline=time.monotonic() + 60)
    assert set(times) == {"a", "b", "c"} and all(len(t) == 3 for t in times.values())
    firsts = [calls[i] for i in range(0, len(calls), 6)]  # each round: 3 arms x burst 2
    assert firsts == ["a", "b", "c"]
    calls.clear()
    times = db.alternate(arms, torch.device("cpu"), rounds=5, burst=1, deadline=time.monotonic() - 1, min_rounds=2)
    assert all(len(t) == 2 for t in times.values()) and len(calls) == 6


def test_rows_report_ranges_and_ratios_to_the_first_and_previous_row():
    base = db.base_model(tiny=True)
    sz = db.sizes(True, 4)
    specs = db.chain_arms()[:3]
    arms = {s.name: {"model": base, "text_len": sz["max_text"], "counts": {"skipped": 0}} for s in specs}
    arms["no_mask"] = {"error": "RuntimeError: boom"}
    times = {"baseline": [2.0, 1.0, 4.0], "bert_sdpa": [0.5, 0.5, 1.0]}
    rows = db.arm_rows(specs, arms, times, sz, torch.device("cpu"))
    assert rows[0]["step_s"] == [1.0, 2.0, 4.0] and rows[0]["samples_per_s"] == [1.0, 2.0, 4.0]
    assert rows[1]["speedup_vs_first_row"] == pytest.approx(4.0) and rows[1]["speedup_vs_previous_row"] == 4.0
    assert rows[2]["error"] == "RuntimeError: boom" and rows[0]["mfu"] is None  # no GPU peak on a CPU
    assert rows[0]["flops_per_sample"] > 0


def test_top_kernels_are_the_largest_self_times_per_step():
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def step():
        (a @ b).relu_()
        torch.cumsum(a, 0)

    got = db.top_kernels(step, torch.device("cpu"), steps=2, top=3)
    assert got["by"] == "self CPU time" and len(got["top"]) == 3
    ms = [t["ms_per_step"] for t in got["top"]]
    assert ms == sorted(ms, reverse=True) and 0 < sum(t["share"] for t in got["top"]) <= 1 + 1e-9
    assert any("mm" in t["name"] for t in got["top"])
    assert all(t["calls_per_step"] >= 1 for t in got["top"])
