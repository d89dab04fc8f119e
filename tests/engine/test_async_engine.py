"""AsyncLLM builds and steps its engine in one background thread, so only that thread ever
starts OpenMP work: a second OpenMP pool (the main thread's, had it loaded the model) puts more
threads than cores in the process, libgomp then puts idle threads to sleep at once and every
kernel call pays a wake-up (decode steps ran 2x slower in the server than offline)."""
import asyncio
import threading

import pytest

from paraserve import SamplingParams
from paraserve.config import EngineConfig
from paraserve.engine import async_engine
from paraserve.engine.async_engine import AsyncLLM


def test_engine_is_built_and_stepped_in_its_own_thread(tiny_model_dir, monkeypatch):
    threads = {}
    real_init, real_step = async_engine.LLMEngine.__init__, async_engine.LLMEngine.step

    def init(self, *args, **kwargs):
        threads["build"] = threading.current_thread().name
        real_init(self, *args, **kwargs)

    def step(self):
        threads.setdefault("step", set()).add(threading.current_thread().name)
        return real_step(self)

    monkeypatch.setattr(async_engine.LLMEngine, "__init__", init)
    monkeypatch.setattr(async_engine.LLMEngine, "step", step)
    engine = AsyncLLM(EngineConfig.from_kwargs(model=str(tiny_model_dir("llama")), dtype="float32",
                                               threads=1, max_model_len=64))
    try:
        async def go():
            params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
            return [o async for o in engine.generate({"prompt_token_ids": [1, 2, 3]}, params, "r")][-1]

        out = asyncio.run(go())
        assert len(out.outputs[0].token_ids) == 4 and engine.model_name
        assert threads == {"build": "paraserve-engine", "step": {"paraserve-engine"}}
    finally:
        engine.shutdown()


def test_a_bad_model_fails_in_the_callers_thread(tmp_path):
    with pytest.raises(Exception, match="nowhere"):
        AsyncLLM(EngineConfig.from_kwargs(model=str(tmp_path / "nowhere")))
