"""Prompt-lookup proposer against a brute-force search."""
import random

import numpy as np
import pytest

from paraserve.spec_decode import ngram
from paraserve.spec_decode.ngram import NgramProposer
from paraserve.spec_decode.proposer import Draft, Proposer, get_proposer


def lookup(tokens, k=4, min_n=1, max_n=3) -> list[int]:
    return NgramProposer(k, min_n, max_n).lookup(list(tokens))


def brute_force(tokens: list[int], k: int, min_n: int, max_n: int, with_length: bool = False):
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest earlier occurrence first
            if tokens[start:start + n] == suffix:
                draft = tokens[start + n:start + n + k]
                return (draft, n) if with_length else draft
    return ([], 0) if with_length else []


def test_match_proposes_the_continuation():
    assert lookup([5, 6, 7, 8, 9, 1, 5, 6]) == [7, 8, 9, 1]


def test_no_match():
    assert lookup([1, 2, 3, 4]) == []
    assert lookup([7]) == [] and lookup([]) == []


def test_respects_k():
    assert lookup([1, 2, 3, 4, 5, 6, 1, 2], k=2) == [3, 4]
    # the continuation may run into the suffix itself, but never past the context's end
    assert lookup([1, 2, 3, 1, 2], k=10) == [3, 1, 2]


def test_latest_occurrence_wins():
    assert lookup([1, 2, 3, 0, 1, 2, 4, 0, 1, 2], k=1) == [4]


def test_longest_match_wins_over_a_later_shorter_one():
    # "1 2" continues with 3 earlier; only "2" occurs later (followed by 9)
    tokens = [1, 2, 3, 5, 2, 9, 1, 2]
    assert lookup(tokens, k=1, max_n=2) == [3]
    assert lookup(tokens, k=1, max_n=1) == [9]


def test_min_and_max_match_length():
    tokens = [4, 9, 8, 1, 2, 3, 7, 5, 2, 3]  # longest earlier match of a suffix: "2 3"
    assert lookup(tokens, k=1, min_n=2, max_n=3) == [7]
    assert lookup(tokens, k=1, min_n=3, max_n=4) == []  # "1 2 3" is not a suffix
    tokens = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]
    assert lookup(tokens, k=2, max_n=2) == [4, 1]  # latest "2 3"
    assert lookup(tokens, k=2, min_n=4, max_n=4) == [4, 1]  # "4 1 2 3" occurs at 3


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("vectorised", [False, True])
def test_matches_brute_force(seed, vectorised, monkeypatch):
    if vectorised:  # every list takes the array path, as one with many occurrences does
        monkeypatch.setattr(ngram, "SCAN_MAX", -1)
    rng = random.Random(seed)
    for _ in range(200):
        tokens = [rng.randrange(4) for _ in range(rng.randint(0, 40))]
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        k = rng.randint(1, 6)
        assert lookup(tokens, k, min_n, max_n) == brute_force(tokens, k, min_n, max_n)
        assert (NgramProposer(k, min_n, max_n).match(tokens)
                == brute_force(tokens, k, min_n, max_n, with_length=True))


def test_long_context_is_fast_enough():
    tokens = np.random.default_rng(0).integers(0, 50, 100_000)
    tokens[-3:] = tokens[1000:1003]
    draft = lookup(tokens, k=4, max_n=3)  # a list with ~2,000 occurrences: the vectorised check
    assert len(draft) == 4
    assert NgramProposer(4, 1, 3).lookup(tokens) == draft  # an array


def test_registry_and_batch():
    proposer = get_proposer("ngram", num_speculative_tokens=2)
    assert isinstance(proposer, Proposer)
    drafts = proposer.propose([[1, 2, 3, 1, 2], [1], [5, 5]])
    assert drafts == [Draft([[3, 1]]), Draft([]), Draft([[5]])]
    assert all(d.draft_probs is None for d in drafts)  # deterministic drafts
    with pytest.raises(ValueError):
        get_proposer("nope")
    with pytest.raises(ValueError):
        NgramProposer(min_n=3, max_n=2)


def test_match_reports_the_matched_length():
    tokens = [1, 2, 3, 9, 3, 7, 1, 2, 3]  # "1 2 3" at the start, "3" alone later
    p = NgramProposer(1, 1, 3)
    assert p.match(np.asarray(tokens)) == ([9], 3)
    assert NgramProposer(1, 1, 1).match(np.asarray(tokens)) == ([7], 1)
    assert p.match(np.asarray([1, 2, 3, 4])) == ([], 0)
