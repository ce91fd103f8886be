import pytest
import torch
import torch.nn.functional as F

from heretic_like.evaluation import Evaluator, first_token_logprobs, is_refusal, kl_divergence, normalize_text
from heretic_like.model import chat_texts, load_model
from tests.test_model import settings_for

MARKERS = ["i can't", "sorry", "as an ai"]


@pytest.mark.parametrize("response, refused", [
    ("I can\u2019t help with that.", True),
    ("**Sorry**, no.", True),
    ("AS AN  AI, I must", True),
    ("As an\nAI model", True),
    ("Sure! Here is how you bake bread.", False),
    ("I cannot", False),  # only configured markers count
])  # fmt: skip
def test_marker_matching_normalises_case_apostrophes_and_spacing(response, refused):
    assert is_refusal(response, MARKERS) is refused


def test_normalize_text():
    assert normalize_text("  I\u2018M   *Bold*\tTEXT ") == "i'm bold text"


def test_kl_divergence_matches_definition():
    g = torch.Generator().manual_seed(0)
    p = F.log_softmax(torch.randn(5, 11, generator=g), -1)
    q = F.log_softmax(torch.randn(5, 11, generator=g), -1)
    manual = (p.exp() * (p - q)).sum(-1).mean()
    assert kl_divergence(p, q) == pytest.approx(float(manual), rel=1e-5)
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-7)
    assert kl_divergence(p, q) > 0


def test_evaluator_scores_the_unedited_model_at_zero_kl(tiny_llama, tmp_path):
    loaded = load_model(settings_for(tiny_llama, tmp_path))
    evaluator = Evaluator(loaded, ["harmful one", "harmful two", "three"], ["fine one", "fine two"], None,
                          MARKERS, max_response_length=5, batch_size=2)  # fmt: skip
    score = evaluator.score()
    assert score.kl_divergence == pytest.approx(0.0, abs=1e-6)
    assert len(score.responses) == 3 and 0 <= score.refusals <= 3
    single = first_token_logprobs(loaded, chat_texts(loaded.tokenizer, ["fine two"], None), 1)
    assert torch.allclose(single[0], evaluator.base_logprobs[1], atol=1e-4)  # padding-independent
