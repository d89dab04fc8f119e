"""ReDrafter: a small recurrent draft head on top of the base model, and its beam search.

Cheung et al. 2024, "Recurrent Drafter for Fast Speculative Decoding in Large Language Models".
The drafter reads the base model's last hidden state h (after the final norm) at the row whose
logits sampled the last verified token g_0, and that token's embedding from the base model's
own frozen table. It then runs a recurrence over the tokens it drafts:

    s_0 = 0,  s_t = SiLU(W e(g_{t-1}) + U s_{t-1}),
    logits_t = V(blocks(P [h; s_t])),  blocks: N times x + SiLU(A x)

where logits_t scores g_t, the token t places after g_0, and h stays fixed across the steps.
V covers the whole base vocabulary or only its most frequent tokens (FR-Spec, Zhao et al.
2025): `token_ids` maps the drafter's vocabulary rows to base token ids, and tokens outside are
never drafted. Verification treats the beams as deterministic drafts (draft_probs None), so
whatever the drafter proposes, the output is the base model's.

On disk a drafter is a directory: redrafter.json (ReDrafterConfig, naming its base model) and
redrafter.safetensors (its weights and `token_ids`). The base model's embedding table is
never copied into it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from paraserve.layers.linear import Packed, pack_weight, packed_linear
from paraserve.spec_decode.ngram import NgramProposer
from paraserve.spec_decode.proposer import Draft, Proposer

CONFIG_FILE = "redrafter.json"
WEIGHTS_FILE = "redrafter.safetensors"
# drafters shipped with the project, one directory per base model name
SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "drafters")

Embed = Callable[[torch.Tensor], torch.Tensor]  # token ids [...] -> embeddings [..., hidden]


class DrafterMismatchError(ValueError):
    """A drafter was loaded against a base model it was not trained for."""


@dataclass(frozen=True)
class ReDrafterConfig:
    base_model: str  # the base model's name, e.g. "SmolLM2-135M-Instruct"
    base_vocab_size: int
    hidden_size: int  # the base model's: h, the embeddings and the recurrent state s
    num_blocks: int = 2  # residual blocks x + SiLU(A x) in the head
    # project [h; s] (2 * hidden) down to hidden before the blocks; False: blocks at 2 * hidden
    project: bool = True
    draft_vocab_size: Optional[int] = None  # rows of the vocabulary projection; None: all

    def __post_init__(self) -> None:
        if self.base_vocab_size < 1 or self.hidden_size < 1:
            raise ValueError("base_vocab_size and hidden_size must be >= 1")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {self.num_blocks}")
        v = self.draft_vocab_size
        if v is not None and not 1 <= v <= self.base_vocab_size:
            raise ValueError(f"draft_vocab_size must be in [1, {self.base_vocab_size}], got {v}")

    @property
    def vocab_rows(self) -> int:
        return self.draft_vocab_size or self.base_vocab_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size if self.project else 2 * self.hidden_size

    def check_base(self, name: Optional[str], vocab_size: int, hidden_size: int) -> None:
        """Raise DrafterMismatchError unless the base model is the one this drafter was trained
        for. name None skips the name check (same shapes, e.g. another copy of the checkpoint)."""
        ours = (self.base_vocab_size, self.hidden_size)
        if ours != (vocab_size, hidden_size) or (
                name is not None and name.lower() != self.base_model.lower()):
            raise DrafterMismatchError(
                f"this drafter was trained for base model {self.base_model!r} (vocab "
                f"{self.base_vocab_size}, hidden {self.hidden_size}), not {name or 'this model'!r} "
                f"(vocab {vocab_size}, hidden {hidden_size}): train one for it with "
                f"`paraserve train-drafter --model MODEL --out DIR`")


class DraftLinear(nn.Linear):
    """nn.Linear for training; without autograd (drafting) it takes the engine's CPU path (bf16
    weights prepacked by pack() for AMX tiles or oneDNN, else the small-M kernel), several times
    faster than aten's on the 4-16 rows a beam search step has."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed: Optional[Packed] = None

    def pack(self) -> None:
        """Prepack the current weight (call again after changing its dtype or values)."""
        self.packed = pack_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad):
            return super().forward(x)  # training (a frozen layer still passes gradients back)
        packed = self.packed if self.packed is not None and self.packed.data.dtype == self.weight.dtype else None
        return packed_linear(x, self.weight, packed, self.bias)


class ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = DraftLinear(dim, dim)
        # zero init: each block starts as the identity (as Medusa and ReDrafter do)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class ReDrafter(nn.Module):
    def __init__(self, config: ReDrafterConfig, token_ids: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.config = config
        H, D = config.hidden_size, config.head_dim
        self.rnn_w = DraftLinear(H, H)  # W e(g_{t-1}) (+ bias)
        self.rnn_u = DraftLinear(H, H, bias=False)  # U s_{t-1}
        self.proj = DraftLinear(2 * H, H) if config.project else None
        self.blocks = nn.ModuleList(ResBlock(D) for _ in range(config.num_blocks))
        self.lm_head = DraftLinear(D, config.vocab_rows, bias=False)
        if token_ids is None:
            if config.draft_vocab_size is not None:
                raise ValueError("a restricted draft vocabulary needs its token_ids")
            token_ids = torch.arange(config.base_vocab_size)
        if token_ids.shape != (config.vocab_rows,):
            raise ValueError(f"token_ids must have shape [{config.vocab_rows}], got {tuple(token_ids.shape)}")
        # drafter vocabulary row -> base token id; saved with the weights
        self.register_buffer("token_ids", token_ids.to(torch.int64).clone())  # [Vd]

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def pack(self) -> "ReDrafter":
        """Prepack weights for drafting, once they are final (dtype and device included)."""
        for m in self.modules():
            if isinstance(m, DraftLinear):
                m.pack()
        return self

    def step(self, s: torch.Tensor, prev_emb: torch.Tensor) -> torch.Tensor:
        """s [N, H] (s_{t-1}), prev_emb [N, H] (e(g_{t-1})) -> s_t [N, H]."""
        return F.silu(self.rnn_w(prev_emb.to(self.dtype)) + self.rnn_u(s))

    def features(self, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """h [N, H], s [N, H] -> [N, head_dim]: what the vocabulary projection reads (with the
        projection, a stand-in for the base model's own next hidden state)."""
        x = torch.cat([h.to(self.dtype), s], dim=-1)  # [N, 2H]
        if self.proj is not None:
            x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return x

    def logits(self, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """h [N, H], s [N, H] -> [N, Vd] scores over the drafter's vocabulary rows."""
        return self.lm_head(self.features(h, s))

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, embed: Embed,
                return_features: bool = False):
        """Teacher forcing. h [N, H]; tokens [N, K]: g_0 (the last verified token) and the true
        next K - 1 tokens -> logits [N, K, Vd], row k scoring g_{k+1} (and with return_features
        the features [N, K, head_dim] they came from)."""
        N, K = tokens.shape
        emb = embed(tokens)  # [N, K, H]
        s = h.new_zeros(N, self.config.hidden_size, dtype=self.dtype)
        out, feats = [], []
        for k in range(K):
            s = self.step(s, emb[:, k])
            x = self.features(h, s)
            feats.append(x)
            out.append(self.lm_head(x))
        logits = torch.stack(out, dim=1)
        return (logits, torch.stack(feats, dim=1)) if return_features else logits


class Beams(NamedTuple):
    token_ids: torch.Tensor  # [B, W, L] int64 base token ids, beam 0 the most likely
    logprobs: torch.Tensor  # [B, W, L] float32, each token's log-prob given its beam prefix
    # every beam the search held after each step t (entry t * W + w: beam w after step t, t + 1
    # tokens, then -1 padding), and its log-prob: the tree's candidate nodes. A beam dropped at a
    # later step (its extensions lost to other beams') is often likelier than the final beams'
    # last tokens, so verifying it accepts more per node than the final beams' prefixes alone.
    visited: torch.Tensor  # [B, L * W, L] int64
    visited_logprobs: torch.Tensor  # [B, L * W] float32


@torch.inference_mode()
def beam_search(drafter: ReDrafter, h: torch.Tensor, last_token: torch.Tensor, embed: Embed,
                width: int, length: int, min_logprob: float = float("-inf")) -> Beams:
    """h [B, H] base hidden states, last_token [B] (g_0) -> the `width` most likely drafts of
    `length` tokens per request, by drafter log-prob, all requests and beams batched.

    All beams start identical, so the first step expands one row per request (its top-width
    tokens); later steps expand every beam and keep the top-width of width * Vd candidates.
    Beams are therefore distinct sequences, and so are the beams of all steps (`visited`: a
    beam after step t is a beam after step t - 1 plus one token, so they form a prefix tree).
    The search stops early, with shorter beams, once every beam's log-prob (the sum over its
    tokens) is below min_logprob: longer drafts would be cut by the caller anyway
    (ReDrafterProposer drops tokens below its min_draft_prob)."""
    if not 1 <= width <= drafter.config.vocab_rows or length < 1:
        raise ValueError(f"need 1 <= width <= {drafter.config.vocab_rows} and length >= 1, "
                         f"got width={width}, length={length}")
    B, H = h.shape
    W, L = width, length
    s = drafter.step(h.new_zeros(B, H, dtype=drafter.dtype), embed(last_token))  # [B, H]
    logp = torch.log_softmax(drafter.logits(h, s).float(), dim=-1)  # [B, Vd]
    score, rows = logp.topk(W, dim=-1)  # [B, W] each; rows index the drafter's vocabulary
    picked = rows.unsqueeze(-1)  # [B, W, t] each beam's rows so far
    lps = score.unsqueeze(-1)  # [B, W, t]
    steps = [(picked, score)]
    s = s.repeat_interleave(W, dim=0)  # [B * W, H]
    h_w = h.repeat_interleave(W, dim=0)  # [B * W, H]
    for t in range(1, L):
        if float(score.max()) < min_logprob:
            break
        s = drafter.step(s, embed(drafter.token_ids[rows].flatten()))
        logp = torch.log_softmax(drafter.logits(h_w, s).float(), dim=-1)  # [B * W, Vd]
        V = logp.shape[-1]
        cand = (score.unsqueeze(-1) + logp.view(B, W, V)).view(B, W * V)
        new_score, idx = cand.topk(W, dim=-1)  # [B, W]
        parent, rows = idx // V, idx % V  # the beam each new beam extends, and its new row
        hist = parent.unsqueeze(-1).expand(B, W, t)
        picked = torch.cat([picked.gather(1, hist), rows.unsqueeze(-1)], dim=-1)
        lps = torch.cat([lps.gather(1, hist), (new_score - score.gather(1, parent)).unsqueeze(-1)], -1)
        score = new_score
        steps.append((picked, score))
        s = s.view(B, W, H).gather(1, parent.unsqueeze(-1).expand(B, W, H)).view(B * W, H)
    n = len(steps)
    visited = torch.cat([F.pad(rows, (0, n - rows.shape[-1]), value=-1) for rows, _ in steps], 1)
    ids = torch.where(visited >= 0, drafter.token_ids[visited.clamp(min=0)], -1)  # [B, n * W, n]
    return Beams(ids[:, -W:], lps, ids, torch.cat([sc for _, sc in steps], 1))


def compiled_head(drafter: ReDrafter, embed: nn.Module, int8: Optional[bool] = False):
    """The drafter as the compiled beam search (ops/csrc/draft_head.cpp, the same search in one
    call: 2.4 -> ~1.2 ms a search at batch 1), or None where that does not apply: no CPU
    kernels, a drafter not in bf16 on CPU, or an embedding table that is not the whole
    vocabulary (tensor parallel shards it). Call after drafter.pack().

    int8: its layers on int8 weights and activations (int8_gemm.cpp: AMX tiles, or AVX-512 VNNI
    where only that runs); None: wherever one of them runs and the layers fit (int8_applies).
    On AMX: 1.4 -> 0.8 ms a search. On a Zen 4 (VNNI), with the 9-node trees: chat at batch 1
    ran at a median of 157.1 against 144.3 tok/s over 10 alternating runs (faster in 9), for
    2.29 against 2.32 tokens per verification; code 185.8 against 184.1 (6 runs). True where
    neither runs raises ValueError."""
    from paraserve.ops import cpu

    weight = getattr(embed, "weight", None)
    kernels = cpu.kernels()
    if (kernels is None or weight is None or drafter.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16
            or weight.device.type != "cpu" or weight.shape[0] < drafter.config.base_vocab_size
            or getattr(getattr(embed, "tp", None), "size", 1) != 1):
        if int8:
            raise ValueError("drafter_int8 needs the drafter in bfloat16 on a CPU with the paraserve CPU kernels "
                             "and an unsharded embedding table")
        return None
    if int8 is None:
        int8 = int8_applies(drafter)
    elif int8 and not int8_applies(drafter):
        raise ValueError("drafter_int8 needs a CPU with AMX tiles or AVX-512 VNNI (Intel Sapphire Rapids, AMD "
                         "Zen 4 or later) and a drafter whose layer sizes are multiples of 64 (inputs) and 32 "
                         "(outputs)")

    def args(layer: DraftLinear):
        packed = layer.packed.data if layer.packed is not None and layer.packed.panels else None
        return layer.weight, packed, layer.bias

    return kernels.DraftHead(weight.contiguous(), drafter.token_ids, args(drafter.rnn_w), args(drafter.rnn_u),
                             args(drafter.proj) if drafter.proj is not None else None,
                             [args(b.linear) for b in drafter.blocks], args(drafter.lm_head), int8)


def int8_applies(drafter: ReDrafter) -> bool:
    """The CPU has AMX tiles or AVX-512 VNNI and every layer fits int8_linear's: in_features % 64
    and out_features % 32 (drafter_int8 true can run)."""
    from paraserve.ops import cpu

    return cpu.int8_available() and all(m.in_features % 64 == 0 and m.out_features % 32 == 0
                                        for m in drafter.modules() if isinstance(m, DraftLinear))


# How often a prompt-lookup draft token is the base model's next token, given the draft's
# tokens before it were: by the length n of the suffix it matched (5 stands for 5 and more),
# for its first token and for each later one. Measured offline over every position of the
# greedy answers to the 32 bench chat and 32 code prompts (SmolLM2-135M-Instruct), rounded
# between the two sets: chat first/later 0.16/0.58 at n=1, 0.49/0.68 at 2, 0.63/0.72 at 3,
# 0.69/0.75 at 4, 0.81/0.85 at 5; code 0.24/0.61, 0.37/0.71, 0.69/0.86, 0.71/0.90, 0.92/0.94.
# A copy tends to go on once it has started, and a long match is copied far more often.
LOOKUP_FIRST_PROB = (0.2, 0.45, 0.65, 0.7, 0.85)
LOOKUP_NEXT_PROB = (0.6, 0.7, 0.8, 0.8, 0.9)


def lookup_path_probs(draft: Sequence[int], match: int) -> dict[tuple[int, ...], float]:
    """Each prefix of a prompt-lookup draft (matched on `match` tokens) -> the estimated
    probability that the base model's next tokens are that prefix (LOOKUP_*_PROB)."""
    n = min(max(match, 1), len(LOOKUP_FIRST_PROB)) - 1
    out, p = {}, 1.0
    for i in range(len(draft)):
        p *= LOOKUP_FIRST_PROB[n] if i == 0 else LOOKUP_NEXT_PROB[n]
        out[tuple(draft[:i + 1])] = p
    return out


def _likeliest(kept: dict[tuple[int, ...], float], chain: Sequence[int], match: int,
               max_nodes: int) -> dict[tuple[int, ...], float]:
    """The tree of at most max_nodes nodes most likely to be accepted, from the drafter's nodes
    `kept` (path -> log-prob, prefix-closed) and the prompt-lookup draft `chain` (matched on
    `match` tokens). A node's score is the probability that the base model's next tokens are
    its path: exp(log-prob) for the drafter's, lookup_path_probs for the lookup's, and for a
    node both propose, the chance that either is right (1 - (1 - a)(1 - b)). The expected
    number of accepted drafts is the sum of the scores of a tree's nodes, and a prefix scores
    at least what its extensions do, so the highest max_nodes scores form the best tree.
    Returns path -> score.

    Offline (the shipped drafter, 9-node trees, the greedy answers to the 32 bench prompts of
    each set walked as the engine steps) this gave 2.32 -> 2.35 tokens per verification on
    chat and 3.27 -> 3.34 on code against taking the lookup draft's nodes first."""
    score = {path: math.exp(lp) for path, lp in kept.items()}
    for path, p in lookup_path_probs(chain, match).items():
        score[path] = 1.0 - (1.0 - score.get(path, 0.0)) * (1.0 - p)
    out: dict[tuple[int, ...], float] = {}
    for path, p in sorted(score.items(), key=lambda kv: (-kv[1], len(kv[0]))):
        if len(out) == max_nodes:
            break
        if len(path) == 1 or path[:-1] in out:
            out[path] = p
    return out


# ---- files ---------------------------------------------------------------------------------

def save_drafter(drafter: ReDrafter, path: str, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write path/redrafter.json and path/redrafter.safetensors (weights in `dtype`: bf16
    halves the file, and drafting does not need more)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
               for k, v in drafter.state_dict().items()}
    save_file(tensors, os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(drafter.config), f, indent=2)
        f.write("\n")


def load_drafter_config(path: str) -> ReDrafterConfig:
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"{path} is not a ReDrafter drafter: {CONFIG_FILE} is missing")
    try:
        with open(file) as f:
            return ReDrafterConfig(**json.load(f))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"cannot read drafter config {file}: {e}") from e


def load_drafter(path: str, base_model: Optional[str] = None, base_vocab_size: Optional[int] = None,
                 hidden_size: Optional[int] = None, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None) -> ReDrafter:
    """Load a saved drafter. With base_vocab_size and hidden_size given (and base_model, to check
    the name too), raise DrafterMismatchError if it was trained for another base model."""
    from safetensors.torch import load_file

    config = load_drafter_config(path)
    if base_vocab_size is not None and hidden_size is not None:
        config.check_base(base_model, base_vocab_size, hidden_size)
    state = load_file(os.path.join(path, WEIGHTS_FILE))
    drafter = ReDrafter(config, state["token_ids"])
    drafter.load_state_dict(state)
    return drafter.to(device=device, dtype=dtype).eval()


def shipped_drafter_path(base_model: str) -> str:
    """The drafter shipped in the package for a base model; a clear error when there is none."""
    path = os.path.join(SHIPPED_DIR, base_model)
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise ValueError(f"no drafter ships for base model {base_model!r} (none in {path}): train one "
                         f"with `paraserve train-drafter --model MODEL --out DIR` and pass it as "
                         f"--speculative-config '{{\"method\": \"redrafter\", \"drafter_path\": \"DIR\"}}'")
    return path


# ---- proposer ------------------------------------------------------------------------------

class ReDrafterProposer(Proposer):
    """Beam-search drafts from a trained ReDrafter, for requests batched together.

    model: the base model (its `embed_tokens` and `config`); model_name: its name, checked
    against the drafter's (None skips that check) and used to find the shipped drafter when
    drafter_path is None. dtype: the drafter's (default: the base embedding's).

    hidden_states given to propose() are, per request, the base model's final hidden state at
    the row whose logits chose the request's last token (the tree root): after a prefill, the
    last prompt token's row; after a verification, the last accepted node's row (the one that
    gave the bonus token). That is what train-drafter trains on."""
    name = "redrafter"

    def __init__(self, model: nn.Module, model_name: Optional[str] = None,
                 drafter_path: Optional[str] = None, beam_width: int = 4, beam_length: int = 4,
                 num_speculative_tokens: Optional[int] = None, drafter: Optional[ReDrafter] = None,
                 dtype: Optional[torch.dtype] = None, min_draft_prob: float = 0.0,
                 lookup: Optional[NgramProposer] = None, int8: Optional[bool] = False) -> None:
        if num_speculative_tokens is not None:
            beam_length = num_speculative_tokens  # vLLM's name for the draft length
        if beam_width < 1 or beam_length < 1:
            raise ValueError(f"beam_width and beam_length must be >= 1, got {beam_width}, {beam_length}")
        if not 0.0 <= min_draft_prob < 1.0:
            raise ValueError(f"min_draft_prob must be in [0, 1), got {min_draft_prob}")
        cfg = model.config
        weight = model.embed_tokens.weight
        dtype = dtype or weight.dtype
        if drafter is None:
            if drafter_path is None:
                if model_name is None:
                    raise ValueError("ReDrafter needs a drafter_path (or the model's name to find a shipped one)")
                drafter_path = shipped_drafter_path(model_name)
            drafter = load_drafter(drafter_path, model_name, cfg.vocab_size, cfg.hidden_size,
                                   dtype, weight.device)
        else:
            drafter.config.check_base(model_name, cfg.vocab_size, cfg.hidden_size)
            drafter = drafter.to(device=weight.device, dtype=dtype).eval()
        if beam_width > drafter.config.vocab_rows:
            raise ValueError(f"beam_width {beam_width} exceeds the drafter's {drafter.config.vocab_rows} tokens")
        self.drafter = drafter.requires_grad_(False).pack()
        self.embed: Embed = model.embed_tokens
        # None: the torch search; int8 None: int8 layers wherever they run (compiled_head)
        self.head = compiled_head(self.drafter, model.embed_tokens, int8)
        self.int8 = self.head is not None and (int8_applies(self.drafter) if int8 is None else int8)
        self.beam_width = beam_width
        self.beam_length = beam_length
        # a drafted token is verified only while the drafter gives its beam prefix at least this
        # probability: unlikely nodes cost attention and logits and are rarely accepted
        self.min_logprob = math.log(min_draft_prob) if min_draft_prob > 0 else float("-inf")
        # a model-free proposer (prompt lookup) whose draft joins the beams: where the answer
        # copies its context, the drafter rarely proposes the copy; the tree shares prefixes
        self.lookup = lookup

    def propose_tensors(self, hidden_states: torch.Tensor, last_tokens: torch.Tensor) -> Beams:
        """hidden_states [B, H], last_tokens [B] -> Beams [B, W, L'] (L' <= L: the search stops
        once no beam is likely enough to verify)."""
        if self.head is not None:
            return Beams(*self.head.beam_search(hidden_states, last_tokens, self.beam_width, self.beam_length,
                                                self.min_logprob))
        return beam_search(self.drafter, hidden_states, last_tokens, self.embed,
                           self.beam_width, self.beam_length, self.min_logprob)

    def propose(self, token_ids: Sequence[Sequence[int]],
                hidden_states: Optional[torch.Tensor] = None,
                max_nodes: Optional[Sequence[int]] = None) -> list[Draft]:
        if hidden_states is None:
            raise ValueError("the redrafter proposer needs the base model's hidden states")
        if not token_ids:
            return []
        last = torch.tensor([t[-1] for t in token_ids], dtype=torch.int64,
                            device=hidden_states.device)
        beams = self.propose_tensors(hidden_states, last)
        # the tree: every beam the search held at any step whose log-prob (that of its whole
        # prefix) is at least min_logprob, given as its leaves (the tree adds their prefixes),
        # and the prompt-lookup draft as one more beam. With max_nodes the whole tree holds at
        # most that many nodes: those likeliest to be accepted (_likeliest weighs the lookup
        # draft by how long a suffix it matched). Deepest first, likelier first: the first leaf
        # is the best beam kept, whose nodes are laid out first (an accepted path along it needs
        # no K/V move).
        drafts = []
        for b, (paths, lps) in enumerate(zip(beams.visited.tolist(), beams.visited_logprobs.tolist())):
            chain, match = (self.lookup.match(token_ids[b])
                            if self.lookup is not None else ([], 0))
            kept = {tuple(t for t in path if t >= 0): lp for path, lp in zip(paths, lps)
                    if lp >= self.min_logprob}
            if max_nodes is not None:
                kept = _likeliest(kept, chain, match, max_nodes[b])
                chain = []  # its nodes that fit are in kept
            inner = {path[:-1] for path in kept}
            leaves = sorted(((-len(path), -p), path) for path, p in kept.items() if path not in inner)
            # deterministic drafts: verification treats them as point masses, which is lossless
            beams_b = [list(path) for _, path in leaves]
            drafts.append(Draft(beams=beams_b + [chain] if chain and chain not in beams_b else beams_b))
        return drafts
