"""train-drafter's generated data, kept on disk (`--data-dir`) so that another run asking for the
same data (same model, prompts and generation options) trains on it at once.

Generating the data is most of a run: on the 2-core CPU the shipped drafter's 8,000 written
prompts took 6 min to write, 29 min to answer and 19 min to turn into hidden states, its 1.6M
positions 15 min to train on. With the data kept, trying other training options (epochs, head
size, learning rate, loss weights, draft vocabulary) costs the training alone.

A directory holds, per data key, `<key hash>.pt` (the samples, the base model's hidden states
and its top-k next-token choices) and the key in readable form (`<key hash>.json`). Until the
hidden-state pass ends, `<key hash>.samples.pt` holds the answers alone: a run stopped during
that pass resumes from them. Before that, `<key hash>.progress.pt` holds the written prompts and
the answers so far (saved after every chunk of requests): a run stopped while answering resumes
where it was. Files are written to a temporary name and renamed, so an interrupted run leaves
no half file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

if TYPE_CHECKING:
    import torch

    from paraserve.spec_decode.train_drafter import Sample, Teacher, TrainDrafterConfig

logger = logging.getLogger("paraserve")

FORMAT = 1  # bump when what is stored, or how it is generated, changes


class DrafterData(NamedTuple):
    train: list["Sample"]
    heldout: list["Sample"]
    train_hidden: list["torch.Tensor"]
    train_teacher: list["Teacher"]
    heldout_hidden: list["torch.Tensor"]


def data_key(cfg: "TrainDrafterConfig", model_name: str, dtype: str, prompts_file: str) -> dict[str, Any]:
    """What determines the generated data; runs with equal keys may share it."""
    with open(prompts_file, "rb") as f:
        prompts = hashlib.sha256(f.read()).hexdigest()
    names = ("num_prompts", "num_heldout", "generated_prompts", "max_tokens", "num_samples",
             "temperature", "train_seed")
    return {"format": FORMAT, "model": model_name, "dtype": dtype, "prompts_sha256": prompts,
            "teacher_k": max(1, cfg.soft_targets), **{n: getattr(cfg, n) for n in names}}


def _path(data_dir: str, key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(data_dir, digest)


def load_data(data_dir: str, key: dict[str, Any]) -> Optional[DrafterData]:
    """The data kept for `key`, or None when there is none."""
    import torch

    from paraserve.spec_decode.train_drafter import Teacher

    path = _path(data_dir, key) + ".pt"
    if not os.path.isfile(path):
        return None
    logger.info("train-drafter: reusing the generated data in %s", path)
    raw = torch.load(path, weights_only=True)
    teacher = [Teacher(i, p) for i, p in zip(raw["teacher_ids"], raw["teacher_probs"])]
    return DrafterData(*_samples(raw), raw["train_hidden"], teacher, raw["heldout_hidden"])


def load_samples(data_dir: str, key: dict[str, Any]) -> Optional[tuple[list["Sample"], list["Sample"]]]:
    """The answers kept for `key` by a run that stopped before its hidden states, or None."""
    import torch

    path = _path(data_dir, key) + ".samples.pt"
    if not os.path.isfile(path):
        return None
    logger.info("train-drafter: reusing the generated answers in %s", path)
    return _samples(torch.load(path, weights_only=True))


class Progress:
    """Generation so far for a data key (`<key hash>.progress.pt`): the prompts the base model
    wrote (None until written) and the answers, in request order, as (token ids, prompt
    length). Without a data directory it keeps nothing on disk."""

    def __init__(self, data_dir: Optional[str], key: dict[str, Any]) -> None:
        self.key = key
        self.file = _path(data_dir, key) + ".progress.pt" if data_dir else None
        self.written: Optional[list[str]] = None
        self.answers: list[tuple[list[int], int]] = []
        if self.file and os.path.isfile(self.file):
            import torch

            raw = torch.load(self.file, weights_only=True)
            self.written = raw["written"]
            self.answers = list(zip(raw["ids"], raw["prompt_lens"]))
            logger.info("train-drafter: resuming from %s (%d prompts written, %d answers)", self.file,
                        len(self.written or []), len(self.answers))

    def save(self) -> None:
        if self.file:
            raw = {"written": self.written, "ids": [a[0] for a in self.answers],
                   "prompt_lens": [a[1] for a in self.answers]}
            _write(self.file[:-len(".progress.pt")], ".progress.pt", raw, self.key)

    def clear(self) -> None:
        if self.file and os.path.exists(self.file):
            os.remove(self.file)


def save_samples(data_dir: str, key: dict[str, Any], train: list["Sample"], heldout: list["Sample"]) -> None:
    _write(_path(data_dir, key), ".samples.pt", _raw_samples(train, heldout), key)


def save_data(data_dir: str, key: dict[str, Any], data: DrafterData) -> str:
    base = _path(data_dir, key)
    raw = {"train_hidden": data.train_hidden, "heldout_hidden": data.heldout_hidden,
           "teacher_ids": [t.ids for t in data.train_teacher],
           "teacher_probs": [t.probs for t in data.train_teacher], **_raw_samples(data.train, data.heldout)}
    _write(base, ".pt", raw, key)
    if os.path.exists(base + ".samples.pt"):  # the full data holds them
        os.remove(base + ".samples.pt")
    logger.info("train-drafter: kept the generated data in %s.pt", base)
    return base + ".pt"


def _raw_samples(train: list["Sample"], heldout: list["Sample"]) -> dict[str, list]:
    raw: dict[str, list] = {}
    for part, samples in (("train", train), ("heldout", heldout)):
        raw[part + "_ids"] = [s.token_ids for s in samples]
        raw[part + "_prompt_lens"] = [s.prompt_len for s in samples]
    return raw


def _samples(raw: dict[str, list]) -> tuple[list["Sample"], list["Sample"]]:
    from paraserve.spec_decode.train_drafter import Sample

    train, heldout = ([Sample(ids, n) for ids, n in zip(raw[part + "_ids"], raw[part + "_prompt_lens"])]
                      for part in ("train", "heldout"))
    return train, heldout


def _write(base: str, suffix: str, raw: dict[str, Any], key: dict[str, Any]) -> None:
    import torch

    os.makedirs(os.path.dirname(base), exist_ok=True)
    for name, write in ((base + suffix, lambda f: torch.save(raw, f)),
                        (base + ".json", lambda f: f.write(json.dumps(key, indent=2).encode() + b"\n"))):
        with open(name + ".tmp", "wb") as f:
            write(f)
        os.replace(name + ".tmp", name)
