"""braid's torch dequantization of GGUF blocks gives gguf's own floats, bit for bit."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize

from braid.models.loader.gguf_dequant import dequantize
from braid.models.loader.gguf_loader import get_reader
from braid.transformers_utils import default_model_path


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, dtype=np.float32).reshape(-1), np.asarray(b, dtype=np.float32).reshape(-1)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_every_tensor_of_the_shipped_model():
    reader = get_reader(default_model_path())
    kinds = set()
    for tensor in reader.tensors:
        kinds.add(tensor.tensor_type)
        assert _same_bits(dequantize(tensor.data, tensor.tensor_type),
                          gguf_dequantize(tensor.data, tensor.tensor_type)), tensor.name
    assert {GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0} <= kinds  # both kernels ran


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0,
                                   GGMLQuantizationType.Q5_0])  # Q5_0: handed to gguf
def test_random_blocks(qtype):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((24, 256)) * rng.uniform(1e-3, 1e3, (24, 1))).astype(np.float32)
    values[3] = 0.0  # a zero scale
    values[5] = 7.0  # max == min
    raw = quantize(values, qtype)
    assert _same_bits(dequantize(raw, qtype), gguf_dequantize(raw, qtype))
