"""Tests of model.py (HTCL Sec. 2, Fig. 1b): the text tower's length groups on CPU.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_model.py
"""
import os

import pytest
import torch
from transformers import AutoTokenizer

import model as htcl

TINY_BERT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample_data", "tiny-bert")
TEXTS = ["a", "short title", "lyrics " * 40, "b c", "another song title here", "la " * 25]


def _tokens(padding_side="right"):
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
