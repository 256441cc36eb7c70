"""The frontend's output processor: with final_only it returns just the finished requests,
and their outputs equal those built when every step's snapshot is returned."""
import random

from braid.engine.messages import EngineCoreOutput
from braid.engine.output_processor import OutputProcessor
from braid.sampling_params import SamplingParams
from braid.transformers_utils import default_model_path, load_tokenizer


def _run(tokenizer, final_only: bool):
    rng = random.Random(3)
    processor = OutputProcessor(tokenizer)
    params = [SamplingParams(temperature=0, max_tokens=6), SamplingParams(temperature=0, max_tokens=9, stop=["e"])]
    for i in range(4):
        processor.add_request(str(i), None, tokenizer.encode("Once upon a time"), [params[i % 2]])
    returned, aborted = [], []
    for step in range(9):
        outputs = [EngineCoreOutput(str(i), [rng.randrange(len(tokenizer))],
                                    finish_reason="length" if step == (5 if i % 2 == 0 else 8) else None)
                   for i in range(4) if processor.owns(str(i))]
        results, to_abort = processor.process_outputs(outputs, final_only=final_only)
        returned.append([(r.request_id, r.finished, r.outputs[0].text, r.outputs[0].token_ids) for r in results])
        aborted += to_abort
    return returned, aborted


def test_final_only_returns_just_the_finished_outputs_unchanged():
    tokenizer = load_tokenizer(default_model_path())
    every, aborted_every = _run(tokenizer, final_only=False)
    final, aborted_final = _run(tokenizer, final_only=True)
    assert aborted_final == aborted_every
    assert final == [[r for r in step if r[1]] for step in every]
    assert sum(len(step) for step in final) == 4  # each request once, when it finishes
    assert sum(len(step) for step in every) > 4


def test_time_per_output_token_counts_steps_not_the_tokens_of_all_samples():
    # n=2 samples advance together, one token each per step, 1 s per step: 1 s per output token.
    from unittest import mock

    processor = OutputProcessor(load_tokenizer(default_model_path()))
    params = SamplingParams(max_tokens=4)
    ids = processor.add_request("r", "hi", [1, 2], [params, params], arrival_time=0.0)
    last, intervals = None, []
    for step in range(4):
        with mock.patch("braid.engine.output_processor.time.time", return_value=1.0 + step), \
                mock.patch("braid.engine.output_processor.time.monotonic", return_value=101.0 + step):
            results, _ = processor.process_outputs([EngineCoreOutput(i, [100 + step], finish_reason=(
                "length" if step == 3 else None)) for i in ids])
        last = results[0]
        intervals.append(processor.inter_token_latencies)
    assert intervals == [[], [1.0], [1.0], [1.0]]  # one per request and step, none before its first token
    m = last.metrics
    assert m.num_generation_tokens == 8 and m.max_sample_tokens == 4
    assert m.time_to_first_token == 1.0 and m.time_per_output_token == 1.0


def test_queue_prefill_decode_times_come_from_the_core_schedule_and_the_token_times():
    """The core reports when it took each sample in and first scheduled it (monotonic); the
    request's times start from its earliest-scheduled sample; tokens are timed on arrival."""
    from unittest import mock

    processor = OutputProcessor(load_tokenizer(default_model_path()))
    params = SamplingParams(max_tokens=3)
    a, b = processor.add_request("r", "hi", [1, 2], [params, params], arrival_time=0.0)
    schedule = {a: (10.0, 12.0), b: (10.0, 11.5)}  # sample b was scheduled first
    for step in range(3):
        outputs = [EngineCoreOutput(i, [7], finish_reason="length" if step == 2 else None) for i in (a, b)]
        with mock.patch("braid.engine.output_processor.time.monotonic", return_value=14.0 + 2 * step):
            results, _ = processor.process_outputs(outputs, schedule_times=schedule if step == 0 else None)
    m = results[0].metrics
    assert (m.queue_time, m.prefill_time, m.decode_time, m.inference_time) == (1.5, 2.5, 4.0, 6.5)
    assert m.time_per_output_token == 2.0
