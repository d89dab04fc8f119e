"""`paraserve train-drafter`: self-distillation of a ReDrafter drafter from its base model.

Recipe. The frozen base model answers the chat prompts shipped in prompts.txt (through the
engine, with its chat template): one greedy answer per prompt, which is what greedy speculation
will have to predict, plus `num_samples` sampled ones at a moderate temperature, for more and
more varied contexts; with `generated_prompts`, also prompts the base model writes itself (user
requests sampled from its chat template's open user turn), each with its greedy answer: far
more varied contexts than a fixed prompt list, which is what held-out acceptance needs (on its
own training prompts a drafter accepts much more than on unseen ones). One teacher-forced
forward over each prompt + answer gives the final hidden state h_t at every position, and the
base model's own next-token distribution there (its logits: the teacher). At each answer
position t the drafter gets (h_t, x_{t+1}) and learns, teacher-forced (the recurrence reads the
true tokens x_{t+2} .. x_{t+K}), what the base model would choose at t+1 .. t+K: the
cross-entropy against the teacher's argmax (its greedy choice, the token greedy verification
accepts; for a sampled answer that is not always the sampled token) and against its top-k
distribution (soft targets, which teach the drafter the runner-up tokens that the other beams
draft), summed over the K offsets. Offsets whose context has left the greedy path (an input
token the base model would not have chosen greedily) are masked: greedy verification never
accepts a draft there. The vocabulary projection is restricted to the tokens the base model
picks most often in this data and starts from the base model's LM head rows.

Held-out prompts measure what speculation would achieve: at every position of their greedy
responses, beam search (width W, length L) drafts from (h_t, x_{t+1}); the accepted length is the
longest prefix of any beam that matches the base model's greedy continuation, plus the bonus
token, which is what tree verification accepts at that step.

torch is imported inside functions, so that `paraserve --help` stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Optional, Sequence

from paraserve.config import ConfigError
from paraserve.spec_decode.drafter_data import (DrafterData, Progress, data_key, load_data, load_samples,
                                                save_data, save_samples)

if TYPE_CHECKING:
    import torch

    from paraserve.spec_decode.redrafter import ReDrafter

logger = logging.getLogger("paraserve")

PROMPTS_FILE = os.path.join(os.path.dirname(__file__), "prompts.txt")
REPORT_FILE = "train_report.json"


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


SHIPPED = "shipped"  # --init-from: the drafter shipped for the model


@dataclass(frozen=True)
class TrainDrafterConfig:
    out: str = _f(None, "directory to write the drafter to (required)")
    prompts_file: Optional[str] = _f(None, "one user request per line (default: the shipped prompts.txt)")
    num_prompts: Optional[int] = _f(None, "training prompts (default: all but the held-out ones)")
    num_heldout: int = _f(32, "held-out prompts for the accepted-length report")
    generated_prompts: int = _f(1200, "more training prompts, written by the base model itself: user requests "
                                   "sampled from its chat template's open user turn (each gets its greedy "
                                   "answer); more varied contexts than the shipped prompts alone")
    max_tokens: int = _f(192, "max response tokens per prompt")
    num_samples: int = _f(1, "sampled answers per shipped training prompt, besides its greedy one")
    temperature: float = _f(0.8, "sampling temperature of those answers (held-out answers: greedy)")
    gen_batch: int = _f(256, "requests in flight while generating (the engine's max_num_seqs here)")
    epochs: int = _f(1, "passes over the training positions")
    batch_size: int = _f(256, "positions per training step")
    lr: float = _f(1e-3, "peak AdamW learning rate (warmup, then cosine decay)")
    beam_width: int = _f(4, "beams in the held-out evaluation")
    beam_length: int = _f(4, "draft length: training offsets K and evaluation beam length L")
    draft_vocab_size: Optional[int] = _f(8192, "drafted vocabulary: the tokens the base model picks most "
                                                "often in the generated data (0: the whole vocabulary)")
    num_blocks: int = _f(2, "residual blocks in the drafter head")
    soft_targets: int = _f(16, "distil the base model's top-k next-token distribution at every offset, "
                              "besides its argmax (0: the argmax alone, a hard label)")
    soft_weight: float = _f(0.5, "weight of the soft-target loss; the argmax loss gets 1 - this")
    greedy_path: bool = _f(True, "mask offsets whose inputs left the base model's greedy path")
    init_from_lm_head: bool = _f(True, "start the vocabulary projection from the base LM head rows")
    train_lm_head: bool = _f(True, "train the vocabulary projection (else it stays the base LM head's rows)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    dropout: float = _f(0.0, "dropout on the drafter's inputs (h and the token embeddings) in training")
    feature_loss: float = _f(0.0, "weight of a smooth-L1 loss pulling the drafter's features towards the "
                                  "base model's hidden state at each offset (as EAGLE does; 0: off)")
    bf16: bool = _f(True, "train with bfloat16 matrix products (autocast; float32 weights and loss)")
    init_from: Optional[str] = _f(None, "go on training this drafter instead of a new one: a directory train-drafter "
                                        "wrote, or 'shipped' (the drafter shipped for the model). Its layers and "
                                        "drafted vocabulary are kept: --num-blocks, --draft-vocab-size and "
                                        "--init-from-lm-head do not apply (default: a new drafter)")
    average_with_start: float = _f(0.0, "with --init-from: save this share of the starting drafter's weights plus "
                                        "the rest of the trained ones' (weight averaging; 0: the trained weights)")
    train_seed: int = _f(0, "seed of the prompt split, the sampling, the drafter init and the training order")
    data_dir: Optional[str] = _f(None, "keep the generated data (answers, hidden states) in this directory and "
                                       "reuse it when a later run asks for the same data: then only training runs")

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("train-drafter needs --out DIR")
        positive = ("num_heldout", "max_tokens", "epochs", "batch_size", "beam_width", "beam_length",
                    "gen_batch")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ConfigError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.num_samples < 0 or self.soft_targets < 0 or self.generated_prompts < 0:
            raise ConfigError("--num-samples, --soft-targets and --generated-prompts must be >= 0")
        if self.num_samples and self.temperature <= 0:
            raise ConfigError("--num-samples needs --temperature > 0 (the greedy answer is always included)")
        if self.temperature < 0 or self.lr <= 0:
            raise ConfigError("--temperature must be >= 0 and --lr > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.soft_weight <= 1:
            raise ConfigError(f"--soft-weight must be in [0, 1], got {self.soft_weight}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 0:
            raise ConfigError(f"--draft-vocab-size must be >= 0, got {self.draft_vocab_size}")
        if not 0 <= self.average_with_start < 1:
            raise ConfigError(f"--average-with-start must be in [0, 1), got {self.average_with_start}")
        if self.average_with_start and self.init_from is None:
            raise ConfigError("--average-with-start needs --init-from (a drafter to average with)")
        if self.init_from not in (None, SHIPPED) and not os.path.isdir(self.init_from):
            raise ConfigError(f"--init-from {self.init_from} is not a directory (a drafter train-drafter wrote, "
                              f"or '{SHIPPED}' for the one shipped for the model)")


@dataclass
class Sample:
    token_ids: list[int]  # prompt + response
    prompt_len: int


@dataclass
class Teacher:
    """The base model's next-token choice at every row of a sample (the logits of row r score
    token r + 1): its k most likely tokens, the first its argmax, and their probabilities."""
    ids: "torch.Tensor"  # [T, k] int64 base token ids, most likely first
    probs: "torch.Tensor"  # [T, k] float32, under the full vocabulary


@dataclass
class TrainReport:
    path: str
    num_train_positions: int
    final_loss: float
    accepted_length: float  # mean over held-out positions: best of W beams, + 1 bonus
    accepted_length_top_beam: float  # beam 0 alone (a chain draft)
    vocab_coverage: float  # share of held-out response tokens the drafter can draft
    seconds: dict[str, float]
    # with --init-from: the starting drafter's accepted_length on the same held-out answers
    start_accepted_length: Optional[float] = None


# ---- CLI -----------------------------------------------------------------------------------

def add_args(parser: argparse.ArgumentParser) -> None:
    """Training flags, from TrainDrafterConfig (engine flags such as --model and --dtype are
    added by the caller)."""
    g = parser.add_argument_group("drafter training")
    for f in dataclasses.fields(TrainDrafterConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"]
        shown = text if "default:" in text or f.name == "out" else f"{text} (default: {f.default})"
        if f.type in (bool, "bool"):
            g.add_argument(flag, dest=f.name, default=f.default, help=shown,
                           action=argparse.BooleanOptionalAction)
            continue
        t = str(f.type)
        kind = int if "int" in t else float if "float" in t else str
        g.add_argument(flag, dest=f.name, type=kind, default=f.default, help=shown,
                       required=f.name == "out")


def run(args: argparse.Namespace, engine_args: dict[str, Any]) -> int:
    cfg = TrainDrafterConfig(**{f.name: getattr(args, f.name)
                                for f in dataclasses.fields(TrainDrafterConfig)})
    train_drafter(cfg, engine_args)
    return 0


# ---- the pipeline --------------------------------------------------------------------------

def train_drafter(cfg: TrainDrafterConfig, engine_args: dict[str, Any]) -> TrainReport:
    from paraserve.llm import LLM
    from paraserve.spec_decode.redrafter import load_drafter, save_drafter

    seconds: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name], clock = time.monotonic() - clock, time.monotonic()

    _check_out(cfg.out)  # before minutes of work, not after
    train_prompts, heldout_prompts = split_prompts(cfg)
    if engine_args.get("kv_cache_memory") is None:
        # generation needs ~2 GB at gen_batch 256; zeroing the default share of RAM takes seconds
        engine_args = {**engine_args, "kv_cache_memory": "2GiB"}
    # more requests in flight: batched decode on a CPU gets faster per token up to a few hundred
    engine_args = {**engine_args, "max_num_seqs": cfg.gen_batch}
    llm = LLM(**engine_args)
    model, name = llm.engine.worker.model, llm.engine.source.name
    start = load_start(cfg.init_from, model, name, cfg) if cfg.init_from else None  # before minutes of work
    lap("load")
    logger.info("train-drafter: %d training prompts (greedy + %d sampled answers each, temperature %g) "
                "+ %d held-out prompts (greedy), up to %d tokens each", len(train_prompts),
                cfg.num_samples, cfg.temperature, len(heldout_prompts), cfg.max_tokens)
    key = data_key(cfg, name, str(model.embed_tokens.weight.dtype), cfg.prompts_file or PROMPTS_FILE)
    data = load_data(cfg.data_dir, key) if cfg.data_dir else None
    if data is None:
        samples = load_samples(cfg.data_dir, key) if cfg.data_dir else None
        if samples is None:
            progress = Progress(cfg.data_dir, key)
            samples = generate_samples(llm, train_prompts, heldout_prompts, cfg, lap, progress)
            if cfg.data_dir:
                save_samples(cfg.data_dir, key, *samples)
                progress.clear()
        data = add_hidden_states(model, *samples, cfg)
        lap("hidden")
        if cfg.data_dir:
            save_data(cfg.data_dir, key, data)
    train, heldout, train_h, train_t, heldout_h = data
    del data
    start_acc = None
    if start is not None:  # what training has to beat, measured as the result will be
        start_acc = evaluate(start, heldout, heldout_h, model.embed_tokens, cfg.beam_width, cfg.beam_length)[0]
        logger.info("train-drafter: the starting drafter's held-out mean accepted length (W=%d, L=%d): %.2f",
                    cfg.beam_width, cfg.beam_length, start_acc)
    drafter = start if start is not None else new_drafter(cfg, model, name, train, train_t)
    data = make_training_set(train, train_h, train_t, drafter.token_ids, model.config.vocab_size, cfg)
    del train_h, train_t
    logger.info("drafter: %.1fM parameters, %d drafted tokens; %d training positions",
                sum(p.numel() for p in drafter.parameters()) / 1e6, len(drafter.token_ids), data.num_positions)
    start_weights = ({k: v.detach().clone() for k, v in drafter.state_dict().items()}
                     if start is not None and cfg.average_with_start else None)
    loss = fit(drafter, data, model.embed_tokens, cfg)
    if start_weights is not None:
        average_weights(drafter, start_weights, cfg.average_with_start)
    lap("train")
    save_drafter(drafter, cfg.out)
    saved = load_drafter(cfg.out, name, model.config.vocab_size, model.config.hidden_size)
    acc, acc_top = evaluate(saved, heldout, heldout_h, model.embed_tokens, cfg.beam_width, cfg.beam_length)
    coverage = vocab_coverage(heldout, saved.token_ids)
    lap("evaluate")
    logger.info("held-out mean accepted length (W=%d, L=%d): %.2f tokens/step (top beam only: %.2f%s); "
                "the draft vocabulary holds %.1f%% of held-out response tokens",
                cfg.beam_width, cfg.beam_length, acc, acc_top,
                "" if start_acc is None else f"; the starting drafter: {start_acc:.2f}", 100 * coverage)
    report = TrainReport(cfg.out, data.num_positions, loss, acc, acc_top, coverage, seconds, start_acc)
    with open(os.path.join(cfg.out, REPORT_FILE), "w") as f:  # how this drafter was made
        # the drafter's own config too: with --init-from, --num-blocks and the like did not apply
        json.dump({"train": dataclasses.asdict(cfg), "drafter": dataclasses.asdict(drafter.config),
                   "report": dataclasses.asdict(report)}, f, indent=2)
        f.write("\n")
    logger.info("saved drafter to %s; time: %s", cfg.out,
                ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return report


def generate_samples(llm, train_prompts: list[str], heldout_prompts: list[str], cfg: TrainDrafterConfig,
                     lap: Callable[[str], None], progress: Optional[Progress] = None,
                     ) -> tuple[list[Sample], list[Sample]]:
    """The base model's answers, to the prompts it writes itself too: (train, held-out). With
    progress, what it holds is not generated again and what is generated is kept there."""
    progress = progress or Progress(None, {})
    if progress.written is None:
        progress.written = sample_prompts(llm, cfg.generated_prompts, cfg.train_seed, set(heldout_prompts))
        progress.save()
        if cfg.generated_prompts:
            lap("write prompts")
    samples = generate(llm, train_prompts, heldout_prompts, cfg, progress.written, progress)
    lap("generate")
    return samples


def add_hidden_states(model, train: list[Sample], heldout: list[Sample], cfg: TrainDrafterConfig) -> DrafterData:
    """The samples with the base model's hidden states (and top-k choices on the training ones)."""
    train_h, train_t = hidden_states(model, train, teacher_k=max(1, cfg.soft_targets))
    heldout_h, _ = hidden_states(model, heldout)
    return DrafterData(train, heldout, train_h, train_t, heldout_h)


def new_drafter(cfg: TrainDrafterConfig, model, name: str, train: list[Sample],
                teacher: Optional[list[Teacher]] = None) -> "ReDrafter":
    """An untrained drafter for `model`: its vocabulary the tokens most frequent in the answers
    (with `teacher`: the tokens the base model picks there), its vocabulary projection
    (optionally) the base LM head's rows for them."""
    import torch

    from paraserve.spec_decode.redrafter import ReDrafter, ReDrafterConfig

    V = model.config.vocab_size
    token_ids = frequent_tokens(train, V, cfg.draft_vocab_size or None, teacher)
    restricted = len(token_ids) < V
    config = ReDrafterConfig(base_model=name, base_vocab_size=V, hidden_size=model.config.hidden_size,
                             num_blocks=cfg.num_blocks, draft_vocab_size=len(token_ids) if restricted else None)
    torch.manual_seed(cfg.train_seed)
    drafter = ReDrafter(config, token_ids if restricted else None)
    if cfg.init_from_lm_head:
        with torch.no_grad():
            drafter.lm_head.weight.copy_(model.lm_head.weight[drafter.token_ids].float())
    return drafter


def average_weights(drafter: "ReDrafter", start: dict, share: float) -> None:
    """Every floating-point weight of drafter becomes share * its starting value + (1 - share) *
    its trained one, in place. Training went on from `start`, so both lie in one basin; once here
    their average drafted better than either (one case, not a rule): on the bench's 32 prompts,
    offline, the shipped drafter gave 2.29 tokens per verification (chat) and 3.16 (code) at 7
    nodes, one more epoch on 2.9M new positions 2.30 and 3.13, their average 2.32 and 3.22. A
    second round from that average did not help (chat 2.32, code 3.17)."""
    import torch

    with torch.no_grad():
        for k, v in drafter.state_dict().items():
            if v.is_floating_point():
                v.mul_(1.0 - share).add_(start[k].to(v.dtype), alpha=share)


def load_start(init_from: str, model, name: str, cfg: TrainDrafterConfig) -> "ReDrafter":
    """--init-from's drafter, in float32 for training; a clear error when it is not one for this
    base model."""
    from paraserve.spec_decode.redrafter import DrafterMismatchError, load_drafter, shipped_drafter_path

    try:  # a drafter the user points at may come from another copy of the model: shapes only
        path, check = (shipped_drafter_path(name), name) if init_from == SHIPPED else (init_from, None)
        drafter = load_drafter(path, check, model.config.vocab_size, model.config.hidden_size)
    except (DrafterMismatchError, ValueError) as e:
        raise ConfigError(f"--init-from: {e}") from e
    drafter.config = dataclasses.replace(drafter.config, base_model=name)  # what it is saved for
    logger.info("train-drafter: going on from the drafter in %s (%d blocks, %d drafted tokens)", path,
                drafter.config.num_blocks, len(drafter.token_ids))
    _warn_if_heldout_differs(path, cfg)
    return drafter.train()


def _warn_if_heldout_differs(path: str, cfg: TrainDrafterConfig) -> None:
    """The held-out prompts are a shuffle of the prompts file by --train-seed: with another seed,
    file or count than the starting drafter's run, some of this run's held-out prompts were its
    training prompts, and the held-out figures (its own and the result's) read too high."""
    try:
        with open(os.path.join(path, REPORT_FILE), encoding="utf-8") as f:
            made = json.load(f)["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no report: nothing to compare
    flags = {n: "--" + n.replace("_", "-") for n in ("prompts_file", "num_heldout", "train_seed")}
    differ = [f"{flag} {made.get(n)} -> {getattr(cfg, n)}" for n, flag in flags.items()
              if made.get(n) != getattr(cfg, n)]
    if differ:
        logger.warning("train-drafter: the held-out prompts are not the starting drafter's (%s): some may be "
                       "prompts it was trained on, so held-out figures favour it; the same %s hold out the "
                       "same prompts", ", ".join(differ), " / ".join(flags.values()))


def _check_out(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out directory {path}: {e.strerror or e}") from e
    if not os.access(path, os.W_OK):
        raise ConfigError(f"--out directory {path} is not writable")


def split_prompts(cfg: TrainDrafterConfig) -> tuple[list[str], list[str]]:
    path = cfg.prompts_file or PROMPTS_FILE
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise ConfigError(f"cannot read prompts file {path}: {e.strerror}") from e
    if len(prompts) < cfg.num_heldout + 1:
        raise ConfigError(f"{path} has {len(prompts)} prompts; need more than --num-heldout {cfg.num_heldout}")
    random.Random(cfg.train_seed).shuffle(prompts)
    heldout, train = prompts[:cfg.num_heldout], prompts[cfg.num_heldout:]
    return train[:cfg.num_prompts], heldout


# The open user turn is sampled at the model's full temperature (min-p 0.05 cuts the garbage
# tail; top-p would do too, but its full-vocabulary sort costs more than the model at batch 256):
# varied requests in the style of the chat data the model was tuned on. Requests that do not end
# their turn within WRITE_MAX_TOKENS are dropped (mostly rambling), as are repeats.
WRITE_MIN_P = 0.05
WRITE_MAX_TOKENS = 96
WRITE_MIN_WORDS = 3


def sample_prompts(llm, n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """n user requests written by the base model: its chat template up to the user's content,
    then sampled until the model ends the turn. Fewer than n (with a warning) when too few of the
    samples qualify."""
    from paraserve.sampling_params import SamplingParams

    if n <= 0:
        return []
    prefix, stop = open_user_turn(llm.get_tokenizer())
    logger.info("train-drafter: the base model writes %d training prompts", n)
    tries = n * 3 // 2 + 16  # ~70% of SmolLM2's samples qualify
    params = [SamplingParams(temperature=1.0, min_p=WRITE_MIN_P, max_tokens=WRITE_MAX_TOKENS,
                             seed=seed * 1_000_003 + 7_919 + i, stop=stop) for i in range(tries)]
    outs = llm.generate([{"prompt_token_ids": prefix}] * tries, params)
    seen = {p.strip().lower() for p in exclude}
    prompts = []
    for o in outs:
        text = o.outputs[0].text.strip()
        if o.outputs[0].finish_reason != "stop" or len(text.split()) < WRITE_MIN_WORDS:
            continue
        if text.lower() not in seen:
            seen.add(text.lower())
            prompts.append(text)
    if len(prompts) < n:
        logger.warning("train-drafter: only %d of %d sampled prompts qualified", len(prompts), tries)
    return prompts[:n]


def open_user_turn(tokenizer) -> tuple[list[int], list[str]]:
    """The chat template rendered up to where a user's request goes (its default system prompt
    included), as token ids, and what the template puts after the request (a stop string,
    besides EOS, for templates whose end of turn is plain text)."""
    marker = "\u2063request\u2063"
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--generated-prompts needs a model with a chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=False)
    head, found, tail = text.partition(marker)
    if not found:
        raise ConfigError("--generated-prompts: this chat template does not show the user's text verbatim")
    end = tail.strip().split("\n")[0].strip()
    return list(tokenizer.encode(head, add_special_tokens=False)), [end] if end else []


# requests answered per engine call: the engine keeps up to its batch size in flight, and a run
# stopped midway keeps every finished chunk (Progress)
GENERATE_CHUNK = 2048


def generate(llm, train_prompts: list[str], heldout_prompts: list[str], cfg: TrainDrafterConfig,
             written: Sequence[str] = (), progress: Optional[Progress] = None) -> tuple[list[Sample], list[Sample]]:
    """The base model's own answers: per training prompt its greedy one and `num_samples`
    sampled ones (seeded), per written prompt (sample_prompts) and per held-out prompt its greedy
    one (held-out: what acceptance is measured on). In chunks of GENERATE_CHUNK requests, each
    kept in progress (which may hold the first ones already)."""
    from paraserve.sampling_params import SamplingParams

    greedy = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0)
    sampled = list(train_prompts)  # the shipped ones also get sampled answers
    train_prompts = sampled + list(written)
    prompts = train_prompts + heldout_prompts
    params = [greedy] * len(prompts)
    for i in range(cfg.num_samples):
        prompts += sampled
        params += [SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                  seed=cfg.train_seed * 1_000_003 + i * len(sampled) + j)
                   for j in range(len(sampled))]
    requests = [{"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": p}])} for p in prompts]
    progress = progress or Progress(None, {})
    for start in range(len(progress.answers), len(requests), GENERATE_CHUNK):
        end = min(start + GENERATE_CHUNK, len(requests))
        logger.info("train-drafter: answering requests %d-%d of %d", start + 1, end, len(requests))
        outs = llm.generate(requests[start:end], params[start:end])
        progress.answers += [(list(o.prompt_token_ids) + list(o.outputs[0].token_ids), len(o.prompt_token_ids))
                             for o in outs]
        progress.save()
    samples = [Sample(ids, n) for ids, n in progress.answers]
    n, m = len(train_prompts), len(heldout_prompts)
    return samples[:n] + samples[n + m:], samples[n:n + m]


def hidden_states(model, samples: list[Sample], max_batch_tokens: int = 2048, block_size: int = 16,
                  teacher_k: int = 0) -> tuple[list["torch.Tensor"], list[Teacher]]:
    """One teacher-forced forward per batch of samples -> per sample [T, hidden] (the model's
    dtype), the base model's final hidden states (the rows its logits are computed from), and
    with teacher_k its top-k next-token choices at every row (else an empty list)."""
    from tqdm import tqdm

    out: list[torch.Tensor] = []
    teachers: list[Teacher] = []
    bar = tqdm(total=sum(len(s.token_ids) for s in samples), desc="Hidden states", unit="tok",
               dynamic_ncols=True)
    with bar:
        for batch in _token_batches(samples, max_batch_tokens):
            hidden = _forward(model, [s.token_ids for s in batch], block_size)
            out.extend(h.clone() for h in hidden)  # normal tensors, usable by autograd
            if teacher_k:
                teachers.extend(_teacher(model, h, teacher_k) for h in hidden)
            bar.update(sum(len(s.token_ids) for s in batch))
    return out, teachers


def _teacher(model, hidden: "torch.Tensor", k: int, chunk: int = 512) -> Teacher:
    import torch

    ids, probs = [], []
    with torch.inference_mode():
        for a in range(0, len(hidden), chunk):
            # top-k of the logits, then exp(logit - logsumexp): no [chunk, V] softmax written
            # and read back (the full-vocabulary passes were most of this stage's time)
            logits = model.compute_logits(hidden[a:a + chunk])  # [chunk, V]
            top = logits.topk(k, dim=-1)  # sorted: column 0 is the argmax
            lse = _logsumexp(logits)  # [chunk, 1]
            ids.append(top.indices)
            probs.append((top.values.float() - lse).exp())
    return Teacher(torch.cat(ids).clone(), torch.cat(probs).clone())


def _logsumexp(logits: "torch.Tensor") -> "torch.Tensor":
    """[R, V] -> float32 [R, 1]; on CPU one kernel pass over the (bf16) rows, not a float32 copy
    and torch's passes over it (together 57% of the teacher's time)."""
    import torch

    from paraserve.ops import cpu

    if cpu.applies(logits) and logits.dim() == 2 and logits.stride(1) == 1:
        return cpu.kernels().logsumexp_rows(logits).unsqueeze(1)
    return torch.logsumexp(logits.float(), dim=-1, keepdim=True)


def _token_batches(samples: list[Sample], max_tokens: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for s in samples:
        if batch and sum(len(b.token_ids) for b in batch) + len(s.token_ids) > max_tokens:
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


def _forward(model, seqs: list[list[int]], block_size: int) -> list["torch.Tensor"]:
    """Fresh prefills of seqs in one forward, into a scratch KV cache (the engine's cache and
    its prefix-cached blocks stay untouched)."""
    import torch

    from paraserve.attention.backend import AttentionMetadata
    from paraserve.attention.forward_context import forward_context

    device = model.embed_tokens.weight.device
    blocks = [-(-len(s) // block_size) for s in seqs]
    first = [0]
    for b in blocks:
        first.append(first[-1] + b)
    starts = [0]
    for s in seqs:
        starts.append(starts[-1] + len(s))
    tables = torch.zeros(len(seqs), max(blocks), dtype=torch.long)
    for i, b in enumerate(blocks):
        tables[i, :b] = torch.arange(first[i], first[i] + b)
    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    slots = torch.cat([first[i] * block_size + torch.arange(len(s)) for i, s in enumerate(seqs)])
    empty = torch.zeros(0, dtype=torch.long)
    meta = AttentionMetadata(
        num_reqs=len(seqs), positions=positions.to(device), slot_mapping=slots.to(device),
        block_tables=tables.to(device), query_start_loc=starts, seq_lens=[len(s) for s in seqs],
        decode_reqs=empty, decode_tokens=empty, decode_seq_lens=empty,
        other_reqs=list(range(len(seqs))))
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)
    with torch.inference_mode(), _scratch_kv_cache(model, first[-1], block_size), forward_context(meta):
        hidden = model(ids, meta.positions)  # [T, hidden]
    return [hidden[a:b] for a, b in zip(starts, starts[1:])]


@contextlib.contextmanager
def _scratch_kv_cache(model, num_blocks: int, block_size: int) -> Iterator[None]:
    import torch

    layers = model.attention_layers()
    saved = [layer.kv_cache for layer in layers]
    weight = model.embed_tokens.weight
    try:
        for layer in layers:
            layer.kv_cache = torch.zeros(2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim,
                                         dtype=weight.dtype, device=weight.device)
        yield
    finally:
        for layer, cache in zip(layers, saved):
            layer.kv_cache = cache


def frequent_tokens(samples: list[Sample], vocab_size: int, keep: Optional[int],
                    teacher: Optional[list[Teacher]] = None) -> "torch.Tensor":
    """The `keep` token ids most frequent in the responses (ties: lower id first), ascending.
    With `teacher`: the base model's argmax at the rows that predict response tokens instead of
    the tokens themselves (the same for greedy answers; for sampled ones, what greedy decoding
    would have said there)."""
    import torch

    if keep is None or keep >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for i, s in enumerate(samples):
        if teacher:
            picked = teacher[i].ids[s.prompt_len - 1:len(s.token_ids) - 1, 0]
        else:
            picked = torch.tensor(s.token_ids[s.prompt_len:], dtype=torch.long)
        counts += torch.bincount(picked, minlength=vocab_size)[:vocab_size].double()
    order = torch.argsort(-counts, stable=True)  # stable: ties keep the lower id first
    return order[:keep].sort().values


@dataclass
class TrainingSet:
    """Every row of the training samples, concatenated, and the training positions among them.
    Position t (a row from the last prompt token on) trains offsets j = 0 .. K-1: the drafter
    reads h_t and inputs g_j = tokens[t + 1 + j] and learns the base model's choice at row
    t + 1 + j (its argmax `label`, and its top-k `soft_rows` / `soft_probs`)."""
    hidden: "torch.Tensor"  # [R, H] final hidden states
    tokens: "torch.Tensor"  # [R] token ids
    end: "torch.Tensor"  # [R] exclusive end row of the row's sample
    on_path: "torch.Tensor"  # [R] bool: the next token is the base model's argmax (greedy path)
    label: "torch.Tensor"  # [R] drafter row of the base argmax at the row; -100: not drafted
    soft_rows: "torch.Tensor"  # [R, k] drafter rows of its top-k; -1: not drafted
    soft_probs: "torch.Tensor"  # [R, k] their probabilities
    positions: "torch.Tensor"  # [N] rows t

    @property
    def num_positions(self) -> int:
        return len(self.positions)

    def batch(self, idx: "torch.Tensor", K: int, greedy_path: bool) -> "Batch":
        import torch

        t = self.positions[idx]
        rows = t.unsqueeze(1) + torch.arange(1, K + 1)  # [b, K] the rows whose choice is learnt
        valid = rows + 1 < self.end[t].unsqueeze(1)  # that choice is in the sample (as in evaluate)
        if greedy_path:  # inputs g_0 .. g_j all greedy: on_path of rows t .. t + j
            valid &= self.on_path[(rows - 1).clamp(max=len(self.tokens) - 1)].long().cumprod(1).bool()
        rows = rows.clamp(max=len(self.tokens) - 1)
        y = torch.where(valid, self.label[rows], -100)
        sr = self.soft_rows[rows].long()
        sp = self.soft_probs[rows].float() * (sr >= 0)
        sp = sp / sp.sum(-1, keepdim=True).clamp(min=1e-9)
        return Batch(self.hidden[t], self.tokens[rows], y, valid, sr, sp, self.hidden[rows])


class Batch(NamedTuple):
    h: "torch.Tensor"  # [b, H] h_t
    g: "torch.Tensor"  # [b, K] inputs g_0 .. g_{K-1}
    y: "torch.Tensor"  # [b, K] the base model's argmax after them, as drafter rows; -100: none
    valid: "torch.Tensor"  # [b, K] bool: offsets that train (in the sample, on the greedy path)
    soft_rows: "torch.Tensor"  # [b, K, k] its top-k as drafter rows; -1: not drafted
    soft_probs: "torch.Tensor"  # [b, K, k] their probabilities, renormalised over drafted ones
    target_h: "torch.Tensor"  # [b, K, H] the base model's hidden state those choices came from


def make_training_set(samples: list[Sample], hidden: list["torch.Tensor"], teacher: list[Teacher],
                      token_ids: "torch.Tensor", vocab_size: int, cfg: TrainDrafterConfig) -> TrainingSet:
    import torch

    row = torch.full((vocab_size,), -1, dtype=torch.long)
    row[token_ids] = torch.arange(len(token_ids))
    k = cfg.soft_targets
    tokens, ends, on_path, labels, srows, sprobs, positions = [], [], [], [], [], [], []
    start = 0
    for s, h, te in zip(samples, hidden, teacher):
        x = torch.tensor(s.token_ids, dtype=torch.long)
        T = len(x)
        argmax = te.ids[:, 0]
        tokens.append(x)
        ends.append(torch.full((T,), start + T, dtype=torch.long))
        on_path.append(torch.cat([x[1:] == argmax[:-1], torch.zeros(1, dtype=torch.bool)]))
        lab = row[argmax]
        labels.append(torch.where(lab >= 0, lab, -100))
        srows.append(row[te.ids[:, :k]].to(torch.int32))
        sprobs.append(te.probs[:, :k].half())
        positions.append(torch.arange(s.prompt_len - 1, T - 2) + start)  # x_{t+2} in the sample
        start += T
    return TrainingSet(torch.cat(hidden), torch.cat(tokens), torch.cat(ends), torch.cat(on_path),
                       torch.cat(labels), torch.cat(srows), torch.cat(sprobs), torch.cat(positions))


def make_examples(samples: list[Sample], hidden: list["torch.Tensor"], token_ids: "torch.Tensor",
                  vocab_size: int, K: int) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """Every response position t (from the last prompt token on, with a target left): h_t,
    inputs g = x_{t+1} .. x_{t+K}, targets x_{t+2} .. x_{t+K+1} as drafter rows.
    Returns h [N, H], g [N, K], y [N, K] (-100: past the end, or not in the draft vocabulary)."""
    import torch

    row = torch.full((vocab_size,), -100, dtype=torch.long)
    row[token_ids] = torch.arange(len(token_ids))
    hs, gs, ys = [], [], []
    for s, h in zip(samples, hidden):
        x = torch.tensor(s.token_ids, dtype=torch.long)
        T = len(x)
        t = torch.arange(s.prompt_len - 1, T - 2)  # [n] positions with x_{t+2} in the sample
        if not len(t):
            continue
        offs = t.unsqueeze(1) + torch.arange(1, K + 2)  # [n, K + 1]: t+1 .. t+K+1
        valid = offs < T
        tok = torch.where(valid, x[offs.clamp(max=T - 1)], 0)
        hs.append(h[t])
        gs.append(tok[:, :-1])
        ys.append(torch.where(valid[:, 1:], row[tok[:, 1:]], -100))
    return torch.cat(hs), torch.cat(gs), torch.cat(ys)


def fit(drafter: "ReDrafter", data: TrainingSet, embed, cfg: TrainDrafterConfig,
        after_epoch: Optional[Callable[[int], None]] = None) -> float:
    """AdamW over shuffled positions; loss = sum over offsets of the mean cross-entropy against
    the base model's argmax ((1 - soft_weight) of it) and its top-k distribution (soft_weight;
    with soft_targets > 0). Returns the last epoch's mean loss."""
    import math

    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    N, K = data.num_positions, cfg.beam_length
    p_drop = cfg.dropout
    train_embed = (lambda ids: F.dropout(embed(ids).float(), p_drop)) if p_drop else embed
    soft = cfg.soft_targets > 0
    w_soft = cfg.soft_weight if soft else 0.0
    steps_per_epoch = -(-N // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = min(50, total // 10 + 1)
    drafter.lm_head.weight.requires_grad_(cfg.train_lm_head)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(i, total) / total))))
    gen = torch.Generator().manual_seed(cfg.train_seed)
    drafter.train()
    epoch_loss = float("nan")
    bar = tqdm(total=total, desc="Training drafter", unit="step", dynamic_ncols=True)
    with bar:
        for epoch in range(cfg.epochs):
            perm = torch.randperm(N, generator=gen)
            run_loss, run_n = 0.0, 0
            for i in range(steps_per_epoch):
                idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                h, g, y, valid, sr, sp, target_h = data.batch(idx, K, cfg.greedy_path)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                    logits, feats = drafter(F.dropout(h.float(), p_drop) if p_drop else h, g, train_embed,
                                            return_features=True)  # [b, K, Vd], [b, K, H]
                logp = torch.log_softmax(logits.float(), dim=-1)
                hard_ok = (y >= 0).float()
                hard = -logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [b, K]
                loss = (1 - w_soft) * ((hard * hard_ok).sum(0) / hard_ok.sum(0).clamp(min=1)).sum()
                if soft:
                    soft_ok = valid.float()
                    ce = -(sp * logp.gather(-1, sr.clamp(min=0))).sum(-1)  # [b, K]
                    loss = loss + w_soft * ((ce * soft_ok).sum(0) / soft_ok.sum(0).clamp(min=1)).sum()
                if cfg.feature_loss:
                    ok = valid.float()
                    l1 = F.smooth_l1_loss(feats.float(), target_h.float(), reduction="none").mean(-1)  # [b, K]
                    loss = loss + cfg.feature_loss * ((l1 * ok).sum(0) / ok.sum(0).clamp(min=1)).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                run_loss += loss.item()
                run_n += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{run_loss / run_n:.3f}")
            epoch_loss = run_loss / max(run_n, 1)
            logger.info("epoch %d/%d: loss %.3f (sum over %d offsets)", epoch + 1, cfg.epochs, epoch_loss, K)
            if after_epoch is not None:
                drafter.eval()
                after_epoch(epoch)
                drafter.train()
    drafter.requires_grad_(True).eval()
    return epoch_loss


def evaluate(drafter: "ReDrafter", samples: list[Sample], hidden: list["torch.Tensor"], embed,
             width: int, length: int, batch: int = 256) -> tuple[float, float]:
    """Mean accepted length over every response position of greedy samples: the longest matching
    prefix over the beams (tree verification) + 1, and beam 0's alone + 1."""
    import torch

    from paraserve.spec_decode.redrafter import beam_search

    h, g, _ = make_examples(samples, hidden, drafter.token_ids, drafter.config.base_vocab_size, length)
    if not len(h):
        return float("nan"), float("nan")
    ref, valid = _continuations(samples, length)  # [N, L] the greedy continuation after g_0
    best, top = [], []
    for a in range(0, len(h), batch):
        with torch.no_grad():  # also for a drafter in training (--init-from's, before it trains)
            beams = beam_search(drafter, h[a:a + batch], g[a:a + batch, 0], embed, width, length).token_ids
        match = (beams == ref[a:a + batch].unsqueeze(1)) & valid[a:a + batch].unsqueeze(1)  # [b, W, L]
        accepted = match.long().cumprod(-1).sum(-1)  # [b, W]
        best.append(accepted.max(-1).values)
        top.append(accepted[:, 0])
    return (torch.cat(best).float().mean().item() + 1, torch.cat(top).float().mean().item() + 1)


def vocab_coverage(samples: list[Sample], token_ids: "torch.Tensor") -> float:
    import torch

    tokens = torch.tensor([t for s in samples for t in s.token_ids[s.prompt_len:]], dtype=torch.long)
    return float(torch.isin(tokens, token_ids).float().mean()) if len(tokens) else float("nan")


def _continuations(samples: list[Sample], L: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """For make_examples' positions: x_{t+2} .. x_{t+L+1} [N, L], and which exist [N, L]."""
    import torch

    refs, valids = [], []
    for s in samples:
        x = torch.tensor(s.token_ids, dtype=torch.long)
        T = len(x)
        t = torch.arange(s.prompt_len - 1, T - 2)
        if not len(t):
            continue
        offs = t.unsqueeze(1) + torch.arange(2, L + 2)  # [n, L]
        refs.append(x[offs.clamp(max=T - 1)])
        valids.append(offs < T)
    return torch.cat(refs), torch.cat(valids)
