"""The floors' arithmetic, checked against hand-computed FLOP counts (no GPU needed)."""
import pytest

from benchmarks.w1_throughput import w1_floor
from braid.bench.shapes import SHAPES


def _attention_coefficient(cfg: dict) -> float:
    """The P^2 coefficient of one request's prefill FLOPs, from w1_floor at P, 2P, 3P: the
    linear and constant terms cancel in the second difference f(3P) - 2 f(2P) + f(P) = 2 q P^2."""
    p = 64
    f = [w1_floor(cfg, 1, k * p, 1, 1, bw=1.0, flops=1.0)["prefill_flops"] for k in (1, 2, 3)]
    return (f[2] - 2 * f[1] + f[0]) / (2 * p * p)


@pytest.mark.parametrize("shape, qk, pv", [
    ("llama3-8b", 32 * 128, 32 * 128),  # heads x head_dim == hidden_size
    ("qwen3-30b-a3b", 32 * 128, 32 * 128),  # 4096, while hidden_size is 2048
    ("deepseek-v2-lite", 16 * (128 + 64), 16 * 128),  # MLA: nope + rope for Q.K^T, v_head_dim for P.V
])
def test_w1_prefill_attention_flops(shape, qk, pv):
    cfg = SHAPES[shape]
    # Causal attention: P^2/2 score entries, 2 FLOPs per multiply-add in Q.K^T (width qk) and P.V (width pv).
    expected = cfg["num_hidden_layers"] * 2 * (qk + pv) / 2
    assert _attention_coefficient(cfg) == pytest.approx(expected)


@pytest.mark.parametrize("tied", [False, True])
def test_decode_step_floor_embedding_table(tied):
    """The input embedding table is gathered (batch rows), not multiplied; a tied table is the LM head."""
    from types import SimpleNamespace

    from benchmarks.decode_step import step_floor

    v, h, layers, kv_heads, head_dim, batch, context = 1000, 64, 2, 2, 32, 4, 10
    hf = SimpleNamespace(tie_word_embeddings=tied, vocab_size=v, hidden_size=h, num_hidden_layers=layers)
    body = 50_000  # every weight but the embedding table and the LM head
    num_params = body + v * h if tied else body + 2 * v * h  # a tied table is one parameter
    nbytes, flops = step_floor(hf, num_params, kv_heads, head_dim, batch, context)
    kv = batch * context * layers * 2 * kv_heads * head_dim * 2
    assert nbytes == (body + v * h + batch * h) * 2 + kv  # body + LM head read once, batch embedding rows
    assert flops == 2 * (body + v * h) * batch  # body + LM head, tied or not
