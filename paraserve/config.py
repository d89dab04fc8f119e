"""Engine configuration: frozen dataclasses, validated once, composed in EngineConfig.

Defaults live here only; the CLI builds its flags from these fields (and their `help`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A user-facing configuration problem: one line saying what is wrong and what to do."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ModelConfig:
    model: Optional[str] = _f(None, "HF checkpoint directory or .gguf file; default: embedded SmolLM2-135M-Instruct")
    tokenizer: Optional[str] = _f(None, "tokenizer directory (default: the model's)")
    dtype: str = _f("auto", "weights and activations dtype", choices=("auto", "float32", "bfloat16", "float16"))
    max_model_len: Optional[int] = _f(None, "context length (default: the model's max positions)")
    seed: int = _f(0, "seed for requests without their own seed")
    served_model_name: Optional[str] = _f(None, "model name reported by the API")
    enforce_eager: bool = _f(False, "run every step module by module in Python (no C++ decoder "
                                    "stack for CPU decode steps)")

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"--max-model-len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = _f(16, "tokens per KV cache block")
    kv_cache_memory: Optional[str] = _f(None, "KV cache budget, e.g. 2GiB or 512MiB (default: a share of free memory)")
    num_gpu_blocks_override: Optional[int] = _f(None, "force the number of KV blocks (testing)")
    enable_prefix_caching: bool = _f(True, "reuse KV blocks of shared prompt prefixes")
    kv_cache_dtype: str = _f("auto", "KV cache dtype", choices=("auto",))

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two, got {self.block_size}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ConfigError("--num-gpu-blocks-override must be >= 1")
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = _f(64, "max requests running in one step")
    max_num_batched_tokens: int = _f(2048, "token budget of one step (prefill chunks + decodes)")
    enable_chunked_prefill: bool = _f(True, "split long prompts across steps")

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}")


EXECUTOR_BACKENDS = ("mp", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    """How many processes run the model and how it is split over them (vLLM's flags). World size
    = tensor x context parallel; experts are partitioned over `expert_parallel_size` of them."""
    tensor_parallel_size: int = _f(1, "tensor parallel ranks: attention heads, MLP and vocabulary split")
    context_parallel_size: int = _f(1, "context parallel ranks (a power of two): prefill split zigzag "
                                       "with ring attention, the KV cache striped over them")
    cp_local_size: Optional[int] = _f(None, "CP ranks per node for the two-level BurstAttention ring "
                                            "(default: one flat ring)")
    enable_expert_parallel: bool = _f(False, "partition MoE experts over every rank instead of "
                                             "splitting each expert over the tensor parallel ranks")
    expert_parallel_size: Optional[int] = _f(None, "ranks the MoE experts are partitioned over "
                                                   "(default: 1, or all with --enable-expert-parallel)")
    num_redundant_experts: int = _f(0, "extra replicas of the hottest experts (EPLB-style placement)")
    expert_load_history: Optional[str] = _f(
        None, "JSON file of a previous run's per-layer expert loads ({layer: [count per expert]}, as "
              "LLM.engine.expert_load() returns) that places the redundant experts (default: none, "
              "every expert counts as equally hot)")
    distributed_executor_backend: Optional[str] = _f(
        None, "how worker processes are run: mp (this host) or ray (a Ray cluster, may span hosts); "
              "default: in-process for one rank, mp otherwise", choices=EXECUTOR_BACKENDS)

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "context_parallel_size", "expert_parallel_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.num_redundant_experts < 0:
            raise ConfigError(f"--num-redundant-experts must be >= 0, got {self.num_redundant_experts}")
        cp = self.context_parallel_size
        if cp & (cp - 1):
            raise ConfigError(f"--context-parallel-size must be a power of two, got {cp}")
        if self.cp_local_size is not None and (self.cp_local_size < 1 or cp % self.cp_local_size):
            raise ConfigError(f"--cp-local-size {self.cp_local_size} must divide --context-parallel-size {cp}")
        if self.distributed_executor_backend not in (None, *EXECUTOR_BACKENDS):
            raise ConfigError(f"--distributed-executor-backend must be one of {', '.join(EXECUTOR_BACKENDS)}, "
                              f"got {self.distributed_executor_backend!r}")
        layout = self.layout()  # raises ConfigError for layouts that do not fit together
        if self.expert_load_history is not None:
            if not self.num_redundant_experts:
                raise ConfigError("--expert-load-history places redundant experts: give --num-redundant-experts too")
            load_expert_history(self.expert_load_history)
        if self.num_redundant_experts and layout.ep == 1:
            raise ConfigError("--num-redundant-experts needs expert parallelism "
                              "(--enable-expert-parallel or --expert-parallel-size > 1)")
        if cp > 1 and layout.ep > 1:
            raise ConfigError("context parallelism with expert parallelism is not supported yet")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.context_parallel_size

    @property
    def executor_backend(self) -> Optional[str]:
        """None: the one worker runs in the engine's own process."""
        if self.distributed_executor_backend is None and self.world_size == 1:
            return None
        return self.distributed_executor_backend or "mp"

    def layout(self):
        """The ParallelLayout (distributed.parallel_state) of these sizes."""
        from paraserve.distributed.parallel_state import ParallelLayout

        return ParallelLayout.build(self.world_size, self.tensor_parallel_size,
                                    self.context_parallel_size, self.expert_parallel_size,
                                    self.enable_expert_parallel)


@dataclass(frozen=True)
class DeviceConfig:
    device: str = _f("auto", "cpu, cuda or auto")
    threads: Optional[int] = _f(None, "torch threads (default: all cores)")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    max_queue: int = 256  # requests waiting beyond the running batch before 429
    graceful_timeout: float = 30.0  # seconds running requests get to finish on SIGTERM


# Speculation is switched off for a step when more requests than this are running (vLLM's
# disable_by_batch_size). A verification adds the tree's nodes to every request's rows: at batch
# 1 decode is bound by reading the weights and the extra rows are nearly free, but once the batch
# alone fills the step they cost more than they save. Measured with speculation forced on
# (`paraserve bench spec --batch-sizes 2,4,8`, SmolLM2-135M bf16, 2-core Xeon with AMX,
# benchmarks/results/spec.txt), speedup over plain decoding on chat / code prompts:
#   ReDrafter  batch 2: 1.22x / 2.06x, batch 4: 0.98x / 1.47x, batch 8: 0.77x / 1.21x
#   n-gram     batch 2: 0.99x / 1.50x, batch 4: 0.92x / 1.32x, batch 8: 0.86x / 1.26x
# (an earlier run: ReDrafter 1.23 / 1.00 / 0.81x on chat). 4 keeps the wins up to batch 4 (chat
# about breaks even there) and stops before chat loses 15-25%.
DEFAULT_SPEC_MAX_RUNNING = 4
# Without AMX (a 2-core AMD EPYC, Zen 4: the weights' products cost what one row does up to ~10
# rows, then ~0.5 ms a row), the same command with step_draft_budget 16
# (benchmarks/results/spec-epyc.txt): ReDrafter batch 2: 1.02x / 1.61x, batch 4: 0.83x / 1.08x,
# batch 8: 0.63x / 1.01x (an earlier run: 1.03x / 1.55x, 0.74x / 1.29x, 0.72x / 0.99x). Chat
# loses from batch 3 or 4, so speculation stops above 2 there.
DEFAULT_SPEC_MAX_RUNNING_NO_AMX = 2


def _has_amx() -> bool:
    """From the CPU's flags: no kernel build needed."""
    from paraserve.ops import cpu

    return "amx_tile" in cpu.cpu_flags().split()


def default_spec_max_running() -> int:
    """disable_by_batch_size's default for this CPU."""
    return DEFAULT_SPEC_MAX_RUNNING if _has_amx() else DEFAULT_SPEC_MAX_RUNNING_NO_AMX


# Default SpecConfig.step_draft_budget: the draft trees of one step hold at most this many nodes
# in all, shared evenly by the requests drafting (the nodes likeliest to be accepted, the lookup
# beam's and the drafter's: redrafter._likeliest). Every node is one more row of the step's
# weight products.
# With AMX the tile products take 16 rows at once: 16. Not measured there.
DEFAULT_STEP_DRAFT_BUDGET = 16
# Without AMX (AMD EPYC Zen 4, bf16_gemm.cpp): the panel kernel runs up to 10 rows in one pass,
# at the cost of one row; each row past 10 adds ~0.6 ms to a ~7.5 ms forward. 9 keeps a batch-1
# tree and its root in one pass. Batch 1, greedy, 8 prompts x 128 tokens, lookup_min 2:
#   chat: 16 -> 2.37 tokens per verification, 9.7 rows a step (31% of steps past 10 rows);
#         9 -> 2.32, 9.0 rows (none past 10); median of 8 alternating runs 140.0 -> 143.4 tok/s
#   code: 16 -> 3.32, 15.5 rows (66% past 10); 9 -> 3.25; with lookup_min 1 and 16 (the earlier
#         defaults) against 2 and 9: median of 6 alternating runs 168.2 -> 188.2 tok/s
# Speculation forced on at batch 2 / 4 / 8 (spec-epyc.txt), ReDrafter chat: 1.16x / 0.93x / 0.80x
# with 9 against 1.02x / 0.83x / 0.63x with 16; code 1.78x / 1.29x / 0.94x against 1.61x / 1.08x.
# 9 -> 7 once the panel kernels spread their prefetches (vec.h, prefetch_stream): rows up to ~6
# then run at the weight stream's pace and each row past that costs ~0.5 ms of VDPBF16PS work, so
# the last two nodes cost more than they gave. Batch 1, 8 prompts x 128 tokens, alternating runs:
#   chat: 437 -> 447 steps (2.34 -> 2.29 tokens per verification; over all 32 prompts offline
#         2.351 -> 2.292), faster in 5 of 5 pairs (median +5.8%, 183-194 -> 188-206 tok/s); 8 and
#         6 were slower than 7 in 3 of 4 rounds
#   code: 200 -> 210 steps, even (three pairs: -1%, +5%, -2%)
DEFAULT_STEP_DRAFT_BUDGET_NO_AMX = 7


def default_step_draft_budget() -> int:
    """step_draft_budget's default for this CPU (see DEFAULT_STEP_DRAFT_BUDGET)."""
    return DEFAULT_STEP_DRAFT_BUDGET if _has_amx() else DEFAULT_STEP_DRAFT_BUDGET_NO_AMX


SPEC_METHODS = ("redrafter", "ngram")
# ReDrafter's default min_draft_prob: with the shipped SmolLM2 drafter, 0.05 drafted ~10% faster
# at batch 1 than verifying every beam in full (fewer tree nodes, shorter searches; README)
DEFAULT_MIN_DRAFT_PROB = 0.05
# Default SpecConfig.tree_context_budget: a draft tree holds at most max(1, budget / context
# length) nodes. Each node attends over the whole context, so verifying a tree of n nodes costs
# ~n x context of attention on top of a plain step's. On the vector attention path (CPUs without
# AMX) that was ~0.3 ms per node at 150 tokens of context, ~1.8 ms at 2k and ~4 ms at 4k
# (SmolLM2 bf16), and `paraserve bench spec --prompt-sets long` (2k- and 4k-token contexts,
# batch 1) gave ReDrafter 1.00x of plain unbounded, 1.14x with 4096, 1.19x with 8192, 1.06x
# with 16384. The AMX path shares each context chunk among a tree's nodes (a 12-node tree at 2k:
# +0.5 ms per node for the whole decoder stack): there the bound hardly matters at 2-4k, 1.64x
# with 8192 against 1.66x unbounded (benchmarks/results/spec-long*.txt; other runs: 1.67x, 1.68x,
# 1.68x with 16384, 1.65x with 32768). Since the vector path shares a tree's context tiles too
# (up to 4 nodes a walk; a node ~0.8 ms at 2k for the stack), the AMD EPYC gave 1.38x with 8192,
# 1.57x with 16384 and 1.63x unbounded (with the earlier kernel: 1.43x, 1.35x), hence 16384: at
# 8k tokens of context a tree still holds 2 nodes, whose attention there costs about a plain step.
DEFAULT_TREE_CONTEXT_BUDGET = 16384
_SPEC_ONLY = {"redrafter": ("beam_width", "beam_length", "drafter_path", "min_draft_prob", "lookup_beam",
                            "lookup_length", "drafter_int8"),
              "ngram": ()}
# ReDrafter's default lookup_beam: the prompt-lookup draft joins the drafter's beams in the tree
DEFAULT_LOOKUP_BEAM = True
# The lookup beam's default prompt_lookup_min (method ngram's stays 1). A one-token match proposes
# four tokens on little evidence: on chat prompts (batch 1, 8 x 128 tokens, AMD EPYC) 1 -> 2 cut
# the tree from 10.6 to 9.7 rows a step for 2.42 -> 2.37 tokens per verification, and ran ~5%
# faster (median of 8 alternating runs 132.9 -> 140.0 tok/s; 4 others: 153-160 -> 164-169);
# 3 was between them; code prompts were no slower (3.35 -> 3.32 tokens per verification).
DEFAULT_LOOKUP_BEAM_MIN = 2
# Prompt lookup's longest suffix matched (ngram and the lookup beam), and the tokens it proposes:
# ngram's num_speculative_tokens and the lookup beam's lookup_length (was 3 and 4, the beam
# length). A copy from the context tends to go on: offline, over the 32 bench prompts of each set
# (every position of their greedy answers, the drafter's nodes beside the lookup beam in a
# 9-node tree), max 3 / 4 tokens -> 5 / 8 gave 2.30 -> 2.33 tokens per verification on chat and
# 2.96 -> 3.25 on code; ngram alone 1.26 -> 1.28 and 1.83 -> 2.02. A longer match (min 3) lost
# more than it saved. The tree budgets still bound the nodes (the likeliest of both kinds).
DEFAULT_LOOKUP_MAX = 5
DEFAULT_LOOKUP_TOKENS = 8


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding, given as JSON (`--speculative-config`) or a dict (`LLM(...,
    speculative_config={...})`). Options of the other method are an error, not ignored; the
    unset ones of this method get their defaults in __post_init__."""
    method: str  # "redrafter" | "ngram"
    # ngram: tokens per draft (default DEFAULT_LOOKUP_TOKENS); redrafter: the beam length (vLLM's
    # name for it)
    num_speculative_tokens: Optional[int] = None
    beam_width: Optional[int] = None  # redrafter: beams per request (default 4)
    beam_length: Optional[int] = None  # redrafter: tokens per beam (default 4)
    # redrafter: a directory written by `paraserve train-drafter`; default: the drafter shipped
    # for the model in paraserve/spec_decode/drafters/<model name>/
    drafter_path: Optional[str] = None
    # redrafter: verify a drafted token only while the drafter gives its beam prefix at least this
    # probability (default DEFAULT_MIN_DRAFT_PROB; 0 verifies every beam in full)
    min_draft_prob: Optional[float] = None
    # redrafter: also verify the prompt-lookup draft (method ngram's) as one more beam of the tree;
    # output is unchanged, copies from the context get accepted too
    lookup_beam: Optional[bool] = None  # default DEFAULT_LOOKUP_BEAM
    # redrafter: tokens the lookup beam proposes (default DEFAULT_LOOKUP_TOKENS; it may be longer
    # than the drafter's beams)
    lookup_length: Optional[int] = None
    # redrafter: run the drafter's layers with int8 weights and activations on AMX tiles or
    # AVX-512 VNNI (ops/csrc/int8_gemm.cpp). Drafts only, so output is unchanged; the beam search
    # reads half the bytes (on AMX 1.4 -> 0.8 ms a search at batch 1). Default (None): on where
    # the CPU has either (on a Zen 4, chat ran ~9% faster: redrafter.compiled_head).
    drafter_int8: Optional[bool] = None
    # ngram, and redrafter's lookup beam: shortest and longest suffix matched (default 1 and 5;
    # 2 and 5 for the lookup beam: DEFAULT_LOOKUP_BEAM_MIN, DEFAULT_LOOKUP_MAX)
    prompt_lookup_min: Optional[int] = None
    prompt_lookup_max: Optional[int] = None
    # default: default_spec_max_running() (4 with AMX, 2 without; see DEFAULT_SPEC_MAX_RUNNING)
    disable_by_batch_size: Optional[int] = None
    # a request's draft tree holds at most max(1, this / its context length) nodes (redrafter:
    # the nodes likeliest to be accepted, the lookup beam's and the drafter's; ngram: the
    # draft cut to that many); 0: no bound. See DEFAULT_TREE_CONTEXT_BUDGET.
    tree_context_budget: Optional[int] = None
    # a step's draft trees hold at most this many nodes in all, max(1, this / requests drafting)
    # each (the likeliest, as with tree_context_budget); 0: no bound. Default:
    # default_step_draft_budget() (16 with AMX, 7 without; see DEFAULT_STEP_DRAFT_BUDGET).
    step_draft_budget: Optional[int] = None

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ConfigError(f"speculative-config: unknown method {self.method!r}; choose from "
                              f"{', '.join(SPEC_METHODS)}")
        for name in ("num_speculative_tokens", "beam_width", "beam_length", "lookup_length", "prompt_lookup_min",
                     "prompt_lookup_max", "disable_by_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"speculative-config: {name} must be an integer >= 1, got {value!r}")
        for name in ("tree_context_budget", "step_draft_budget"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"speculative-config: {name} must be an integer >= 0 (0: no bound), got {value!r}")
        b = self.tree_context_budget
        p = self.min_draft_prob
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1):
            raise ConfigError(f"speculative-config: min_draft_prob must be a number in [0, 1), got {p!r}")
        if self.lookup_beam is not None and not isinstance(self.lookup_beam, bool):
            raise ConfigError(f"speculative-config: lookup_beam must be true or false, got {self.lookup_beam!r}")
        if self.drafter_int8 is not None and not isinstance(self.drafter_int8, bool):
            raise ConfigError(f"speculative-config: drafter_int8 must be true or false, got {self.drafter_int8!r}")
        if self.drafter_path is not None and not isinstance(self.drafter_path, str):
            raise ConfigError(f"speculative-config: drafter_path must be a string, got {self.drafter_path!r}")
        other = [n for m, names in _SPEC_ONLY.items() if m != self.method for n in names
                 if getattr(self, n) is not None]
        if other:
            own = ["num_speculative_tokens", *_SPEC_ONLY[self.method], "prompt_lookup_min",
                   "prompt_lookup_max", "disable_by_batch_size", "tree_context_budget", "step_draft_budget"]
            raise ConfigError(f"speculative-config: {', '.join(other)} is not an option of method "
                              f"{self.method!r} (its options: {', '.join(own)})")
        k = self.num_speculative_tokens
        lookup = self.method == "ngram" or self.lookup_beam is not False
        if not lookup and (self.prompt_lookup_min is not None or self.prompt_lookup_max is not None
                           or self.lookup_length is not None):
            raise ConfigError("speculative-config: prompt_lookup_min/max and lookup_length configure the "
                              "lookup beam, which lookup_beam false turns off")
        default_lo = DEFAULT_LOOKUP_BEAM_MIN if self.method == "redrafter" else 1
        lo = self.prompt_lookup_min or min(default_lo, self.prompt_lookup_max or default_lo)
        hi = self.prompt_lookup_max or max(DEFAULT_LOOKUP_MAX, lo)
        if lo > hi:
            raise ConfigError(f"speculative-config: prompt_lookup_min ({lo}) exceeds "
                              f"prompt_lookup_max ({hi})")
        if lookup:
            self._set(prompt_lookup_min=lo, prompt_lookup_max=hi)
        if b is None:
            self._set(tree_context_budget=DEFAULT_TREE_CONTEXT_BUDGET)
        if self.step_draft_budget is None:
            self._set(step_draft_budget=default_step_draft_budget())
        if self.disable_by_batch_size is None:
            self._set(disable_by_batch_size=default_spec_max_running())
        if self.method == "redrafter":
            if k is not None and self.beam_length is not None and k != self.beam_length:
                raise ConfigError(f"speculative-config: num_speculative_tokens ({k}) and beam_length "
                                  f"({self.beam_length}) disagree; give one of them")
            length = self.beam_length or k or 4
            self._set(beam_width=self.beam_width or 4, beam_length=length, num_speculative_tokens=length,
                      min_draft_prob=DEFAULT_MIN_DRAFT_PROB if p is None else float(p),
                      lookup_beam=DEFAULT_LOOKUP_BEAM if self.lookup_beam is None else self.lookup_beam)
            if self.lookup_beam:
                self._set(lookup_length=self.lookup_length or DEFAULT_LOOKUP_TOKENS)
        else:
            self._set(num_speculative_tokens=k or DEFAULT_LOOKUP_TOKENS)

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def parse(cls, value: Any) -> Optional["SpecConfig"]:
        """None, a SpecConfig, a dict or a JSON object string -> a SpecConfig (None: off)."""
        if value is None or isinstance(value, SpecConfig):
            return value
        if isinstance(value, str):
            value = parse_json_object(value, "--speculative-config", '{"method": "ngram"}')
            if value is None:
                return None
        if not isinstance(value, dict):
            raise ConfigError("speculative-config must be a JSON object such as '{\"method\": \"ngram\"}', "
                              f"got {type(value).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ConfigError(f"speculative-config: unknown key(s) {', '.join(map(repr, unknown))}; "
                              f"known keys: {', '.join(known)}")
        if "method" not in value:
            raise ConfigError(f"speculative-config needs a \"method\": one of {', '.join(SPEC_METHODS)}")
        return cls(**value)


@dataclass(frozen=True)
class _SpecArg:
    """The engine argument that carries a SpecConfig (as JSON on the command line)."""
    speculative_config: Optional[str] = _f(
        None, "speculative decoding, a JSON object: {\"method\": \"ngram\" | \"redrafter\", "
              "\"num_speculative_tokens\", \"beam_width\", \"beam_length\", \"drafter_path\", "
              "\"min_draft_prob\", \"lookup_beam\", \"prompt_lookup_min\", \"prompt_lookup_max\", "
              "\"disable_by_batch_size\", \"tree_context_budget\", \"step_draft_budget\"} (default: off)")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    speculative: Optional[SpecConfig] = None  # engine argument `speculative_config`

    def __post_init__(self) -> None:
        if self.speculative is not None and self.parallel.context_parallel_size > 1:
            raise ConfigError("speculative decoding with --context-parallel-size > 1 is not supported yet")

    @property
    def kv_block_tokens(self) -> int:
        """Tokens in one scheduler block: with context parallelism a block spans the CP ranks,
        each storing --block-size of its positions."""
        return self.cache.block_size * self.parallel.context_parallel_size

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat vLLM-style engine args (dtype=..., max_num_seqs=...,
        speculative_config={...} or its JSON)."""
        spec = SpecConfig.parse(kwargs.pop("speculative_config", None))
        parts = {}
        for part in _part_fields():
            sub_cls = part.default_factory  # type: ignore[misc]
            names = {f.name for f in dataclasses.fields(sub_cls)}
            parts[part.name] = sub_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        if kwargs:
            raise ConfigError(f"unknown engine argument(s): {', '.join(sorted(kwargs))}")
        return cls(**parts, speculative=spec)

    def replace(self, **kwargs: Any) -> "EngineConfig":
        flat = {f.name: getattr(sub, f.name) for sub in self.parts() for f in dataclasses.fields(sub)}
        flat["speculative_config"] = self.speculative
        flat.update(kwargs)
        return EngineConfig.from_kwargs(**flat)

    def parts(self) -> list[Any]:
        return [getattr(self, f.name) for f in _part_fields()]


def _part_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EngineConfig) if f.default_factory is not dataclasses.MISSING]


def engine_fields() -> list[dataclasses.Field]:
    """Every flat engine argument, in order, for the CLI."""
    out = []
    for part in _part_fields():
        out.extend(dataclasses.fields(part.default_factory))  # type: ignore[arg-type]
    out.extend(dataclasses.fields(_SpecArg))
    return out


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30}


def load_expert_history(path: str) -> dict[int, list[float]]:
    """--expert-load-history's file -> {MoE layer index: load per expert}; one-line errors."""
    import json

    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise ConfigError(f"--expert-load-history {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--expert-load-history {path} is not valid JSON ({e.msg})") from None
    try:
        history = {int(k): [float(x) for x in v] for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError):
        raise ConfigError(f"--expert-load-history {path} must map layer indices to lists of numbers, "
                          'e.g. {"0": [12, 3, 40, 5]}') from None
    if any(not v or min(v) < 0 for v in history.values()):
        raise ConfigError(f"--expert-load-history {path}: every layer needs non-negative loads")
    return history


def parse_json_object(text: str, flag: str, example: str) -> Optional[dict]:
    """A flag's JSON object (None for blank text), or a one-line ConfigError naming the flag."""
    import json

    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} is not valid JSON ({e.msg} at character {e.pos}): give an object "
                          f"such as '{example}'") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object such as '{example}', got {type(value).__name__}")
    return value


def parse_bytes(text: str) -> int:
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise ConfigError(f"cannot read memory size {text!r}: use a number with a unit, e.g. 2GiB or 512MiB")
    return int(value * _UNITS[unit])
