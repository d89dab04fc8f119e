"""paraserve: an LLM inference and serving engine."""
from paraserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # torch and transformers load only when the engine is used, not on `import paraserve`
    if name == "LLM":
        from paraserve.llm import LLM

        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from paraserve.core import outputs

        return getattr(outputs, name)
    raise AttributeError(name)
