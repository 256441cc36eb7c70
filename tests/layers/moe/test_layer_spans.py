"""A traced eager forward times each layer's attention and MoE experts (the step-time
split the MoE benchmarks report); without a tracer in the forward context nothing is
recorded."""
import contextlib

import torch

from braid.config import ModelConfig
from braid.forward_context import ForwardContext, set_forward_context
from braid.layers.attention.backend import get_attention_backend, kv_cache_shape
from braid.layers.attention.metadata import build_attention_metadata
from braid.models.loader import load_model
from braid.transformers_utils import load_hf_config
from tests.tiny_checkpoints import make_tiny_checkpoint


class RecordingTracer:
    def __init__(self):
        self.names = []

    def gpu_span(self, name, stream=None):
        self.names.append(name)
        return contextlib.nullcontext()


def test_traced_forward_names_attention_and_experts(tmp_path):
    path = make_tiny_checkpoint("qwen3_moe", tmp_path / "moe", mlp_only_layers=[0])
    hf_config = load_hf_config(path)
    model = load_model(ModelConfig(model=path, hf_config=hf_config, dtype=torch.float32, load_format="auto",
                                   max_model_len=64),
                       torch.device("cpu"))
    caches = [torch.zeros(kv_cache_shape(4, 4, 2, 32)) for _ in range(2)]
    md = build_attention_metadata([3], [3], [[0]], 4, "cpu")
    tracer = RecordingTracer()
    ids, pos = torch.tensor([5, 6, 7]), torch.arange(3)
    with set_forward_context(ForwardContext(md, caches, get_attention_backend("torch"), tracer)):
        model(ids, pos)
    assert tracer.names == ["attention", "attention", "moe_experts"]  # layer 0 is dense
    with set_forward_context(ForwardContext(md, caches, get_attention_backend("torch"))):
        model(ids, pos)  # no tracer: no spans, no error
