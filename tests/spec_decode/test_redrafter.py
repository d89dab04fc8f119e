"""ReDrafter: the recurrence, beam search against a slow reference, files, the proposer, and
self-distillation end to end on a tiny model whose greedy continuation is predictable."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paraserve.spec_decode.proposer import get_proposer
from paraserve.spec_decode.redrafter import (DrafterMismatchError, ReDrafter, ReDrafterConfig,
                                             ReDrafterProposer, beam_search, load_drafter,
                                             save_drafter)
from paraserve.spec_decode.tree import DraftTree

V, H = 40, 16


def make_drafter(seed: int = 0, draft_vocab: int = None, project: bool = True, **kw) -> ReDrafter:
    torch.manual_seed(seed)
    config = ReDrafterConfig("base", V, H, project=project, draft_vocab_size=draft_vocab, **kw)
    token_ids = None if draft_vocab is None else torch.randperm(V)[:draft_vocab].sort().values
    drafter = ReDrafter(config, token_ids)
    with torch.no_grad():  # blocks start as the identity; make them do something
        for p in drafter.parameters():
            p.normal_(0, 0.5)
    return drafter.eval()


def make_embed(seed: int = 1) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(V, H).requires_grad_(False)


def test_recurrence_and_teacher_forced_shapes():
    drafter, embed = make_drafter(), make_embed()
    h = torch.randn(5, H)
    tokens = torch.randint(0, V, (5, 3))
    with torch.no_grad():
        logits = drafter(h, tokens, embed)
        assert logits.shape == (5, 3, V)
        silu = F.silu
        s1 = silu(drafter.rnn_w(embed(tokens[:, 0])))  # s_0 = 0: U s_0 vanishes
        s2 = silu(drafter.rnn_w(embed(tokens[:, 1])) + drafter.rnn_u(s1))
        s3 = silu(drafter.rnn_w(embed(tokens[:, 2])) + drafter.rnn_u(s2))
        for k, s in enumerate([s1, s2, s3]):  # h is the same at every step
            x = drafter.proj(torch.cat([h, s], -1))
            for blk in drafter.blocks:
                x = x + silu(blk.linear(x))
            torch.testing.assert_close(logits[:, k], drafter.lm_head(x))


def test_no_projection_head_runs_at_twice_hidden():
    drafter = make_drafter(project=False, num_blocks=1)
    assert drafter.proj is None and drafter.blocks[0].linear.in_features == 2 * H
    with torch.no_grad():
        assert drafter(torch.randn(2, H), torch.zeros(2, 2, dtype=torch.long), make_embed()).shape == (2, 2, V)


def test_fresh_blocks_are_identity():
    block = ReDrafter(ReDrafterConfig("base", V, H)).blocks[0]
    x = torch.randn(3, H)
    torch.testing.assert_close(block(x), x)


def reference_beam_search(drafter, h, last, embed, W, L):
    """One request at a time, beams as Python lists, every candidate enumerated."""
    out_tokens, out_lp = [], []
    for b in range(h.shape[0]):
        beams = [([], [], torch.zeros(1, H), int(last[b]))]  # tokens, logprobs, state, prev
        for _ in range(L):
            cands = []
            for toks, lps, s, prev in beams:  # step 1: a single beam, so only it expands
                s_new = drafter.step(s, embed(torch.tensor([prev])))
                logp = torch.log_softmax(drafter.logits(h[b:b + 1], s_new), -1)[0]
                for r in range(logp.shape[0]):
                    tok = int(drafter.token_ids[r])
                    cands.append((toks + [tok], lps + [float(logp[r])], s_new, tok))
            cands.sort(key=lambda c: -sum(c[1]))
            beams = cands[:W]
        out_tokens.append([c[0] for c in beams])
        out_lp.append([c[1] for c in beams])
    return torch.tensor(out_tokens), torch.tensor(out_lp)


@pytest.mark.parametrize("draft_vocab", [None, 12])
def test_beam_search_matches_reference(draft_vocab):
    drafter, embed = make_drafter(draft_vocab=draft_vocab), make_embed()
    h, last = torch.randn(3, H), torch.randint(0, V, (3,))
    with torch.no_grad():
        ref_tokens, ref_lp = reference_beam_search(drafter, h, last, embed, W=4, L=3)
    beams = beam_search(drafter, h, last, embed, width=4, length=3)
    assert beams.token_ids.shape == (3, 4, 3) and beams.logprobs.shape == (3, 4, 3)
    assert torch.equal(beams.token_ids, ref_tokens)
    torch.testing.assert_close(beams.logprobs, ref_lp, rtol=1e-4, atol=1e-5)


def test_first_step_expands_only_beam_zero_and_beams_are_distinct():
    drafter, embed = make_drafter(), make_embed()
    h, last = torch.randn(2, H), torch.randint(0, V, (2,))
    beams = beam_search(drafter, h, last, embed, width=5, length=1)
    with torch.no_grad():
        s1 = drafter.step(torch.zeros(2, H), embed(last))
        top = torch.log_softmax(drafter.logits(h, s1), -1).topk(5, -1)
    # width distinct first tokens: the top-5 of the one distribution, not 5 copies of its argmax
    assert torch.equal(beams.token_ids[:, :, 0], top.indices)
    deep = beam_search(drafter, h, last, embed, width=5, length=4)
    for b in range(2):
        assert len({tuple(x) for x in deep.token_ids[b].tolist()}) == 5
        score = deep.logprobs[b].sum(-1)
        assert torch.all(score[:-1] >= score[1:])  # beam 0 is the most likely
        tree = DraftTree.from_beams(int(last[b]), deep.token_ids[b].tolist())
        tree.check_integrity()


def test_restricted_vocabulary_never_drafts_outside():
    drafter, embed = make_drafter(draft_vocab=6), make_embed()
    beams = beam_search(drafter, torch.randn(8, H), torch.randint(0, V, (8,)), embed, width=6, length=4)
    kept = set(drafter.token_ids.tolist())
    assert set(beams.token_ids.flatten().tolist()) <= kept
    with pytest.raises(ValueError, match="width"):
        beam_search(drafter, torch.randn(1, H), torch.zeros(1, dtype=torch.long), embed, width=7, length=2)


def test_save_load_round_trip(tmp_path):
    drafter = make_drafter(draft_vocab=12)
    save_drafter(drafter, str(tmp_path), dtype=torch.float32)
    config = json.loads((tmp_path / "redrafter.json").read_text())
    assert config["base_model"] == "base" and config["base_vocab_size"] == V and config["hidden_size"] == H
    loaded = load_drafter(str(tmp_path), "base", V, H)
    assert loaded.config == drafter.config and torch.equal(loaded.token_ids, drafter.token_ids)
    for (name, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    save_drafter(drafter, str(tmp_path / "bf16"))  # the default: bf16 weights, half the file
    small = load_drafter(str(tmp_path / "bf16"))
    assert small.dtype == torch.float32
    torch.testing.assert_close(small.lm_head.weight, drafter.lm_head.weight, rtol=1e-2, atol=1e-2)


def test_wrong_base_model_is_a_clear_error(tmp_path):
    save_drafter(make_drafter(), str(tmp_path))
    with pytest.raises(DrafterMismatchError, match="trained for base model 'base'.*not 'other'"):
        load_drafter(str(tmp_path), "other", V, H)
    with pytest.raises(DrafterMismatchError, match="vocab 41"):
        load_drafter(str(tmp_path), None, V + 1, H)
    load_drafter(str(tmp_path), None, V, H)  # no name to check: the shapes match
    with pytest.raises(ValueError, match="not a ReDrafter drafter"):
        load_drafter(str(tmp_path / "nowhere"))


def fake_base(vocab=V, hidden=H):
    return SimpleNamespace(config=SimpleNamespace(vocab_size=vocab, hidden_size=hidden),
                           embed_tokens=make_embed())


def test_proposer(tmp_path):
    save_drafter(make_drafter(draft_vocab=12), str(tmp_path), dtype=torch.float32)
    proposer = get_proposer("redrafter", model=fake_base(), model_name="base",
                            drafter_path=str(tmp_path), beam_width=3, beam_length=2)
    assert isinstance(proposer, ReDrafterProposer)
    drafts = proposer.propose([[1, 2, 3], [7]], torch.randn(2, H))
    assert len(drafts) == 2
    for d in drafts:
        assert d.draft_probs is None  # deterministic drafts: verification stays lossless
        assert len(d.beams) == 3 and all(len(b) == 2 for b in d.beams)
    with pytest.raises(DrafterMismatchError):
        ReDrafterProposer(fake_base(vocab=V + 2), "base", str(tmp_path))
    with pytest.raises(ValueError, match="hidden states"):
        proposer.propose([[1]], None)
    with pytest.raises(ValueError, match="no drafter ships"):
        ReDrafterProposer(fake_base(), "no-such-model")


# ---- self-distillation end to end ----------------------------------------------------------

def build_predictable_llama(path: Path) -> Path:
    """A tiny Llama whose greedy next token is perm[current token]: attention and MLP outputs
    are zero, so the final hidden state is the normalised embedding of the current token, and
    LM-head row perm[x] is x's embedding (rows of equal norm: the dot product peaks there).
    EOS is a fixed point, so answers never end early."""
    from transformers import LlamaForCausalLM

    from tiny_models import COMMON, _configs, build_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(_configs()["llama"])
    V_ = COMMON["vocab_size"]
    eos = COMMON["eos_token_id"]
    others = torch.tensor([t for t in range(V_) if t != eos])
    perm = torch.arange(V_)
    perm[others] = others[torch.randperm(len(others))]
    with torch.no_grad():
        emb = F.normalize(torch.randn(V_, COMMON["hidden_size"]), dim=-1) * 8
        model.model.embed_tokens.weight.copy_(emb)
        model.lm_head.weight[perm] = emb
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(path)
    build_tokenizer(path)
    return path


def test_train_drafter_cli_end_to_end(tmp_path):
    from paraserve.server.cli import main

    base = build_predictable_llama(tmp_path / "base")
    out = tmp_path / "drafter"
    args = ["train-drafter", "--model", str(base), "--out", str(out), "--dtype", "float32", "--threads", "1",
            "--num-prompts", "40", "--num-heldout", "6", "--max-tokens", "24", "--epochs", "4",
            "--batch-size", "64", "--lr", "3e-3", "--draft-vocab-size", "256", "--beam-width", "2",
            "--beam-length", "3"]
    threads = torch.get_num_threads()
    try:  # one thread: OpenMP on a busy 2-core machine is many times slower with two
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((out / "train_report.json").read_text())["report"]
    # without training a drafter accepts ~1 (only the bonus token); this pattern is learnable
    print(report)
    assert report["accepted_length"] > 1.5, report
    drafter = load_drafter(str(out), "base", 384, 64)
    assert drafter.config.draft_vocab_size == 256
    with pytest.raises(DrafterMismatchError):
        load_drafter(str(out), "SmolLM2-135M-Instruct", 49152, 576)


def test_train_drafter_cli_errors_are_one_line(tmp_path, tiny_model_dir, capsys):
    from paraserve.server.cli import main

    base = tiny_model_dir("llama")
    capsys.readouterr()
    bad = tmp_path / "prompts.txt"
    bad.write_text("only one\n")
    assert main(["train-drafter", "--model", str(base), "--out", str(tmp_path / "d"),
                 "--prompts-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "has 1 prompts" in err and "Traceback" not in err
    (tmp_path / "file").write_text("")
    assert main(["train-drafter", "--model", str(base), "--out", str(tmp_path / "file")]) == 2
    assert "cannot create --out directory" in capsys.readouterr().err
