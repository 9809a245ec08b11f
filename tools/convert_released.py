"""Released-checkpoint converter: a model-N.pth of the authors' code -> an artifact of this repo.

The authors' train_stage1.py (Sec. 2.1) and train_stage2.py (Sec. 2.2) save the state_dict of their
ModelWrapper (audio_model.*, text_model.*, audio_mlp.*, text_mlp.*, [fusion_mlp.*], tau or
tau_1..tau_3). This maps every tensor, one to one, onto model.HTCL (Fig. 1b) and writes the artifact
folder that evaluate.py and finetune.py read (config.json, model.safetensors, tokenizer):

    python tools/convert_released.py model-20.pth --text_model bert-base-multilingual-uncased --out runs/released

The head count and the conv strides are not in any tensor's shape: --heads and --conv_strides
(released defaults 12 and 2 2 2). Runs from any folder.
"""
import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `import model`
from evals.embeddings import positive_int  # noqa: E402  (the command lines' one check of a count)
from model import HTCL, AudioConfig, HTCLConfig, clean_state_dict, load_artifact, save_artifact  # noqa: E402

# Released module path -> ours, for the audio encoder (models/audio_model.py's AudioModel). {i}: an index.
_RELEASED_AUDIO = [
    (r"cls_token", "cls_token"),
    (r"feature_extractor\.layers\.(\d+)\.1\.weight", "stem.convs.{0}.weight"),  # Conv1d, no bias
    (r"feature_extractor\.layers\.(\d+)\.3\.(weight|bias)", "stem.norms.{0}.{1}"),  # its LayerNorm
    (r"feature_projection\.layer_norm\.(weight|bias)", "feature_norm.{0}"),
    (r"feature_projection\.projection\.(weight|bias)", "feature_proj.{0}"),
    (r"pos_conv_embed\.conv\.bias", "pos_conv.conv.bias"),
    # weight norm: parametrizations (original0 = g, original1 = v), or the old weight_g / weight_v
    (r"pos_conv_embed\.conv\.parametrizations\.weight\.(original[01])", "pos_conv.conv.parametrizations.weight.{0}"),
    (r"pos_conv_embed\.conv\.weight_g", "pos_conv.conv.parametrizations.weight.original0"),
    (r"pos_conv_embed\.conv\.weight_v", "pos_conv.conv.parametrizations.weight.original1"),
    (r"pos_conv_embed\.layer_norm\.(weight|bias)", "pos_conv.norm.{0}"),
    (r"layer_norm\.(weight|bias)", "pos_norm.{0}"),
    (r"transformer_encoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)", "layers.{0}.in_proj.{1}"),
    (r"transformer_encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "layers.{0}.out_proj.{1}"),
    (r"transformer_encoder\.layers\.(\d+)\.(linear1|linear2|norm1|norm2)\.(weight|bias)", "layers.{0}.{1}.{2}"),
]
# The released wrapper's temperatures (log logit scales) -> ours. train_stage2.py: tau_1 audio<->text,
# tau_2 trigger audio<->rec audio, tau_3 audio<->fused.
_RELEASED_TAU = {"tau": "at", "tau_1": "at", "tau_2": "aa", "tau_3": "af"}
_RELEASED_MLP = {"audio_mlp": "audio_proj", "text_mlp": "text_proj", "fusion_mlp": "fusion"}
# Buffers that older transformers versions saved with BertModel and current ones rebuild.
_RELEASED_TEXT_BUFFERS = ("embeddings.position_ids",)


class ConversionError(ValueError):
    """A released checkpoint this converter cannot map; the message names the key."""


def released_key(key):
    """A released ModelWrapper state_dict key -> ours, or None where it has no place."""
    if key in _RELEASED_TAU:
        return f"logit_scale.{_RELEASED_TAU[key]}"
    head, _, rest = key.partition(".")
    if head == "text_model":
        return "text_encoder.model." + rest
    if head in _RELEASED_MLP:
        # released MLP: Linear, ReLU, Dropout(0) per block -> Linear layers at 0, 3, 6; ours: 0, 2, 4
        m = re.fullmatch(r"(\d+)\.(weight|bias)", rest)
        if m and int(m.group(1)) % 3 == 0:
            return f"{_RELEASED_MLP[head]}.{2 * (int(m.group(1)) // 3)}.{m.group(2)}"
        return None
    if head == "audio_model":
        for pattern, ours in _RELEASED_AUDIO:
            m = re.fullmatch(pattern, rest)
            if m:
                return "audio_encoder." + ours.format(*m.groups())
    return None


def _released_config(state, text_model, heads, conv_strides):
    """HTCLConfig of a released checkpoint, read from its tensors' shapes. The head count and the
    conv strides are not in any shape: the released AudioModel's defaults (12, (2, 2, 2)) unless given."""
    def shape(key):
        if key not in state:
            raise ConversionError(f"released checkpoint has no {key!r}: not a train_stage1/2.py ModelWrapper state_dict")
        return tuple(state[key].shape)

    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    n_convs = count("audio_model.feature_extractor.layers.")
    convs = [shape(f"audio_model.feature_extractor.layers.{i}.1.weight") for i in range(n_convs)]  # (C_out, C_in, k)
    if len({c[0] for c in convs}) != 1:
        raise ConversionError(f"conv stem channels {[c[0] for c in convs]} differ between layers; "
                              f"model.ConvStem has one width")
    if len(conv_strides) != n_convs:
        raise ConversionError(f"--conv_strides {conv_strides} gives {len(conv_strides)} strides; "
                              f"the checkpoint has {n_convs} conv layers")
    hidden = shape("audio_model.feature_projection.projection.weight")[0]
    v = ("audio_model.pos_conv_embed.conv.parametrizations.weight.original1"
         if "audio_model.pos_conv_embed.conv.parametrizations.weight.original1" in state
         else "audio_model.pos_conv_embed.conv.weight_v")
    pos = shape(v)  # (D, D / groups, k)
    if hidden % heads:
        raise ConversionError(f"hidden size {hidden} is not a multiple of --heads {heads}")
    audio = AudioConfig(n_mels=convs[0][1], conv_channels=convs[0][0], conv_kernels=tuple(c[2] for c in convs),
                        conv_strides=tuple(conv_strides), hidden=hidden,
                        layers=count("audio_model.transformer_encoder.layers."), heads=heads,
                        ffn=shape("audio_model.transformer_encoder.layers.0.linear1.weight")[0],
                        pos_conv_kernel=pos[2], pos_conv_groups=hidden // pos[1])

    def mlp_dims(name):  # output sizes of the Linear layers (released indices 0, 3, 6, ...)
        idx = sorted({int(k.split(".")[1]) for k in state if k.startswith(f"{name}.") and k.endswith(".weight")})
        return tuple(shape(f"{name}.{i}.weight")[0] for i in idx)

    proj = mlp_dims("audio_mlp")
    fusion = mlp_dims("fusion_mlp") if any(k.startswith("fusion_mlp.") for k in state) else (2 * proj[-1], proj[-1], proj[-1])
    return HTCLConfig(audio=audio, text_model=text_model, text_pretrained=False, text_pooling="pooler",
                      proj_dims=proj, fusion_dims=fusion)


def convert_released(ckpt, text_model, out, heads=12, conv_strides=(2, 2, 2), seed=3407):
    """A released model-N.pth -> an artifact folder (config.json, model.safetensors, tokenizer of
    text_model) that load_artifact reads strictly and that gives the released model's embeddings
    (text: BERT's pooler output, as the released wrapper) and temperatures. Returns the folder.

    Every checkpoint key must map to one of ours with the same shape, and every one of ours must be
    filled, or ConversionError names the key. One exception: a stage-1 checkpoint has no fusion MLP
    and no aa / af temperatures; they are filled as the released train_stage2.py starts them
    (fresh fusion, seeded; temperatures 2.6), and config.json lists them.
    """
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same one-line answer
        raise ConversionError(f"{ckpt}: cannot be read as a weights-only torch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{ckpt}: expected a state_dict (name -> tensor) as train_stage1/2.py save it")
    state = clean_state_dict(state)
    if ("tau" in state) == ("tau_1" in state):
        raise ConversionError(f"{ckpt}: expected 'tau' (train_stage1.py) or 'tau_1'..'tau_3' (train_stage2.py)")
    stage = 1 if "tau" in state else 2
    state = {k: v for k, v in state.items()  # buffers of old transformers versions, rebuilt by current ones
             if not (k.startswith("text_model.") and k[len("text_model."):] in _RELEASED_TEXT_BUFFERS)}
    for k in state:  # before building anything: the first key with no place stops the conversion
        if released_key(k) is None:
            raise ConversionError(f"{ckpt}: key {k!r} has no place in model.HTCL (not a released "
                                  f"train_stage1/2.py ModelWrapper key)")
    cfg = _released_config(state, text_model, heads, tuple(conv_strides))
    torch.manual_seed(seed)  # the fresh parts of a stage-1 checkpoint (fusion) are seeded
    model = HTCL(cfg)
    ours = model.state_dict()
    mapped = {}
    for k, v in state.items():
        name = released_key(k)
        if name not in ours:
            raise ConversionError(f"{ckpt}: key {k!r} -> {name!r}, which this model does not have "
                                  f"(a different text model than --text_model {text_model}?)")
        if tuple(v.shape) != tuple(ours[name].shape):
            raise ConversionError(f"{ckpt}: key {k!r} has shape {tuple(v.shape)}, {name!r} expects "
                                  f"{tuple(ours[name].shape)} (is --text_model / --heads right?)")
        mapped[name] = v.to(ours[name].dtype)
    filled = sorted(set(ours) - set(mapped))
    fresh_in_stage1 = {k for k in ours if k.startswith("fusion.") or k in ("logit_scale.aa", "logit_scale.af")}
    missing = sorted(set(filled) - (fresh_in_stage1 if stage == 1 else set()))
    if missing:
        raise ConversionError(f"{ckpt}: nothing in the checkpoint fills {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict({**ours, **mapped}, strict=True)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(text_model)
    save_artifact(model, tokenizer, out, extra={
        "converted_from": os.path.abspath(str(ckpt)), "stage": stage, "filled_fresh": filled,
        # NOTE(paper): the released model saw every song padded/truncated to 1251 frames with the
        # -80 dB floor, standardized over those 1251 frames, and pooled over all tokens, no mask.
        "released_input": "1251 frames, floor padding, no mask; equal to ours for songs of 120 s or more"})
    return out


ARTIFACT_FILES = ("config.json", "model.safetensors")


def prepare_out(out, overwrite=False):
    """--out must be new or empty, or (with overwrite) an earlier artifact, which main replaces once the
    conversion succeeded. A folder holding anything else is refused: its files would end up inside
    the artifact."""
    if not os.path.exists(out) or (os.path.isdir(out) and not os.listdir(out)):
        return
    if not os.path.isdir(out):
        raise ConversionError(f"--out {out}: exists and is not a folder")
    if not all(os.path.exists(os.path.join(out, f)) for f in ARTIFACT_FILES):
        found = sorted(os.listdir(out))
        raise ConversionError(f"--out {out}: not empty and not an artifact ({', '.join(found[:3])}"
                              f"{' ...' if len(found) > 3 else ''}); give a new or empty folder")
    if not overwrite:
        raise ConversionError(f"--out {out}: holds an artifact already; pass --overwrite to replace it")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each option's default."""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("ckpt", help="model-N.pth saved by the released train_stage1.py or train_stage2.py")
    p.add_argument("--text_model", required=True,
                   help="the BERT it was trained from (hub name or local folder): its config and tokenizer")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an artifact already in --out (a folder "
                   "holding anything else is always refused)")
    p.add_argument("--heads", type=positive_int, default=12, help="attention heads (not in the weights; released: 12)")
    p.add_argument("--conv_strides", type=positive_int, nargs="+", default=[2, 2, 2],
                   help="conv stem strides (not in the weights; released: 2 2 2)")
    args = p.parse_args(argv)
    out, tmp = args.out, os.path.normpath(args.out) + ".converting"  # the old artifact stays until this works
    try:
        prepare_out(out, args.overwrite)
        shutil.rmtree(tmp, ignore_errors=True)
        convert_released(args.ckpt, args.text_model, tmp, args.heads, args.conv_strides)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except (ConversionError, OSError) as e:
        raise SystemExit(f"convert_released: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed conversion leaves nothing behind
    model, _ = load_artifact(out)  # read back strictly: what was written is what evaluate.py will load
    with open(os.path.join(out, "config.json")) as f:
        info = json.load(f)["training"]
    temps = ", ".join(f"{k} {v.item():.4f}" for k, v in model.logit_scale.items())
    print(f"wrote {out}: stage-{info['stage']} checkpoint, logit scales {temps}"
          + (f"; filled as released stage 2 starts them: {len(info['filled_fresh'])} tensors "
             f"(fusion MLP, aa/af temperatures)" if info["filled_fresh"] else ""))


if __name__ == "__main__":
    main()
