"""Sampler: greedy, seeded reproducibility, filters, penalties, min_tokens, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from braid.layers.sampler import (LogprobsTensors, Sampler, SamplerOutput, apply_penalties,
                                  compute_logprobs)
from braid.layers.sampling_metadata import SamplingMetadata, SamplingRow
from braid.sampling_params import SamplingParams

DEV = "cpu"
# A known distribution over 8 tokens, most likely first.
PROBS = torch.tensor([0.30, 0.22, 0.16, 0.12, 0.09, 0.06, 0.03, 0.02], dtype=torch.float64)
LOGITS = PROBS.log()


def md_for(params, vocab, prompts=None, outputs=None, seeds=None):
    rows = []
    for i, p in enumerate(params):
        gen = None
        seed = seeds[i] if seeds is not None else p.seed
        if seed is not None:
            gen = torch.Generator(device=DEV).manual_seed(seed)
        rows.append(SamplingRow(p, list(prompts[i]) if prompts else [],
                                list(outputs[i]) if outputs else [], gen))
    return SamplingMetadata.build(rows, vocab, DEV)


def draw(params: SamplingParams, n: int = 2000, logits=LOGITS) -> torch.Tensor:
    """n independent draws: one batch of n identical rows."""
    lg = logits.float().unsqueeze(0).repeat(n, 1)
    out = Sampler()(lg, md_for([params] * n, lg.shape[1]))
    return out.sampled_token_ids


def chi_square(samples: torch.Tensor, target: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=len(target)).double()
    n = counts.sum()
    keep = target > 0
    exp = n * target[keep]
    return float(((counts[keep] - exp) ** 2 / exp).sum())


def renorm(probs: torch.Tensor, allowed: list[int]) -> torch.Tensor:
    t = torch.zeros_like(probs)
    t[allowed] = probs[allowed]
    return t / t.sum()


# --------------------------------------------------------------------------- greedy

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_equals_argmax_and_leaves_logits_alone(dtype):
    torch.manual_seed(0)
    logits = torch.randn(16, 100).to(dtype)
    logits[3] = 0.5  # all tied: lowest id
    logits[4, 7] = logits[4, 42] = 50.0  # two-way tie at the top
    before = logits.clone()
    out = Sampler()(logits, md_for([SamplingParams(temperature=0.0)] * 16, 100))
    assert isinstance(out, SamplerOutput) and out.logprobs is None
    assert out.sampled_token_ids.dtype == torch.int64 and out.sampled_token_ids.shape == (16,)
    assert torch.equal(out.sampled_token_ids, logits.float().argmax(-1))
    assert out.sampled_token_ids[3] == 0 and out.sampled_token_ids[4] == 7
    assert torch.equal(logits, before)


def test_greedy_ignores_filters_and_seed():
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    params = [SamplingParams(temperature=0.0, top_k=2, top_p=0.1, min_p=0.9, seed=5)] * 4
    out = Sampler()(logits, md_for(params, 30))
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_flags_for_plain_greedy_batch():
    md = md_for([SamplingParams(temperature=0.0)] * 3, 10)
    assert md.all_greedy and not md.all_random and md.no_penalties
    assert md.no_top_k and md.no_top_p and md.no_min_p and md.max_num_logprobs is None
    assert md.temperature is None and md.top_k is None and md.stop_mask_rows is None
    md = md_for([SamplingParams(top_k=3, repetition_penalty=1.2, logprobs=2)] * 2, 10)
    assert md.all_random and not md.all_greedy and not md.no_penalties
    assert not md.no_top_k and md.no_top_p and md.max_num_logprobs == 2


def test_forward_never_syncs_with_host(monkeypatch):
    torch.manual_seed(2)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3, min_tokens=3, logprobs=3),
              SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.05, seed=1,
                             frequency_penalty=0.5, presence_penalty=0.2, eos_token_ids=[2]),
              SamplingParams(temperature=1.3, top_k=4, logprobs=1)]
    md = md_for(params, 40, prompts=[[1, 2], [3], [4, 4]], outputs=[[5], [6, 6], []])
    logits = torch.randn(3, 40)

    def boom(*a, **k):
        raise AssertionError("host sync in Sampler.forward")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    Sampler()(logits, md)
    md.top_p = None  # the top-k-only path
    md.no_top_p = True
    Sampler()(logits, md)


# --------------------------------------------------------------------------- seeds

def _seeded_run(row_params, other_params, pos, steps=15, vocab=64):
    """Sample `steps` tokens for row_params placed at `pos` among `other_params`."""
    torch.manual_seed(123)
    step_logits = [torch.randn(vocab) * 2 for _ in range(steps)]
    all_params = list(other_params)
    all_params.insert(pos, row_params)
    gens = [torch.Generator(device=DEV).manual_seed(p.seed) if p.seed is not None else None
            for p in all_params]
    rows = [SamplingRow(p, [], [], g) for p, g in zip(all_params, gens)]
    sampler, got = Sampler(), []
    for t in range(steps):
        torch.manual_seed(1000 + t)  # the unseeded rows' default generator changes per run
        other = torch.randn(len(all_params), vocab) * 2
        other[pos] = step_logits[t]
        out = sampler(other, SamplingMetadata.build(rows, vocab, DEV))
        got.append(int(out.sampled_token_ids[pos]))
    return got


def test_seeded_runs_reproduce_and_are_batch_invariant():
    p = SamplingParams(temperature=1.5, top_k=40, seed=42)
    alone = _seeded_run(p, [], 0)
    assert alone == _seeded_run(p, [], 0)
    others = [SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.9),
              SamplingParams(temperature=0.0), SamplingParams(temperature=2.0, top_p=0.9)]
    assert alone == _seeded_run(p, others, 2)
    assert alone == _seeded_run(p, others, 4)
    # The seed matters (high temperature over 64 tokens: 15 equal draws are not luck).
    assert alone != _seeded_run(SamplingParams(temperature=1.5, top_k=40, seed=43), [], 0)


def test_unseeded_rows_use_default_generator():
    p = SamplingParams(temperature=1.0)
    torch.manual_seed(5)
    a = draw(p, 200, torch.zeros(50))
    torch.manual_seed(5)
    b = draw(p, 200, torch.zeros(50))
    c = draw(p, 200, torch.zeros(50))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- distributions

CASES = [
    # (params, allowed set, target probabilities before renormalisation)
    (SamplingParams(temperature=1.0), list(range(8)), PROBS),
    (SamplingParams(temperature=0.5), list(range(8)), PROBS ** 2),
    (SamplingParams(temperature=1.0, top_k=3), [0, 1, 2], PROBS),
    (SamplingParams(temperature=1.0, top_p=0.6), [0, 1, 2], PROBS),   # .30 .52 .68
    (SamplingParams(temperature=1.0, top_p=0.5), [0, 1], PROBS),      # .30 .52
    (SamplingParams(temperature=1.0, top_p=0.2), [0], PROBS),         # always the top one
    (SamplingParams(temperature=1.0, min_p=0.35), [0, 1, 2, 3], PROBS),  # >= .105
    # top-k first, then top-p over the renormalised top 5: .337 .584 .764 .899
    (SamplingParams(temperature=1.0, top_k=5, top_p=0.8), [0, 1, 2, 3], PROBS),
    # temperature before top-p: p^2 renormalised = .470 .253 .134 .075 ...; cum .470 .723 .857
    (SamplingParams(temperature=0.5, top_p=0.75), [0, 1, 2], PROBS ** 2),
    (SamplingParams(temperature=1.0, top_k=8, top_p=1.0), list(range(8)), PROBS),
]


@pytest.mark.parametrize("params,allowed,target", CASES)
def test_filters_support_and_frequencies(params, allowed, target):
    torch.manual_seed(11)
    s = draw(params, 2000)
    assert set(s.tolist()) <= set(allowed), f"emitted a token outside {allowed}"
    expected = renorm(target / target.sum(), allowed)
    # df <= 7; the 99.9999% quantile of chi2(7) is ~ 40.
    assert chi_square(s, expected) < 40.0


def test_chi_square_detects_a_wrong_distribution():
    torch.manual_seed(11)
    s = draw(SamplingParams(temperature=0.5), 2000)
    assert chi_square(s, PROBS) > 100.0  # temperature 1 distribution rejected


def test_filters_are_per_row_in_a_mixed_batch():
    torch.manual_seed(3)
    lg = LOGITS.float()
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=1.0, min_p=0.5)]
    reps = 400
    out = Sampler()(lg.repeat(reps * len(params), 1), md_for(params * reps, 8)).sampled_token_ids
    out = out.view(reps, len(params))
    assert set(out[:, 0].tolist()) == {0}
    assert len(set(out[:, 1].tolist())) >= 6  # unfiltered row really samples
    assert set(out[:, 2].tolist()) == {0}
    assert set(out[:, 3].tolist()) == {0, 1}
    assert set(out[:, 4].tolist()) == {0, 1, 2}  # >= .15


def test_top_k_larger_than_vocab_and_tiny_probabilities():
    torch.manual_seed(4)
    lg = torch.full((8,), -1e4)
    lg[5] = 0.0  # one token with all the mass; the others underflow to probability 0
    for p in (SamplingParams(top_k=1000), SamplingParams(top_p=0.999, top_k=3),
              SamplingParams(min_p=0.1)):
        assert set(draw(p, 300, lg).tolist()) == {5}


# --------------------------------------------------------------------------- mixed

def test_mixed_greedy_and_random_batch():
    torch.manual_seed(6)
    b, v = 12, 30
    logits = torch.randn(b, v) * 3
    params = [SamplingParams(temperature=0.0) if i % 3 == 0 else
              SamplingParams(temperature=0.8, top_k=2, seed=i if i % 2 else None)
              for i in range(b)]
    md = md_for(params, v)
    assert not md.all_greedy and not md.all_random
    top2 = logits.topk(2, dim=-1).indices
    seen_second = False
    for _ in range(20):
        s = Sampler()(logits, md_for(params, v)).sampled_token_ids
        for i in range(b):
            if i % 3 == 0:
                assert s[i] == logits[i].argmax()
            else:
                assert s[i] in top2[i]
                seen_second |= bool(s[i] == top2[i, 1])
    assert seen_second


# --------------------------------------------------------------------------- penalties

def reference_penalties(logits, params, prompts, outputs):
    out = logits.clone().double()
    for i, p in enumerate(params):
        for t in range(out.shape[1]):
            if t in prompts[i] or t in outputs[i]:
                x = out[i, t]
                out[i, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            count = outputs[i].count(t)
            out[i, t] -= p.frequency_penalty * count
            if count > 0:
                out[i, t] -= p.presence_penalty
    return out


def test_penalties_match_reference():
    torch.manual_seed(7)
    v = 20
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3),
              SamplingParams(repetition_penalty=0.7),
              SamplingParams(frequency_penalty=-0.5, presence_penalty=1.5),
              SamplingParams(),
              SamplingParams(repetition_penalty=2.0, presence_penalty=-1.0)]
    prompts = [[1, 2, 2, 3], [4, 5], [6], [1, 1, 1], [7, 8, 9, 10, 11, 12]]
    outputs = [[2, 2, 9, 9, 9, 0], [5, 13], [6, 6, 6, 14, 19], [3], []]
    logits = torch.randn(len(params), v) * 2
    md = md_for(params, v, prompts, outputs)
    got = apply_penalties(logits, md)
    want = reference_penalties(logits, params, prompts, outputs)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got, logits)


def test_penalties_only_output_ones_skip_prompt():
    md = md_for([SamplingParams(presence_penalty=1.0)], 10, [[1, 2]], [[3]])
    assert md.prompt_token_ids is None and md.output_token_ids is not None


def test_penalties_change_greedy_choice():
    v = 10
    logits = torch.zeros(1, v)
    logits[0, 4], logits[0, 6] = 2.0, 1.5
    plain = Sampler()(logits, md_for([SamplingParams(temperature=0.0)], v, [[0]], [[4]]))
    assert plain.sampled_token_ids.tolist() == [4]
    for p in (SamplingParams(temperature=0.0, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, frequency_penalty=1.0),
              SamplingParams(temperature=0.0, presence_penalty=1.0)):
        out = Sampler()(logits, md_for([p], v, [[0]], [[4]]))
        assert out.sampled_token_ids.tolist() == [6], p
    # Repetition penalty also covers prompt tokens; frequency/presence do not.
    out = Sampler()(logits, md_for([SamplingParams(temperature=0.0, repetition_penalty=1.5)], v,
                                   [[4]], [[]]))
    assert out.sampled_token_ids.tolist() == [6]
    out = Sampler()(logits, md_for([SamplingParams(temperature=0.0, presence_penalty=1.0)], v,
                                   [[4]], [[]]))
    assert out.sampled_token_ids.tolist() == [4]


# --------------------------------------------------------------------------- min_tokens

def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    v = 10
    logits = torch.zeros(1, v)
    logits[0, 3], logits[0, 5], logits[0, 1] = 9.0, 8.0, 1.0  # 3 = EOS, 5 = stop id

    def greedy(n_out, ignore_eos=False, min_tokens=3):
        p = SamplingParams(temperature=0.0, min_tokens=min_tokens, stop_token_ids=[5, 99],
                           ignore_eos=ignore_eos, eos_token_ids=[3])
        return Sampler()(logits, md_for([p], v, [[0]], [[7] * n_out])).sampled_token_ids.item()

    assert greedy(0) == 1 and greedy(2) == 1  # 99 is outside the vocabulary: ignored
    assert greedy(3) == 3 and greedy(5) == 3
    assert greedy(0, ignore_eos=True) == 3  # EOS not a stop token then; 5 still is
    assert greedy(0, min_tokens=0) == 3
    # Random rows too, and only the rows still below min_tokens.
    params = [SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[5], eos_token_ids=[3]),
              SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[5], eos_token_ids=[3])]
    torch.manual_seed(8)
    reps = 300
    s = Sampler()(logits.repeat(2 * reps, 1),
                  md_for(params * reps, v, outputs=[[], [1, 1]] * reps)).sampled_token_ids.view(reps, 2)
    assert not set(s[:, 0].tolist()) & {3, 5}
    assert 3 in s[:, 1].tolist()


# --------------------------------------------------------------------------- logprobs

def check_logprobs(lp: LogprobsTensors, logits: torch.Tensor, targets: torch.Tensor, k: int):
    ref = torch.log_softmax(logits.double(), dim=-1)
    n = logits.shape[0]
    assert lp.token_ids.shape == (n, k + 1) and lp.logprobs.shape == (n, k + 1)
    assert lp.logprobs.dtype == torch.float32 and lp.ranks.shape == (n,)
    assert torch.equal(lp.token_ids[:, 0], targets)
    torch.testing.assert_close(lp.logprobs.double(), ref.gather(1, lp.token_ids), atol=1e-5, rtol=1e-5)
    want_top = ref.topk(k, dim=-1)
    assert torch.equal(lp.token_ids[:, 1:], want_top.indices)
    for i in range(n):
        rank = 1 + sum(1 for x in ref[i].tolist() if x > ref[i, targets[i]])
        assert lp.ranks[i] == rank


def test_logprobs_are_from_raw_logits():
    torch.manual_seed(9)
    b, v = 6, 50
    logits = torch.randn(b, v) * 3
    params = [SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=2.0),
              SamplingParams(temperature=0.5, top_k=3, logprobs=4, presence_penalty=2.0),
              SamplingParams(temperature=1.5, top_p=0.3),
              SamplingParams(temperature=0.0, logprobs=2),
              SamplingParams(temperature=1.0, min_p=0.2, logprobs=1, min_tokens=5, eos_token_ids=[0]),
              SamplingParams(temperature=2.0, frequency_penalty=1.0, logprobs=3)]
    md = md_for(params, v, prompts=[[1, 2]] * b, outputs=[[3, 3]] * b)
    assert md.max_num_logprobs == 4
    out = Sampler()(logits, md)
    check_logprobs(out.logprobs, logits, out.sampled_token_ids, 4)
    # bf16 input: logprobs of the upcast logits
    lb = logits.bfloat16()
    out = Sampler()(lb, md)
    check_logprobs(out.logprobs, lb.float(), out.sampled_token_ids, 4)


def test_sampled_logprob_rank_for_unlikely_token():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    p = SamplingParams(temperature=0.0, logprobs=0, min_tokens=1, stop_token_ids=[0, 1],
                       eos_token_ids=[2])
    out = Sampler()(logits, md_for([p], 5))
    assert out.sampled_token_ids.tolist() == [3]
    assert out.logprobs.ranks.tolist() == [4] and out.logprobs.token_ids.tolist() == [[3]]


def test_compute_logprobs_for_prompt_targets():
    torch.manual_seed(10)
    prompt = torch.randint(0, 40, (9,))
    logits = torch.randn(8, 40)  # position t predicts prompt token t+1
    lp = compute_logprobs(logits, 5, prompt[1:])
    check_logprobs(lp, logits, prompt[1:], 5)
    lp0 = compute_logprobs(logits.half(), 0, prompt[1:])
    assert lp0.token_ids.shape == (8, 1)
