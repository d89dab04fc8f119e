"""The distribution verification accepts against is the one the sampler draws from."""
import pytest
import torch

from paraserve.layers.sampler import Sampler, SamplingMetadata, SamplingRow
from paraserve.sampling_params import SamplingParams
from paraserve.spec_decode.speculator import Speculator, target_probs

V = 12


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=4),
    SamplingParams(temperature=0.9, top_p=0.6),
    SamplingParams(temperature=1.0, top_k=6, top_p=0.8, min_p=0.1),
    SamplingParams(temperature=0.5, logit_bias={3: 2.0, 5: -1.0}),
], ids=["temperature", "top_k", "top_p", "top_k_top_p_min_p", "logit_bias"])
def test_target_probs_is_what_the_sampler_draws_from(params):
    from paraserve.layers.sampler import process_logits

    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0)) * 2
    n = 20000
    rows = [SamplingRow(params, [], [])] * n
    meta = SamplingMetadata.build(rows, V, torch.device("cpu"))
    torch.manual_seed(0)
    draws = Sampler()(logits.expand(n, V).contiguous(), meta).sampled_token_ids
    freq = torch.bincount(draws, minlength=V).float() / n
    one = SamplingMetadata.build(rows[:1], V, torch.device("cpu"))
    p = target_probs(process_logits(logits.float().clone(), one), one)[0]
    assert torch.allclose(p.sum(), torch.tensor(1.0))
    assert (freq[p == 0] == 0).all()  # what top-k/top-p/min-p cut is never drawn
    assert (freq - p).abs().max() < 0.015  # ~4 standard errors at n = 20000


def test_requests_that_depend_on_their_path_are_not_drafted():
    ok = SamplingParams(temperature=0.8)
    assert Speculator.eligible(ok, 0)
    assert not Speculator.eligible(SamplingParams(speculative=False), 5)
    assert not Speculator.eligible(SamplingParams(repetition_penalty=1.1), 5)
    assert not Speculator.eligible(SamplingParams(presence_penalty=0.5), 5)
    assert not Speculator.eligible(SamplingParams(frequency_penalty=0.5), 5)
    assert not Speculator.eligible(SamplingParams(min_tokens=4, max_tokens=8), 3)
    assert Speculator.eligible(SamplingParams(min_tokens=4, max_tokens=8), 4)
