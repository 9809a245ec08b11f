"""HTCL model (Sec. 2, Fig. 1b): the audio and text towers, the heads, the one contrastive loss.

"Bridging the Gap Between Semantic and User Preference Spaces for Multi-modal Music
Representation Learning" (Pan et al., ICMR 2025). Reads top to bottom in the order of Fig. 1b:

    configs -> conv stem -> positional conv -> Transformer layer -> audio encoder E_audio
    -> BERT wrapper E_text -> projection / fusion MLPs -> symmetric InfoNCE (Eq. 2-4)
    -> HTCL with the stage losses (Sec. 2.1; Sec. 2.2, Eq. 5)
    -> artifact save / load (the hand-off between the two stages)

Nothing here trains (pretrain.py and finetune.py do). `python model.py` prints the paper
default's size (88,500,511 audio-encoder parameters, 1251 frames -> 155 tokens). A checkpoint of
the authors' released code becomes an artifact with tools/convert_released.py.
"""
import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from text_models import auto_text_pooling, resolve_text_model  # noqa: F401  (htcl.resolve_text_model)

# -----------------------------------------------------------------------------
# Configs. Every number is the paper's (Sec. 3.1.3) or, where the paper is
# silent, the authors' released code's.


@dataclass
class AudioConfig:
    """E_audio's sizes; the defaults are the paper's audio encoder."""
    n_mels: int = 128                         # Sec. 3.1.3: 128 mel bins
    conv_channels: int = 512                  # Sec. 3.1.3: 1-D conv stem, 512 channels
    conv_kernels: tuple = (5, 3, 3)           # Sec. 3.1.3
    conv_strides: tuple = (2, 2, 2)           # Sec. 3.1.3: 1251 frames -> 155 tokens
    hidden: int = 768                         # Sec. 3.1.3: Transformer width
    layers: int = 12                          # Sec. 3.1.3
    heads: int = 12                           # Sec. 3.1.3
    ffn: int = 3072                           # released code (nn.TransformerEncoder, 4x width)
    dropout: float = 0.1                      # released code
    pos_conv_kernel: int = 31                 # released code (wav2vec2-style positional conv)
    pos_conv_groups: int = 16                 # released code
    gradient_checkpointing: bool = False      # memory knob, not a model change


@dataclass
class HTCLConfig:
    """The whole model of Fig. 1b; saved as an artifact's config.json."""
    audio: AudioConfig = field(default_factory=AudioConfig)
    text_model: str = "bert-base-multilingual-uncased"  # Sec. 3.1.3; hub name or local folder
    text_pretrained: bool = True              # False: build the text model from its config (random init)
    text_pooling: str = "auto"                # auto = a sentence-transformers model's own, else pooler_output (paper), else cls; or pooler / cls / mean
    text_gradient_checkpointing: bool = False
    proj_dims: tuple = (384, 192, 100)        # released code: 768 -> 384 -> 192 -> 100, ReLU between
    fusion_dims: tuple = (200, 100, 100)      # released code: concat(100, 100) -> 200 -> 100 -> 100
    logit_scale_init: float = 2.6             # released code: exp(2.6) ~ 13.5, tau ~ 0.074
    logit_scale_max: float = math.log(100)    # NOTE(paper): released code does not clamp; CLIP/open_clip clamp to ln 100
    # Switches for the CrossMuSim variant (a sister paper's recipe); the defaults are HTCL's.
    learn_temperature: bool = True            # HTCL: learnable; False = tau fixed at exp(-logit_scale_init) (CrossMuSim: 0.07)
    audio_pooling: str = "mean"               # mean (released HTCL code) | cls (CrossMuSim: embedding at [CLS])
    embed_mode: str = "full"                  # inference the model was trained for: full (HTCL: whole song) | chunked (CrossMuSim)
    chunk_seconds: float = 10.0               # CrossMuSim: 10 s training crops and inference chunks (embed_mode chunked)
    text_model_config: dict = field(default_factory=dict)  # filled in when saved, so loading needs no hub

    @property
    def embed_dim(self):
        return self.proj_dims[-1]

    @classmethod
    def from_dict(cls, d, source="config"):
        """config.json's dict -> HTCLConfig; unknown keys, top-level or inside "audio", are one ValueError."""
        d = dict(d)
        audio = d.pop("audio", {})
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        unknown += sorted(f"audio.{k}" for k in set(audio) - {f.name for f in fields(AudioConfig)})
        if unknown:
            raise ValueError(f"{source}: unknown HTCLConfig keys: {unknown}")
        audio = AudioConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in audio.items()})
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(audio=audio, **d)


# -----------------------------------------------------------------------------
# Audio encoder E_audio (Fig. 1b, left): conv stem -> Transformer -> mean pool.


class ConvStem(nn.Module):
    """Three 1-D convolutions over time (Sec. 3.1.3), each Conv -> LayerNorm -> GELU.

    (B, T, n_mels) -> (B, T', conv_channels), T' = token_lengths(T); 1251 -> 155.
    No padding, so output token i only sees input frames of the song itself as
    long as i < token_lengths(song length): that is what makes masking exact.
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.kernels, self.strides = cfg.conv_kernels, cfg.conv_strides
        c_in = cfg.n_mels
        self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
        for k, s in zip(cfg.conv_kernels, cfg.conv_strides):
            self.convs.append(nn.Conv1d(c_in, cfg.conv_channels, k, stride=s, bias=False))  # bias-free: LN follows
            self.norms.append(nn.LayerNorm(cfg.conv_channels))
            c_in = cfg.conv_channels

    def token_lengths(self, frame_lengths):
        """Frames -> tokens through the stem: L' = floor((L - k) / s) + 1 per conv."""
        n = frame_lengths
        for k, s in zip(self.kernels, self.strides):
            n = torch.div(n - k, s, rounding_mode="floor") + 1
        return n

    def forward(self, mel):
        x = mel.transpose(1, 2)  # (B, n_mels, T): Conv1d wants channels first
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)  # (B, C, T')
            x = F.gelu(norm(x.transpose(1, 2)).transpose(1, 2))  # LayerNorm over channels: (B, T', C) and back
        return x.transpose(1, 2)  # (B, T', C)


class ConvPositionalEmbedding(nn.Module):
    """wav2vec2-style relative position, as the released code builds it: a grouped,
    weight-normed conv -> LayerNorm(hidden) -> GELU, whose output is added to x.

    (B, T, D) -> (B, T, D). The kernel is odd, so 'same' padding keeps T.
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        conv = nn.Conv1d(cfg.hidden, cfg.hidden, cfg.pos_conv_kernel,
                         padding=cfg.pos_conv_kernel // 2, groups=cfg.pos_conv_groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.norm = nn.LayerNorm(cfg.hidden)  # released code: LayerNorm between the conv and the GELU

    def forward(self, x):
        return F.gelu(self.norm(self.conv(x.transpose(1, 2)).transpose(1, 2)))  # conv over (B, D, T), back to (B, T, D)


class TransformerLayer(nn.Module):
    """Post-LN Transformer layer with the parameter layout of nn.TransformerEncoderLayer
    (released code: post-LN, GELU, FFN 3072, dropout 0.1), written out so that the
    key-padding mask goes straight into F.scaled_dot_product_attention.

    x (B, T, D), attn_mask (B, 1, 1, T) bool, True = attend, or None (nothing padded) -> (B, T, D)
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        # Initialised as nn.MultiheadAttention does (released code), in its order of random draws:
        # out_proj gets nn.Linear's default init, then the in-projection is Xavier-uniform over the
        # whole (3D, D) matrix, and the in-projection and out_proj biases are zero.
        self.in_proj = nn.utils.skip_init(nn.Linear, cfg.hidden, 3 * cfg.hidden)  # no draw: set below
        self.out_proj = nn.Linear(cfg.hidden, cfg.hidden)
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)
        self.linear1 = nn.Linear(cfg.hidden, cfg.ffn)
        self.linear2 = nn.Linear(cfg.ffn, cfg.hidden)
        self.norm1 = nn.LayerNorm(cfg.hidden)
        self.norm2 = nn.LayerNorm(cfg.hidden)

    def attention(self, x, attn_mask):
        B, T, D = x.shape
        q, k, v = self.in_proj(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))  # heads back together: (B, T, D)

    def forward(self, x, attn_mask):
        x = self.norm1(x + F.dropout(self.attention(x, attn_mask), self.dropout, self.training))
        h = self.linear2(F.dropout(F.gelu(self.linear1(x)), self.dropout, self.training))
        return self.norm2(x + F.dropout(h, self.dropout, self.training))


class AudioEncoder(nn.Module):
    """E_audio (Fig. 1b, Sec. 3.1.3): log-mel of a whole song -> one 768-d vector.

    mel (B, T, n_mels), padding_mask (B, T) bool with True at padded frames (or None)
    -> (B, hidden). Paper default: 1251 frames -> 155 tokens + [CLS]; 88,500,511
    parameters, the released AudioModel(input_dim=128) module for module.

    Initialisation is the released code's (PyTorch defaults of the modules it uses):
    nn.TransformerEncoder deep-copies one layer, so all layers start identical; the
    attention is initialised as nn.MultiheadAttention's; [CLS] is torch.randn (std 1).
    Modules are built in the released order, so under the same seed the initial
    weights equal the released AudioModel's.

    NOTE(paper): the released code pools over every token, padded ones included,
    with no attention mask, so a song's embedding depends on how much silence it
    was padded with. Here padded tokens are masked in attention and in the mean,
    and zeroed before the positional conv, so a 30 s song gives the same embedding
    padded to 60 s or to 120 s. For a song of 1251 frames (120 s or longer), with
    no padding, the two designs give the same embedding.
    """

    def __init__(self, cfg: AudioConfig = None, pooling="mean"):
        super().__init__()
        cfg = cfg or AudioConfig()
        self.cfg = cfg
        if pooling not in ("mean", "cls"):
            raise ValueError(f"audio_pooling must be mean or cls, got {pooling!r}")
        self.pooling = pooling
        self.stem = ConvStem(cfg)
        self.feature_norm = nn.LayerNorm(cfg.conv_channels)
        self.feature_proj = nn.Linear(cfg.conv_channels, cfg.hidden)
        self.pos_conv = ConvPositionalEmbedding(cfg)
        self.pos_norm = nn.LayerNorm(cfg.hidden)
        layer = TransformerLayer(cfg)  # as nn.TransformerEncoder: one layer, deep-copied
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(cfg.layers))
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.hidden))  # released code: std 1

    def forward(self, mel, padding_mask=None):
        """padding_mask None: nothing is padded (120 s songs, 1251 frames each). Then no mask is built:
        SDPA gets attn_mask=None, which lets it choose its flash kernel, and the pool is a plain mean;
        an all-False mask gives the same embedding on the masked path (tests/test_fast_path.py)."""
        x = self.feature_proj(self.feature_norm(self.stem(mel)))  # (B, N, C) -> (B, N, D)
        B, N, _ = x.shape
        valid = attn_mask = None
        if padding_mask is not None:
            # A song shorter than the stem's receptive field (17 frames at the defaults)
            # still gets one token; data.py pads such songs with silence first.
            token_lengths = self.stem.token_lengths((~padding_mask).sum(1)).clamp(min=1)
            valid = torch.arange(N, device=mel.device)[None, :] < token_lengths[:, None]  # (B, N)
            # Zero the padded tokens so the positional conv sees the same zero padding at
            # a song's end whatever the batch's length is.
            x = x * valid[..., None]  # (B, N, D)
            valid = F.pad(valid, (1, 0), value=True)  # (B, 1 + N); [CLS] is always attended
            attn_mask = valid[:, None, None, :]  # (B, 1, 1, 1 + N), broadcast over heads and queries
        x = x + self.pos_conv(x)
        x = F.dropout(self.pos_norm(x), self.cfg.dropout, self.training)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + N, D)
        for layer in self.layers:
            if self.cfg.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)

        if self.pooling == "cls":  # CrossMuSim: the [CLS] output; the mask kept padding out of it
            return x[:, 0]  # (B, D)
        if valid is None:  # nothing padded: the mean over [CLS] and every token
            return x.mean(1)  # (B, D)
        # Mean over [CLS] and the song's tokens (released code: mean over all tokens).
        w = valid.to(x.dtype)[..., None]  # (B, 1 + N, 1)
        return (x * w).sum(1) / w.sum(1)  # (B, D)


# -----------------------------------------------------------------------------
# Text encoder E_text (Fig. 1b, right): any transformers checkpoint.


class TextEncoder(nn.Module):
    """E_text: a pretrained BERT (paper: bert-base-multilingual-uncased) -> one vector.

    tokens: the tokenizer's dict (input_ids (B, L), attention_mask (B, L), ...) -> (B, hidden).
    Pooling "auto" (text_models.auto_text_pooling, which says what it chose and why): a
    sentence-transformers checkpoint's own (its 1_Pooling config: mean or [CLS]), else pooler_output
    when the model has a pooler (paper), else [CLS]; pooler, cls or mean (over real tokens) on request.
    """

    def __init__(self, name_or_path, pretrained=True, pooling="auto", model_config=None,
                 gradient_checkpointing=False):
        super().__init__()
        from transformers import AutoConfig, AutoModel
        if model_config:  # loading an artifact: architecture from the saved config, weights from its safetensors
            self.model = AutoModel.from_config(AutoConfig.for_model(**model_config))
        elif pretrained:
            self.model = AutoModel.from_pretrained(name_or_path)
        else:
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(name_or_path))
        has_pooler = getattr(self.model, "pooler", None) is not None
        if pooling == "auto":  # a sentence-transformers checkpoint's own, else the paper's pooler, else [CLS]
            pooling, why = auto_text_pooling(name_or_path, has_pooler)
            print(f"text_pooling auto -> {pooling}: {why}")
        if pooling not in ("pooler", "cls", "mean"):
            raise ValueError(f"text_pooling must be auto, pooler, cls or mean, got {pooling!r}")
        if pooling == "pooler" and not has_pooler:
            raise ValueError(f"text_pooling='pooler' but {name_or_path} has no pooler; use cls or mean")
        self.pooling, self.hidden = pooling, self.model.config.hidden_size
        # transformers >= 5 keeps a ready 4-D mask as is; its own 2-D -> 4-D step for SDPA syncs with the device
        self.mask_4d = hasattr(self.model, "activation_checkpointing_enable") and self.model.config._attn_implementation == "sdpa"
        self.set_checkpointing(gradient_checkpointing)

    def set_checkpointing(self, on):
        """Activation (gradient) checkpointing of the transformers model: its own implementation,
        under its transformers-5 name where there is one (the 4.x name warns there)."""
        m, kw = self.model, {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5
            m.activation_checkpointing_enable(kw) if on else m.activation_checkpointing_disable()
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw) if on else m.gradient_checkpointing_disable()

    @property
    def checkpointing(self):
        m = self.model
        return m.is_activation_checkpointing if hasattr(m, "activation_checkpointing_enable") else m.is_gradient_checkpointing

    def forward(self, tokens):
        """tokens -> (B, H). On CPU a batch of ragged texts (a few lyrics among short titles) runs as two
        groups of similar length, each padded to its own longest: each row's output is the same (the
        mask makes padding exact), and the padded compute, most of a CPU step, is not spent.
        Not on a GPU (it would wait for the lengths) nor under torch.compile (static shapes)."""
        mask = tokens.get("attention_mask")  # (B, L); None: no token padded (the model then builds no mask)
        if mask is not None and mask.device.type == "cpu" and not torch.compiler.is_compiling():
            groups = length_groups(mask)
            if groups is not None:
                outs = [self._forward({k: v[idx, :n] for k, v in tokens.items()}) for idx, n in groups]
                order = torch.cat([idx for idx, _ in groups])  # (B,): batch row of each output row
                return torch.cat(outs)[torch.argsort(order)]  # (B, H), back in batch order
        return self._forward(tokens)

    def _forward(self, tokens):
        mask = tokens.get("attention_mask")
        if mask is not None and self.mask_4d:
            tokens = {**tokens, "attention_mask": mask.bool()[:, None, None, :]}  # (B, 1, 1, L), True = attend
        out = self.model(**tokens)
        if self.pooling == "pooler":
            return out.pooler_output  # (B, H)
        h = out.last_hidden_state  # (B, L, H)
        if self.pooling == "cls":
            return h[:, 0]  # (B, H)
        if mask is None:
            return h.mean(1)  # (B, H)
        m = mask.to(h.dtype)[..., None]  # (B, L, 1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H)


def length_groups(mask, min_saving=0.3):
    """A right-padded attention mask (B, L) -> [(rows, length)] for two groups of rows, the shorter
    texts and the longer ones, split where the padded tokens are fewest; None when the split saves
    less than min_saving of the tokens, or the padding is not on the right (then no trimming is exact)."""
    lengths = mask.sum(1)  # (B,)
    B, L = mask.shape
    if B < 2 or not torch.equal(mask.cumprod(1).sum(1), lengths):  # ones not a prefix: left padding
        return None
    sorted_len, order = torch.sort(lengths, stable=True)
    k = torch.arange(1, B, device=mask.device)  # the first k sorted rows form the short group
    cost = k * sorted_len[k - 1] + (B - k) * sorted_len[-1]  # tokens computed with the split at k
    best = int(torch.argmin(cost))
    if cost[best] > (1 - min_saving) * B * L:
        return None
    k = best + 1
    return [(order[:k], max(1, int(sorted_len[k - 1]))), (order[k:], int(sorted_len[-1]))]


# -----------------------------------------------------------------------------
# Projection and fusion heads (released code).


def mlp(dims):
    """Linear layers through `dims` with ReLU between them (none after the last)."""
    layers = [nn.Linear(dims[0], dims[1])]
    for a, b in zip(dims[1:-1], dims[2:]):
        layers += [nn.ReLU(), nn.Linear(a, b)]
    return nn.Sequential(*layers)  # Linear layers at indices 0, 2, 4, ...


# -----------------------------------------------------------------------------
# The symmetric InfoNCE (Eq. 2-4), shared by both stages.


def gather_with_grad(x):
    """Concatenate x from every process, keeping the autograd graph.

    (B_local, D) -> (world * B_local, D). The backward pass sums each rank's
    gradient into its own slot (torch.distributed.nn's all_gather), so with DDP's
    gradient averaging the result equals the single-process gradient on the global batch
    (tests/test_model.py::test_infonce_over_two_processes_matches_one_process_on_the_whole_batch).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)  # (world * B_local, D)


def info_nce(queries, keys, labels, scale):
    """One direction of the symmetric InfoNCE (Eq. 2-4), audio -> text or text -> audio: CE(S), S = scale * cos.

    queries (B_local, D), keys (B_global, D), both L2-normalized; labels (B_local,): the key of each
    query's pair; scale: exp(logit_scale) = 1 / tau -> scalar."""
    logits = scale * queries @ keys.T  # (B_local, B_global)
    # cross_entropy works on log-softmax, so large logits cannot overflow.
    return F.cross_entropy(logits, labels)


def contrastive_loss(x, y, logit_scale, gather=True):
    """Symmetric InfoNCE, Eq. 2-4: 0.5 * CE(S) + 0.5 * CE(S^T), S = exp(logit_scale) * cos(x, y).

    x, y: (B, D) paired embeddings (row i of x goes with row i of y); logit_scale: scalar.
    Returns a scalar; ln(B_global) when every embedding is equal (chance level).

    Under several processes each rank scores its own rows against the embeddings
    of every rank ("local loss" form of open_clip): negatives come from the whole
    global batch at B_local x B_global cost. The mean over ranks is the global loss,
    and under DDP's gradient averaging its gradient is the single-process one.
    NOTE(paper): the released code gathers under no_grad and puts its local slot
    back, then every rank computes the whole B_global x B_global loss. Each rank's
    gradient then reaches only its own rows, so after DDP's averaging the encoders
    get the full gradient scaled by 1/world_size, while the logit scale (which every
    rank differentiates in full) gets it unscaled (tests/test_model.py::
    test_released_no_grad_gather_scales_the_embedding_gradient_by_one_over_world).
    With Adam, which normalises each parameter's step, that scale is nearly harmless.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 in -> fp32 loss; fp64 stays fp64
    x, y = F.normalize(x.to(dtype), dim=-1), F.normalize(y.to(dtype), dim=-1)
    all_x, all_y = (gather_with_grad(x), gather_with_grad(y)) if gather else (x, y)  # (B_global, D)
    offset = dist.get_rank() * x.shape[0] if all_x.shape[0] != x.shape[0] else 0
    labels = torch.arange(x.shape[0], device=x.device) + offset  # this rank's rows in the global batch
    scale = logit_scale.to(dtype).exp()
    return 0.5 * (info_nce(x, all_y, labels, scale) + info_nce(y, all_x, labels, scale))


def stage2_total(parts, weights):
    """Eq. 5: L = w_aa * L_aa + w_af * L_af + w_at * L_at (paper: weights 1). parts {"aa", "af", "at"}
    -> scalars, weights (w_aa, w_af, w_at) -> scalar; without text (HTCL_w/o_text) only w_aa * L_aa."""
    w_aa, w_af, w_at = weights
    loss = w_aa * parts["aa"]
    if "af" in parts:
        loss = loss + w_af * parts["af"] + w_at * parts["at"]
    return loss


# -----------------------------------------------------------------------------
# HTCL (Fig. 1b): both towers, both heads, the fusion layer, the stage losses.


class HTCL(nn.Module):
    """The full model of Fig. 1b.

    encode_audio: mel (B, T, 128), padding_mask (B, T) -> audio_emb (B, 100)
    encode_text:  tokens {input_ids (B, L), attention_mask (B, L)} -> text_emb (B, 100)
    fuse:         audio_emb (B, 100), text_emb (B, 100) -> fused_emb (B, 100)
    stage1_loss:  L_at (Sec. 2.1)
    stage2_loss:  w_aa * L_aa + w_af * L_af + w_at * L_at (Sec. 2.2, Eq. 5: stage2_total)

    Each loss has its own learnable temperature, kept as a log logit scale in
    self.logit_scale[name] for name in ("at", "aa", "af"); with cfg.learn_temperature = False
    (the CrossMuSim variant's fixed tau = 0.07) they stay at cfg.logit_scale_init.
    """

    LOSSES = ("at", "aa", "af")

    def __init__(self, cfg: HTCLConfig, text=True):
        super().__init__()
        self.cfg = cfg
        self.audio_encoder = AudioEncoder(cfg.audio, cfg.audio_pooling)
        if text:
            self.text_encoder = TextEncoder(cfg.text_model, cfg.text_pretrained, cfg.text_pooling,
                                            cfg.text_model_config, cfg.text_gradient_checkpointing)
            cfg.text_model_config = self.text_encoder.model.config.to_dict()  # so an artifact rebuilds offline
            cfg.text_pooling = self.text_encoder.pooling  # "auto" resolved once: the artifact keeps the choice
            text_hidden = self.text_encoder.hidden
        else:  # audio embeddings only (load_artifact(..., text=False)): no BERT, no transformers import
            if not (cfg.text_model_config or {}).get("hidden_size"):
                raise ValueError("HTCL(cfg, text=False) needs cfg.text_model_config (an artifact's config.json)")
            self.text_encoder, text_hidden = None, cfg.text_model_config["hidden_size"]
        self.audio_proj = mlp((cfg.audio.hidden, *cfg.proj_dims))
        self.text_proj = mlp((text_hidden, *cfg.proj_dims))
        self.fusion = mlp((2 * cfg.embed_dim, *cfg.fusion_dims))
        self.logit_scale = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor(cfg.logit_scale_init), requires_grad=cfg.learn_temperature)
             for name in self.LOSSES})
        if cfg.embed_mode not in ("full", "chunked"):
            raise ValueError(f"embed_mode must be full or chunked, got {cfg.embed_mode!r}")

    def encode_audio(self, mel, padding_mask=None, normalize=True):
        z = self.audio_proj(self.audio_encoder(mel, padding_mask))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens, normalize=True):
        if self.text_encoder is None:
            raise RuntimeError("this HTCL was loaded for audio only (load_artifact(..., text=False))")
        z = self.text_proj(self.text_encoder(tokens))
        return F.normalize(z, dim=-1) if normalize else z

    def fuse(self, audio_emb, text_emb, normalize=True):
        """z_f = Fusion([z_a; z_t]) (Sec. 2.2); inputs are the un-normalized projections."""
        z = self.fusion(torch.cat([audio_emb, text_emb], dim=-1))  # (B, 2D) -> (B, D)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, batch, stage=1, **stage2_kw):
        """(loss, parts) of one stage. Training goes through forward() so DDP syncs gradients."""
        return self.stage1_loss(batch) if stage == 1 else self.stage2_loss(batch, **stage2_kw)

    def freeze_unused(self, stage, use_text=True):
        """Turn off gradients of what a stage's loss never touches, so DDP finds no unused
        parameter and the optimizer holds no dead state: the fusion MLP and the aa/af
        temperatures in stage 1, the whole text side in HTCL_w/o_text, and a text pooler
        that the chosen pooling skips."""
        unused = []
        if stage == 1:
            unused = ["fusion.", "logit_scale.aa", "logit_scale.af"]
        elif not use_text:
            unused = ["text_encoder.", "text_proj.", "fusion.", "logit_scale.at", "logit_scale.af"]
        if self.text_encoder.pooling != "pooler":
            unused.append("text_encoder.model.pooler.")
        if not self.cfg.learn_temperature:  # a fixed tau (CrossMuSim) is a constant: no gradient, no optimizer state
            unused.append("logit_scale.")
        for name, p in self.named_parameters():
            p.requires_grad_(not any(name.startswith(u) for u in unused))

    def set_gradient_checkpointing(self, audio, text):
        """Recompute each Transformer layer's activations in backward instead of storing them.
        A memory knob of a run, not of the model (bench.py on an H200: a paper-size step at batch 100
        in bf16, 29 GB -> 8 GB for 0.76x speed); kept in cfg so that the artifact records what was used."""
        self.cfg.audio.gradient_checkpointing = audio  # AudioEncoder reads this same cfg object
        self.cfg.text_gradient_checkpointing = text
        self.text_encoder.set_checkpointing(text)

    @torch.no_grad()
    def reset_heads(self, seed):
        """Start stage 2 as the released train_stage2.py does: keep the two encoders, build the
        projection heads and the fusion MLP afresh (nn.Linear's default init) and set every
        temperature back to logit_scale_init. Seeded, on its own random stream: the same seed
        gives the same heads, and the global generator is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for head in (self.audio_proj, self.text_proj, self.fusion):
                for m in head:
                    if isinstance(m, nn.Linear):
                        m.reset_parameters()
        for p in self.logit_scale.values():
            p.fill_(self.cfg.logit_scale_init)

    @torch.no_grad()
    def clamp_logit_scales(self):
        """Call after every optimizer step: temperature stays >= 1/100 (CLIP)."""
        for p in self.logit_scale.values():
            p.clamp_(max=self.cfg.logit_scale_max)

    def stage1_loss(self, batch):
        """Stage 1 (Sec. 2.1): L_at between a song's audio and its text."""
        audio_emb = self.encode_audio(batch["mel"], batch["padding_mask"], normalize=False)
        text_emb = self.encode_text(batch["tokens"], normalize=False)
        loss = contrastive_loss(audio_emb, text_emb, self.logit_scale["at"])
        return loss, {"at": loss.detach()}

    def stage2_loss(self, batch, weights=(1.0, 1.0, 1.0), use_text=True, use_trigger_text=False):
        """Stage 2 (Sec. 2.2, Eq. 5) on <trigger audio, rec audio, rec text> triplets.

        L_aa ties the trigger's audio to the recommended song's audio, L_af the
        trigger's audio to the recommended song's fused embedding, L_at the
        recommended song's audio to its text. use_text=False is HTCL_w/o_text
        (L_aa only). use_trigger_text=True is the released code's variant: L_at
        over both songs and L_af in both directions, at the cost of the trigger's text.
        """
        # One audio pass over both songs of each pair: pad to a common length. A mask of None: nothing padded.
        mels, masks = (batch["trig_mel"], batch["rec_mel"]), (batch["trig_padding_mask"], batch["rec_padding_mask"])
        B, T = mels[0].shape[0], max(m.shape[1] for m in mels)
        mel = torch.cat([F.pad(m, (0, 0, 0, T - m.shape[1])) for m in mels])  # (2B, T, M)
        mask = None if all(k is None and m.shape[1] == T for m, k in zip(mels, masks)) else torch.cat([
            F.pad(m.new_zeros(m.shape[:2], dtype=torch.bool) if k is None else k, (0, T - m.shape[1]), value=True)
            for m, k in zip(mels, masks)])  # (2B, T), True at padded frames
        audio_emb = self.encode_audio(mel, mask, normalize=False)  # (2B, D)
        trig_audio, rec_audio = audio_emb[:B], audio_emb[B:]  # (B, D) each

        parts = {"aa": contrastive_loss(trig_audio, rec_audio, self.logit_scale["aa"])}
        if use_text:
            rec_text = self.encode_text(batch["rec_tokens"], normalize=False)
            rec_fused = self.fuse(rec_audio, rec_text, normalize=False)
            if use_trigger_text:
                trig_text = self.encode_text(batch["trig_tokens"], normalize=False)
                trig_fused = self.fuse(trig_audio, trig_text, normalize=False)
                parts["af"] = 0.5 * (contrastive_loss(trig_audio, rec_fused, self.logit_scale["af"])
                                     + contrastive_loss(rec_audio, trig_fused, self.logit_scale["af"]))
                parts["at"] = contrastive_loss(audio_emb, torch.cat([trig_text, rec_text]), self.logit_scale["at"])  # 2B rows
            else:
                parts["af"] = contrastive_loss(trig_audio, rec_fused, self.logit_scale["af"])
                parts["at"] = contrastive_loss(rec_audio, rec_text, self.logit_scale["at"])
        return stage2_total(parts, weights), {k: v.detach() for k, v in parts.items()}


# -----------------------------------------------------------------------------
# Stage hand-off: one folder = config.json + model.safetensors + the tokenizer.


def clean_state_dict(state_dict):
    """Drop wrapper prefixes (DDP's module., torch.compile's _orig_mod.) and make tensors savable."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.replace(prefix, "")
        out[k] = v.detach().cpu().contiguous()
    return out


def save_artifact(model, tokenizer, folder, extra=None):
    """Write `folder`/{config.json, model.safetensors, tokenizer files}; `extra` goes into config.json too."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    config = asdict(model.cfg)
    if extra:
        config["training"] = extra
    tmp = os.path.join(folder, "model.safetensors.tmp")
    save_file(clean_state_dict(model.state_dict()), tmp)
    os.replace(tmp, os.path.join(folder, "model.safetensors"))  # a crash never leaves half a file
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tokenizer.save_pretrained(folder)


def load_artifact(folder, device="cpu", text=True):
    """Inverse of save_artifact -> (HTCL in eval mode, tokenizer). Needs no hub access.
    text=False: audio embeddings only -> (HTCL without its text tower, None); the BERT weights are
    not read and no BERT is built or imported (seconds of start-up, and BERT's memory, saved)."""
    from safetensors import safe_open
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} is not an HTCL artifact: no config.json (expected the final/ "
                                f"folder written by pretrain.py or finetune.py)")
    with open(path) as f:
        config = json.load(f)
    config.pop("training", None)
    model = HTCL(HTCLConfig.from_dict(config, source=path), text=text)
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:  # no pickle, no code
        state = {k: f.get_tensor(k) for k in f.keys() if text or not k.startswith("text_encoder.")}
    # Strict, and checked here: a missing or renamed key would otherwise keep its random init
    # without a word, and a config.json that disagrees with the weights would be torch's
    # size-mismatch traceback instead of one line naming the folder and the parameter.
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or wrong:
        what = [f"parameter {k} has shape {tuple(state[k].shape)} in model.safetensors but "
                f"{tuple(expected[k].shape)} by config.json" for k in wrong[:1]]
        what += [f"config.json expects parameter {k}, missing from model.safetensors" for k in missing[:1]]
        what += [f"model.safetensors holds unexpected parameter {k}, which config.json does not build"
                 for k in extra[:1]]
        raise ValueError(f"{folder}: config.json disagrees with model.safetensors ({len(wrong)} shape, "
                         f"{len(missing)} missing, {len(extra)} unexpected parameters): {'; '.join(what)}")
    model.load_state_dict(state, strict=True)
    tokenizer = None
    if text:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer


if __name__ == "__main__":  # the paper default's size: 88,500,511 parameters, 1251 frames -> 155 tokens + [CLS]
    enc = AudioEncoder()
    print(f"AudioEncoder (paper default): {sum(p.numel() for p in enc.parameters()):,} parameters")
    print("1251 frames ->", int(enc.stem.token_lengths(torch.tensor(1251))), "tokens (+ [CLS])")
