"""Tests of model.py: the audio encoder (Sec. 3.1.1: stem, padding masks, pooling, the released
initialisation), the symmetric InfoNCE of Eq. 2-4 (brute force, gradcheck, over 2 processes and
under DDP, the released no-grad gather), the stage-2 losses of Eq. 5, text pooling, gradient
checkpointing, fresh heads, what load_artifact accepts and refuses, and the text tower's length
groups on CPU (a ragged batch gives each row what the padded batch gives).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_model.py
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate as ev
from evals import embeddings
import model as htcl

from tests.helpers import ROOT, TINY_BERT, _pair_batch, _stage_loss, brute_force_infonce, tiny_audio_config, tiny_model


def test_stem_maps_1251_frames_to_155_tokens_and_17_frames_to_one():
    stem = htcl.AudioEncoder(tiny_audio_config()).stem
    # Hand-worked: floor((L - k) / s) + 1 three times: 1251 -> 624 -> 311 -> 155.
    assert stem.token_lengths(torch.tensor([1251, 17, 16])).tolist() == [155, 1, 0]
    out = stem(torch.randn(2, 1251, 128))
    assert out.shape == (2, 155, 32)


@pytest.mark.parametrize("audio_cfg", [tiny_audio_config(), htcl.AudioConfig()], ids=["tiny", "paper"])
def test_padding_does_not_change_embedding(audio_cfg):
    torch.manual_seed(0)
    enc = htcl.AudioEncoder(audio_cfg).eval()
    frames_30s = 1 + 30 * 16000 // 1536  # 313
    song = torch.randn(1, frames_30s, 128)
    with torch.no_grad():
        alone = enc(song)
        for total in (1 + 60 * 16000 // 1536, 1251):  # padded to 60 s and to 120 s
            padded = torch.cat([song, 7 * torch.randn(1, total - frames_30s, 128)], 1)  # junk in the padding
            mask = torch.zeros(1, total, dtype=torch.bool)
            mask[:, frames_30s:] = True
            torch.testing.assert_close(enc(padded, mask), alone, atol=2e-5, rtol=1e-4)
        # A batch that pads one song must give each song its own embedding.
        other = torch.randn(1, 1251, 128)
        batch = torch.cat([F.pad(song, (0, 0, 0, 1251 - frames_30s)), other])
        mask = torch.zeros(2, 1251, dtype=torch.bool)
        mask[0, frames_30s:] = True
        out = enc(batch, mask)
        torch.testing.assert_close(out[0:1], alone, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out[1:2], enc(other), atol=2e-5, rtol=1e-4)
        # The padding mask matters: without it the padded frames do change the embedding.
        assert (enc(padded) - alone).abs().max() > 1e-3


def test_embedding_is_deterministic_in_eval_mode():
    enc = htcl.AudioEncoder(tiny_audio_config()).eval()
    x = torch.randn(2, 100, 128)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), enc(x), atol=0, rtol=0)


def test_infonce_is_ln_batch_when_all_embeddings_are_equal():
    for B in (2, 7, 64):
        x = torch.ones(B, 16)
        loss = htcl.contrastive_loss(x, x.clone(), torch.tensor(2.6))
        assert loss.item() == pytest.approx(math.log(B), rel=1e-6)


def test_infonce_gradients_pass_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(htcl.contrastive_loss, (x, y, s))


def test_logit_scale_is_clamped_to_ln_100():
    m = tiny_model()
    with torch.no_grad():
        for p in m.logit_scale.values():
            p.fill_(9.0)
    m.clamp_logit_scales()
    assert all(p.item() == pytest.approx(math.log(100)) for p in m.logit_scale.values())
    assert m.logit_scale["at"].item() == pytest.approx(math.log(100))


def _two_process_worker(rank, world, init_file, x_all, y_all, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Linear(x_all.shape[1], 6, dtype=torch.float64)  # same init on both ranks
    scale = torch.nn.Parameter(torch.tensor(2.6, dtype=torch.float64))
    B = x_all.shape[0] // world
    sl = slice(rank * B, (rank + 1) * B)
    loss = htcl.contrastive_loss(net(x_all[sl]), net(y_all[sl]), scale)
    loss.backward()
    grads = [net.weight.grad, net.bias.grad, scale.grad]
    for g in grads:  # what DDP does: average the gradients over processes
        dist.all_reduce(g)
        g /= world
    dist.all_reduce(loss.detach())
    torch.save({"loss": loss.detach() / world, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _slice_batch(batch, sl):
    """Rows `sl` of a batch, re-trimmed to their own longest item as a per-process collator would."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            keep = int(v["attention_mask"][sl].sum(1).max())
            out[k] = {kk: vv[sl, :keep] for kk, vv in v.items()}
        elif k.endswith("mel"):
            keep = int((~batch[k.replace("mel", "padding_mask")][sl]).sum(1).max())
            out[k] = v[sl, :keep]
            out[k.replace("mel", "padding_mask")] = batch[k.replace("mel", "padding_mask")][sl, :keep]
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_checkpointing_keeps_loss_and_gradients_and_stores_less(stage):
    """Training mode, dropout on: recomputation replays the RNG, so loss and every gradient equal the
    run without it; the tensors kept for backward (counted through saved_tensors_hooks) shrink."""
    from transformers import AutoTokenizer
    batch = _pair_batch(AutoTokenizer.from_pretrained(TINY_BERT), B=4)
    runs = {}
    for on in (False, True):
        m = tiny_model().train()
        m.freeze_unused(stage=stage)
        m.set_gradient_checkpointing(audio=on, text=on)
        saved = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = _stage_loss(m, batch, stage)
        loss.backward()
        runs[on] = (loss.item(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}, sum(saved))
        assert m.cfg.audio.gradient_checkpointing is on and m.text_encoder.checkpointing is on
    (l0, g0, s0), (l1, g1, s1) = runs[False], runs[True]
    assert l1 == pytest.approx(l0, rel=1e-6) and g0.keys() == g1.keys() and len(g0) > 20
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)
    assert s1 < 0.6 * s0, (s1, s0)


def _ddp_worker(rank, world, init_file, stage, out_dir):
    import torch.distributed as dist
    from transformers import AutoTokenizer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    m = tiny_model().eval()  # eval: no dropout, so both runs are deterministic
    m.freeze_unused(stage=stage)
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    batch = _pair_batch(AutoTokenizer.from_pretrained(TINY_BERT))
    B = batch["rec_mel"].shape[0] // world
    loss = _stage_loss(ddp, _slice_batch(batch, slice(rank * B, (rank + 1) * B)), stage)
    loss.backward()  # DDP averages the gradients over the processes
    dist.all_reduce(loss := loss.detach())
    grads = {k: p.grad for k, p in m.named_parameters() if p.requires_grad}
    torch.save({"loss": loss / world, "grads": grads}, os.path.join(out_dir, f"ddp{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("stage", [1, 2])
def test_ddp_stage_losses_and_gradients_match_one_process(tmp_path, stage):
    from transformers import AutoTokenizer
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), stage, str(tmp_path)), nprocs=2)
    m = tiny_model().eval()
    m.freeze_unused(stage=stage)
    loss = _stage_loss(m, _pair_batch(AutoTokenizer.from_pretrained(TINY_BERT)), stage)
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"ddp{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        assert set(got["grads"]) == {k for k, p in m.named_parameters() if p.requires_grad}
        for k, p in m.named_parameters():
            if p.requires_grad:
                # fp32 sums in another order (DDP buckets): tolerance relative to the tensor's scale
                scale = p.grad.abs().max().item()
                torch.testing.assert_close(got["grads"][k], p.grad, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=k)


def test_infonce_over_two_processes_matches_one_process_on_the_whole_batch(tmp_path):
    """Negatives from every process and correct gradients: loss and gradients of 2 gloo
    processes (each holding half the batch) equal 1 process on the whole batch."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, dtype=torch.float64, generator=g), torch.randn(8, 5, dtype=torch.float64, generator=g)
    torch.multiprocessing.spawn(_two_process_worker, args=(2, str(tmp_path / "init"), x, y, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 6, dtype=torch.float64)
    scale = torch.nn.Parameter(torch.tensor(2.6, dtype=torch.float64))
    loss = htcl.contrastive_loss(net(x), net(y), scale)
    loss.backward()
    for rank in range(2):
        got = torch.load(os.path.join(tmp_path, f"rank{rank}.pt"), weights_only=True)
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
        for a, b in zip(got["grads"], [net.weight.grad, net.bias.grad, scale.grad]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_wrapper_prefixes_are_stripped_from_saved_weights():
    state = {"module._orig_mod.audio_proj.0.weight": torch.ones(2), "module.logit_scale.at": torch.zeros(())}
    assert sorted(htcl.clean_state_dict(state)) == ["audio_proj.0.weight", "logit_scale.at"]


def test_released_initialisation_identical_layers_xavier_attention_and_unit_cls():
    torch.manual_seed(0)
    enc = htcl.AudioEncoder()
    D = enc.cfg.hidden
    first = enc.layers[0].state_dict()
    for layer in enc.layers[1:]:  # nn.TransformerEncoder deep-copies one layer
        for k, v in layer.state_dict().items():
            assert torch.equal(v, first[k]), k
    assert 0.9 < enc.cls_token.std().item() < 1.1  # torch.randn over 768 values: std 1 +- ~0.03
    w = enc.layers[0].in_proj.weight
    bound = math.sqrt(6 / (D + 3 * D))  # Xavier-uniform over the whole (3D, D) in-projection
    # the max of 1.8M uniform draws sits at the bound; nn.Linear's default (bound 1/sqrt(D)) stays below 0.82 of it
    assert 0.99 * bound < w.abs().max().item() <= bound
    assert not enc.layers[0].in_proj.bias.any() and not enc.layers[0].out_proj.bias.any()
    # nn.Linear's default init for out_proj, linear1 and linear2: uniform within 1/sqrt(fan_in)
    assert enc.layers[0].out_proj.weight.abs().max().item() <= 1 / math.sqrt(D)


def test_fresh_heads_are_seeded_and_leave_the_encoders():
    m = tiny_model()
    with torch.no_grad():
        for p in m.logit_scale.values():
            p.fill_(4.0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.reset_heads(seed=7)
    first = {k: v.clone() for k, v in m.state_dict().items()}
    m.reset_heads(seed=7)
    assert all(torch.equal(v, first[k]) for k, v in m.state_dict().items())  # same seed, same heads
    m.reset_heads(seed=8)
    assert not torch.equal(m.state_dict()["fusion.0.weight"], first["fusion.0.weight"])
    for k, v in first.items():
        if k.startswith(("audio_proj.", "text_proj.", "fusion.")):
            assert not torch.equal(v, before[k]), k
        elif k.startswith("logit_scale."):
            assert v.item() == pytest.approx(2.6)
        else:
            assert torch.equal(v, before[k]), k  # both encoders untouched


def _released_gather_loss(x, y, logit_scale):
    """The released code's distributed loss, described in words (train_stage1.py): all_gather
    both embeddings under no_grad, put this rank's own tensors back in its slot (so they keep
    their graph), normalize, and take the symmetric CE over the whole B_global x B_global matrix."""
    import torch.distributed as dist
    world, rank = dist.get_world_size(), dist.get_rank()
    gathered = []
    for local in (x, y):
        with torch.no_grad():
            slots = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(slots, local)
        slots[rank] = local
        gathered.append(F.normalize(torch.cat(slots), dim=-1))
    logits = logit_scale.exp() * gathered[0] @ gathered[1].T  # (B_global, B_global)
    labels = torch.arange(len(logits))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _released_gather_worker(rank, world, init_file, x_all, y_all, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    B = x_all.shape[0] // world
    sl = slice(rank * B, (rank + 1) * B)
    out = {}
    for form, loss_fn in (("ours", htcl.contrastive_loss), ("released", _released_gather_loss)):
        torch.manual_seed(0)
        net = torch.nn.Linear(x_all.shape[1], 6, dtype=torch.float64)  # same init on both ranks
        scale = torch.nn.Parameter(torch.tensor(2.6, dtype=torch.float64))
        loss_fn(net(x_all[sl]), net(y_all[sl]), scale).backward()
        grads = [net.weight.grad, net.bias.grad, scale.grad]
        for g in grads:  # what DDP does: average the gradients over processes
            dist.all_reduce(g)
            g /= world
        out[form] = grads
    torch.save(out, os.path.join(out_dir, f"released{rank}.pt"))
    dist.destroy_process_group()


def test_released_no_grad_gather_scales_the_embedding_gradient_by_one_over_world(tmp_path):
    """2 gloo processes: the released gather-under-no_grad form gives the single-process gradient
    divided by the world size for the network, and the full one for the logit scale; ours gives
    the single-process gradient for both."""
    world = 2
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, dtype=torch.float64, generator=g), torch.randn(8, 5, dtype=torch.float64, generator=g)
    torch.multiprocessing.spawn(_released_gather_worker, args=(world, str(tmp_path / "init"), x, y, str(tmp_path)),
                                nprocs=world)
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 6, dtype=torch.float64)
    scale = torch.nn.Parameter(torch.tensor(2.6, dtype=torch.float64))
    htcl.contrastive_loss(net(x), net(y), scale).backward()  # one process, whole batch
    full = [net.weight.grad, net.bias.grad, scale.grad]
    for rank in range(world):
        got = torch.load(tmp_path / f"released{rank}.pt", weights_only=True)
        for a, b in zip(got["ours"], full):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(got["released"][:2], full[:2]):
            torch.testing.assert_close(a, b / world, rtol=1e-10, atol=1e-12)
            assert (a - b).abs().max() > 0.1 * b.abs().max()  # really not the full gradient
        torch.testing.assert_close(got["released"][2], full[2], rtol=1e-10, atol=1e-12)


# Checked by making its bug by hand: load_artifact with strict=False and no key check.
def test_artifact_with_a_missing_or_renamed_weight_is_refused_naming_the_key(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer
    htcl.save_artifact(tiny_model(), AutoTokenizer.from_pretrained(TINY_BERT), tmp_path / "art")
    path = tmp_path / "art" / "model.safetensors"
    state = load_file(path)
    weight = state.pop("audio_proj.0.weight")
    save_file(state, path)
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing.*audio_proj\.0\.weight"):
        htcl.load_artifact(tmp_path / "art")
    save_file({**state, "audio_projection.0.weight": weight}, path)  # renamed: one missing, one unknown
    with pytest.raises(ValueError, match=r"audio_proj\.0\.weight.*unexpected.*audio_projection\.0\.weight"):
        htcl.load_artifact(tmp_path / "art")


# Checked by making its bug by hand: mean pooling as h.mean(1), over the padding too.
@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_text_padding_does_not_change_text_embedding(pooling):
    """A song's text embedding must not depend on the other texts in its batch (padding)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_BERT)
    m = tiny_model(text_pooling=pooling).eval()
    assert m.text_encoder.pooling == pooling
    short, long = "title: la; artists: lo", " ".join(["la lo li"] * 12)
    batch = tok([short, long], padding="longest", return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the short text is padded
    with torch.no_grad():
        together = m.encode_text(batch)
        for i, text in enumerate((short, long)):
            alone = m.encode_text(tok([text], return_tensors="pt"))
            torch.testing.assert_close(together[i:i + 1], alone, atol=2e-5, rtol=1e-4)


def _stage2_parts_by_brute_force(m, batch, use_trigger_text):
    """L_aa, L_af, L_at of Eq. 5 from each song's embeddings (each side encoded on its own),
    with brute_force_infonce's plain-Python double loop in place of model.contrastive_loss."""
    with torch.no_grad():
        trig_a = m.encode_audio(batch["trig_mel"], batch["trig_padding_mask"], normalize=False)
        rec_a = m.encode_audio(batch["rec_mel"], batch["rec_padding_mask"], normalize=False)
        trig_t = m.encode_text(batch["trig_tokens"], normalize=False)
        rec_t = m.encode_text(batch["rec_tokens"], normalize=False)
        trig_f, rec_f = m.fuse(trig_a, trig_t, normalize=False), m.fuse(rec_a, rec_t, normalize=False)
    s = {k: v.item() for k, v in m.logit_scale.items()}
    if use_trigger_text:  # released code: L_af both ways, L_at over both songs (batch 2B)
        af = 0.5 * (brute_force_infonce(trig_a, rec_f, s["af"]) + brute_force_infonce(rec_a, trig_f, s["af"]))
        at = brute_force_infonce(torch.cat([trig_a, rec_a]), torch.cat([trig_t, rec_t]), s["at"])
    else:  # paper: triplets <trigger audio, rec audio, rec text>
        af = brute_force_infonce(trig_a, rec_f, s["af"])
        at = brute_force_infonce(rec_a, rec_t, s["at"])
    miswired_af = brute_force_infonce(rec_a, rec_f, s["af"])  # the rec song's audio in place of the trigger's
    return {"aa": brute_force_infonce(trig_a, rec_a, s["aa"]), "af": af, "at": at}, miswired_af


# Checked by making its bug by hand: L_af on the rec song's audio; L_at with the af temperature; released
# L_at on rec only.
@pytest.mark.parametrize("use_trigger_text", [False, True], ids=["paper", "released"])
def test_stage2_losses_match_brute_force_from_the_same_embeddings(use_trigger_text):
    from transformers import AutoTokenizer
    batch = _pair_batch(AutoTokenizer.from_pretrained(TINY_BERT), B=6, seed=3)
    m = tiny_model().eval()
    with torch.no_grad():  # three different temperatures, so swapping two of them shows
        for name, value in zip(("aa", "af", "at"), (1.5, 3.0, 4.0)):
            m.logit_scale[name].fill_(value)
    want, miswired_af = _stage2_parts_by_brute_force(m, batch, use_trigger_text)
    with torch.no_grad():
        loss, parts = m(batch, stage=2, use_trigger_text=use_trigger_text)
    for name in ("aa", "af", "at"):
        assert parts[name].item() == pytest.approx(want[name], rel=1e-4), (name, parts, want)
    assert loss.item() == pytest.approx(sum(want.values()), rel=1e-4)
    if not use_trigger_text:
        assert abs(miswired_af - want["af"]) > 0.05  # so a miswired L_af cannot pass the check above


def test_cls_pooling_ignores_padding_and_differs_from_the_mean():
    torch.manual_seed(0)
    enc = htcl.AudioEncoder(tiny_audio_config(), pooling="cls").eval()
    mean_enc = htcl.AudioEncoder(tiny_audio_config()).eval()
    mean_enc.load_state_dict(enc.state_dict())
    song = torch.randn(1, 60, 128)
    padded = torch.cat([song, 5 * torch.randn(1, 40, 128)], 1)  # junk in the padding
    mask = torch.zeros(1, 100, dtype=torch.bool)
    mask[:, 60:] = True
    with torch.no_grad():
        alone = enc(song)
        torch.testing.assert_close(enc(padded, mask), alone, atol=2e-5, rtol=1e-4)
        assert (enc(padded) - alone).abs().max() > 1e-3  # without the mask the padding leaks into [CLS]
        assert (mean_enc(song) - alone).abs().max() > 1e-3  # the switch does change the pooling
    with pytest.raises(ValueError, match="audio_pooling"):
        htcl.AudioEncoder(tiny_audio_config(), pooling="max")


def test_artifact_whose_config_disagrees_with_its_weights_names_folder_and_parameter(tiny_world, tmp_path):
    import shutil
    folder = tmp_path / "artifact"
    shutil.copytree(tiny_world / "artifact", folder)
    config = json.loads((folder / "config.json").read_text())
    config["proj_dims"] = [12, 6]  # the weights were saved with (12, 8)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"^{folder}: config.json disagrees .*parameter \S+proj\S+ has shape"):
        htcl.load_artifact(str(folder))
    with pytest.raises(SystemExit) as e:
        ev.cli(["embed", "--artifact", str(folder), "--catalog", str(tiny_world / "catalog.csv"),
                "--out", str(tmp_path / "emb")])
    assert str(e.value.code).startswith(f"Error: {folder}: config.json disagrees")


def test_unknown_config_keys_get_one_message_top_level_or_nested():
    for bad, key in (({"bogus": 1}, "bogus"), ({"audio": {"layerz": 2}}, "audio.layerz")):
        with pytest.raises(ValueError, match=rf"^x/config.json: unknown HTCLConfig keys: \['{key}'\]$"):
            htcl.HTCLConfig.from_dict(bad, source="x/config.json")
    assert htcl.HTCLConfig.from_dict({"audio": {"layers": 3}}).audio.layers == 3


def test_audio_only_artifact_gives_the_same_audio_embeddings_without_bert(tiny_world):
    """load_artifact(text=False) skips BERT: no text weights read, no BERT module imported, and
    the audio embeddings equal the full model's."""
    d = tiny_world
    full, _ = htcl.load_artifact(d / "artifact")
    audio, tok = htcl.load_artifact(d / "artifact", text=False)
    assert tok is None and audio.text_encoder is None
    assert not any(k.startswith("text_encoder.") for k in audio.state_dict())
    mel = torch.randn(3, 120, 128)
    with torch.no_grad():
        assert torch.equal(full.encode_audio(mel), audio.encode_audio(mel))
    with pytest.raises(RuntimeError, match="loaded for audio only"):
        audio.encode_text({"input_ids": torch.ones(1, 3, dtype=torch.long)})
    # embedding a catalog's audio needs neither BERT nor a tokenizer (a fresh process), and gives
    # what the full model gives
    code = (f"import sys, numpy as np, data; from evals import embeddings; cat = data.load_catalog({str(d / 'catalog.csv')!r}); "
            f"np.save(sys.argv[1], embeddings.song_embeddings({str(d / 'artifact')!r}, cat)); "
            "print('transformers.models.bert.modeling_bert' in sys.modules)")
    out = d / "audio_only.npy"
    p = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines()[-1] == "False", p.stdout
    from data import load_catalog
    want = embeddings.embed_catalog(full, _, load_catalog(d / "catalog.csv"))["audio"]
    assert np.allclose(np.load(out), want, atol=1e-6)


# The text tower on CPU: ragged batches in two length groups (model.length_groups).

TEXTS = ["a", "short title", "lyrics " * 40, "b c", "another song title here", "la " * 25]


def _tokens(padding_side="right"):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TINY_BERT)
    tok.padding_side = padding_side
    return dict(tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt"))


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_ragged_batch_in_length_groups_gives_each_row_the_padded_batch_output(pooling):
    torch.manual_seed(0)
    enc = htcl.TextEncoder(TINY_BERT, pretrained=False, pooling=pooling).eval()
    tokens = _tokens()
    groups = htcl.length_groups(tokens["attention_mask"])
    assert groups is not None and len(groups) == 2  # the two long texts apart from the four short ones
    assert sorted(torch.cat([g for g, _ in groups]).tolist()) == list(range(len(TEXTS)))
    with torch.no_grad():
        grouped = enc(tokens)
        padded = enc._forward(tokens)  # the whole batch padded to its longest text
        one_by_one = torch.cat([enc._forward({k: v[i:i + 1, :int(tokens["attention_mask"][i].sum())]
                                              for k, v in tokens.items()}) for i in range(len(TEXTS))])
    assert torch.allclose(grouped, padded, atol=1e-5)
    assert torch.allclose(grouped, one_by_one, atol=1e-5)  # and as each text alone, unpadded


def test_no_groups_when_left_padded_or_when_nothing_is_saved():
    assert htcl.length_groups(_tokens("left")["attention_mask"]) is None  # trimming the right would cut text
    even = torch.ones(4, 10, dtype=torch.long)
    even[0, 9] = 0
    assert htcl.length_groups(even) is None  # one padded token: no split pays


def test_groups_keep_gradients_for_every_row():
    torch.manual_seed(0)
    enc = htcl.TextEncoder(TINY_BERT, pretrained=False, pooling="cls").train()
    torch.manual_seed(1)
    enc.eval()
    out = enc(_tokens())
    out[2].sum().backward()  # a long text's row, in the second group
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
