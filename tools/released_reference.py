"""The released code's audio encoder (models/audio_model.py's AudioModel, Fig. 1b E_audio), written anew.

Written the straightforward way, in the released module layout and key names, so that a released
checkpoint's `audio_model.*` tensors load into it as they are: conv stem (Conv -> LayerNorm -> GELU),
LayerNorm + Linear to the hidden size, positional conv (weight-normed grouped conv -> LayerNorm ->
GELU) added, LayerNorm, dropout, [CLS] prepended, nn.TransformerEncoder (post-LN, GELU, batch_first)
with no mask on songs padded to 1251 frames, then the wrapper's mean over all tokens. Built in the
released order of random draws, so under one seed it starts from the weights model.AudioEncoder does.

It is the independent reference that model.py is checked against, not a model to train:
tests/test_convert_released.py converts a checkpoint of it with tools/convert_released.py and
compares embeddings, and bench.py times it against model.AudioEncoder (`python bench.py --rows step`).
"""
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `import data`
from data import MAX_FRAMES  # noqa: E402  (1251: 120 s of log-mel frames)


class _Transpose(nn.Module):  # (B, T, C) <-> (B, C, T); parameter-free, as the released Rearrange
    def forward(self, x):
        return x.transpose(1, 2)


class _FeatureProjection(nn.Module):
    def __init__(self, c_in, hidden):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c_in)
        self.projection = nn.Linear(c_in, hidden)

    def forward(self, x):
        return self.projection(self.layer_norm(x))


class _PositionalConv(nn.Module):
    def __init__(self, hidden, kernel, groups):
        super().__init__()
        conv = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=groups)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.layer_norm = nn.LayerNorm(hidden)

    def forward(self, x):
        return F.gelu(self.layer_norm(self.conv(x.transpose(1, 2)).transpose(1, 2)))


class ReferenceAudioEncoder(nn.Module):
    """The released AudioModel, module for module: mel (B, T, n_mels), padding_mask ignored -> (B, hidden).

    Every song is padded to 1251 frames and pooled over every token, padded ones included; so it
    equals model.AudioEncoder only on songs of 1251 frames or more (the released input). Takes a
    model.AudioConfig; pos_layer_norm=False drops the positional conv's LayerNorm (to time what it costs).
    """

    def __init__(self, cfg, pos_layer_norm=True):
        super().__init__()
        self.cfg = cfg
        c_in, layers = cfg.n_mels, []
        for k, s in zip(cfg.conv_kernels, cfg.conv_strides):
            layers.append(nn.Sequential(_Transpose(), nn.Conv1d(c_in, cfg.conv_channels, k, stride=s, bias=False),
                                        _Transpose(), nn.LayerNorm(cfg.conv_channels), nn.GELU()))
            c_in = cfg.conv_channels
        self.feature_extractor = nn.Module()
        self.feature_extractor.layers = nn.ModuleList(layers)
        self.feature_projection = _FeatureProjection(cfg.conv_channels, cfg.hidden)
        self.pos_conv_embed = _PositionalConv(cfg.hidden, cfg.pos_conv_kernel, cfg.pos_conv_groups)
        if not pos_layer_norm:  # only to measure what the LayerNorm costs (bench rows *_posln_ab)
            self.pos_conv_embed.layer_norm = nn.Identity()
        self.layer_norm = nn.LayerNorm(cfg.hidden)
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, cfg.ffn, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=False)
        self.transformer_encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.hidden))

    def forward(self, mel, padding_mask=None):  # the mask is ignored, as in the released code
        x = F.pad(mel, (0, 0, 0, max(0, MAX_FRAMES - mel.shape[1])))  # (B, 1251, n_mels)
        for layer in self.feature_extractor.layers:
            x = layer(x)  # (B, T', C)
        x = self.feature_projection(x)  # (B, T', D)
        x = F.dropout(self.layer_norm(x + self.pos_conv_embed(x)), self.cfg.dropout, self.training)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + T', D)
        return self.transformer_encoder(x).mean(1)  # the wrapper's mean over every token
