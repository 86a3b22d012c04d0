import math
from types import SimpleNamespace

import pytest
import torch
from tiny import FAMILIES, VOCAB, tiny_model
from torch import nn

from offsite.evaluation.perplexity import perplexity
from offsite.training.data import IGNORE_INDEX, Example, TokenData

V = 4


class FixedModel(nn.Module):
    """Logits: 0 everywhere, plus `boost` on the token after the current one (id + 1 mod V)."""

    def __init__(self, boost: float) -> None:
        super().__init__()
        self.boost = boost
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, V)
        logits.scatter_(-1, ((input_ids + 1) % V).unsqueeze(-1), self.boost)
        return SimpleNamespace(logits=logits)


def _data(rows):
    return TokenData([Example(ids, labels) for ids, labels in rows], "mem", "0", "packed")


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    result = perplexity(FixedModel(0.0), _data([([0, 1, 2, 3, 0], [0, 1, 2, 3, 0])]))
    assert math.isclose(result["perplexity"], V, rel_tol=1e-6) and result["tokens"] == 4


def test_known_sequence_perplexity_is_hand_computed():
    # next token is always id+1: it gets logit log(3) against three zeros -> p = 3/6 = 0.5 -> ppl 2
    right = ([0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1])
    # here the second target (3 after 1) is wrong: p = 1/6 for that token
    wrong = ([0, 1, 3], [0, 1, 3])
    result = perplexity(FixedModel(math.log(3.0)), _data([right, wrong]), batch_size=2)
    expected = math.exp((6 * -math.log(0.5) + -math.log(1 / 6)) / 7)
    assert result["tokens"] == 7 and math.isclose(result["perplexity"], expected, rel_tol=1e-6)


def test_ignored_labels_are_not_counted():
    result = perplexity(
        FixedModel(math.log(3.0)), _data([([0, 1, 3, 0], [IGNORE_INDEX, IGNORE_INDEX, 3, 0])])
    )
    assert result["tokens"] == 2  # target 3 (wrong, p=1/6) and target 0 (right, p=1/2)
    assert math.isclose(
        result["perplexity"], math.exp((-math.log(1 / 6) - math.log(0.5)) / 2), rel_tol=1e-6
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_in_chunks_equals_perplexity_whole(family):
    # the head applied a few positions at a time (the default) scores exactly what whole logits do
    g = torch.Generator().manual_seed(0)
    rows = [(ids, ids) for ids in torch.randint(0, VOCAB, (3, 9), generator=g).tolist()]
    rows.append((rows[0][0][:5], [IGNORE_INDEX] * 2 + rows[0][0][2:5]))  # padded, partly unlabelled
    model = tiny_model(family)
    whole = perplexity(model, _data(rows), batch_size=4, chunk_tokens=0)
    chunked = perplexity(model, _data(rows), batch_size=4, chunk_tokens=5)
    assert chunked["tokens"] == whole["tokens"]
    assert math.isclose(chunked["perplexity"], whole["perplexity"], rel_tol=1e-5)
