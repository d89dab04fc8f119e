"""Text prompt sets shipped for `paraserve bench spec`.

Speculative decoding pays only where the model's next tokens are predictable, so random token
ids (workload.py) would measure nothing useful here: these are real requests, rendered with the
model's chat template. "chat" holds user-style questions (none of them in the drafter's training
prompts, spec_decode/prompts.txt, so ReDrafter is measured on held-out text); "code" holds
complete/refactor/rename requests whose answers repeat identifiers and whole lines of the
prompt, which is where prompt lookup (n-gram) helps. "long" asks about long contexts built from
shipped text (a module of every code snippet, ~2.1k tokens with SmolLM2's tokenizer; a list of
the drafter's training questions, ~4k tokens): each draft-tree node attends over the whole
context, so this is where speculation costs most per node (SpecConfig.tree_context_budget).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

_DIR = os.path.dirname(__file__)
# name -> (file, format): "lines" is one prompt per line; "blocks" are separated by a line "%%"
PROMPT_SETS: dict[str, tuple[str, str]] = {"chat": ("spec_chat_prompts.txt", "lines"),
                                           "code": ("spec_code_prompts.txt", "blocks")}
BLOCK_SEPARATOR = "%%"
# "long": (context, instruction) pairs; the contexts are built from shipped files
LONG_TASKS: list[tuple[str, str]] = [
    ("code", "Summarize in one line each what every function and class above does."),
    ("code", "List the names of all functions and classes defined above."),
    ("code", "Rewrite the first function above with type hints and a docstring."),
    ("code", "Which functions above could raise an exception? Explain briefly."),
    ("questions", "Which of the questions above are about cooking or food? List them."),
    ("questions", "Group the questions above into five topics and name each topic."),
    ("questions", "Pick three questions above and answer each in one sentence."),
    ("questions", "Which questions above ask for a definition? List them."),
]
LONG_QUESTIONS_CHARS = 16000  # of spec_decode/prompts.txt: ~4k tokens


def parse_prompts(text: str, fmt: str) -> list[str]:
    if fmt == "lines":
        prompts = [line.strip() for line in text.splitlines()]
    elif fmt == "blocks":
        blocks, current = [], []
        for line in text.splitlines():
            if line.strip() == BLOCK_SEPARATOR:
                blocks.append("\n".join(current))
                current = []
            else:
                current.append(line)
        prompts = [b.strip() for b in blocks + ["\n".join(current)]]
    else:
        raise ValueError(f"unknown prompt file format {fmt!r}")
    return [p for p in prompts if p]


def load_prompt_set(name: str) -> list[str]:
    if name == "long":
        return long_prompts()
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose from {', '.join([*PROMPT_SETS, 'long'])}")
    file, fmt = PROMPT_SETS[name]
    with open(os.path.join(_DIR, file), encoding="utf-8") as f:
        return parse_prompts(f.read(), fmt)


def long_prompts() -> list[str]:
    """LONG_TASKS' instructions after their contexts: "code", every code snippet of the "code"
    set as one module; "questions", the start of the drafter's training questions, one a line."""
    from paraserve.spec_decode.train_drafter import PROMPTS_FILE

    snippets = [p.split("```")[1].removeprefix("python").strip("\n") for p in load_prompt_set("code")]
    with open(PROMPTS_FILE, encoding="utf-8") as f:
        questions = f.read()[:LONG_QUESTIONS_CHARS].rsplit("\n", 1)[0]
    contexts = {"code": "```python\n" + "\n\n\n".join(snippets) + "\n```",
                "questions": "Questions people asked:\n" + questions}
    return [f"{contexts[kind]}\n\n{instruction}" for kind, instruction in LONG_TASKS]


def render(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as one user turn through the chat template, ready for the assistant's answer;
    plain text (with the tokenizer's special tokens) when the model has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return [list(tokenizer.encode(p, add_special_tokens=True)) for p in prompts]
    out = []
    for p in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        out.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
    return out


def take(items: Sequence[Any], n: int) -> list[Any]:
    """The first n items, starting over when the set is shorter (repeats then share a prefix,
    which only makes their prefill cheaper: decode, what is measured, is unchanged)."""
    if not items:
        raise ValueError("empty prompt set")
    return [items[i % len(items)] for i in range(n)]
