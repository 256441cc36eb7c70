"""A multi-step step under data parallelism x expert parallelism replays one CUDA-graph
bucket in every pass: its first pass pads to the replicas' agreed row count (run's
min_size), an idle replica replays that bucket for every pass (run_idle), so the further
passes (run_next) must too, or the replicas' MoE all-gathers move different row counts
and never pair up (the GPU test DP=2 graphs-async-ms4 hung so). The bucket choice runs on
CPU tensors here; the graphs are stand-ins that record which size replayed."""
import torch

from braid.worker.cuda_graphs import DecodeCudaGraphs, capture_sizes


class _RecordingGraph:
    def __init__(self, size: int, replays: list[int]) -> None:
        self.size, self.replays = size, replays

    def replay(self) -> None:
        self.replays.append(self.size)


def _graphs(max_batch_size: int, block_size: int = 4):
    graphs = DecodeCudaGraphs.__new__(DecodeCudaGraphs)  # no CUDA: only the replay bookkeeping
    graphs.sizes = capture_sizes(max_batch_size)
    graphs.block_size = block_size
    n = graphs.sizes[-1]
    graphs.dev = dict(input_ids=torch.zeros(n, dtype=torch.int64), positions=torch.full((n,), 5),
                      seq_lens=torch.full((n,), 6, dtype=torch.int32), slot_mapping=torch.zeros(n, dtype=torch.int64),
                      block_table=torch.arange(n * 4, dtype=torch.int32).view(n, 4))
    replays: list[int] = []
    graphs.graphs = {s: (_RecordingGraph(s, replays), torch.arange(s)) for s in graphs.sizes}
    return graphs, replays


def test_further_passes_replay_the_bucket_the_replicas_agreed_on():
    graphs, replays = _graphs(32)
    agreed = 9  # the busiest replica's rows
    assert graphs.bucket(agreed) > graphs.bucket(3)
    out = graphs.run_next(torch.tensor([11, 12, 13]), 3, min_size=agreed)
    assert replays == [graphs.bucket(agreed)]
    assert out.tolist() == [0, 1, 2]  # this replica's own rows only
    assert graphs.dev["input_ids"][:3].tolist() == [11, 12, 13]
    assert graphs.dev["positions"][:3].tolist() == [6, 6, 6]


def test_without_data_parallelism_the_batch_picks_its_own_bucket():
    graphs, replays = _graphs(32)
    graphs.run_next(torch.tensor([1, 2, 3]), 3)
    assert replays == [graphs.bucket(3)]
