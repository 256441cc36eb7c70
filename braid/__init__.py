"""braid: an LLM inference and serving engine built around overlap.

`import braid` stays light: the engine loads on first use, and the HTTP
server stack is never imported from here.
"""
from braid.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from braid.entrypoints.llm import LLM

        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from braid import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'braid' has no attribute {name!r}")
