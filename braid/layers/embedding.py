"""Token embedding and LM head, split over TP ranks along the vocabulary.

Rank r holds rows [r * V/tp, (r+1) * V/tp) of the (padded) vocabulary. The
embedding looks up the ids it owns, zeros the rest, and all-reduces; the LM
head computes its slice of the logits and all-gathers them. With one rank both
are a plain embedding / matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from braid.distributed.comm import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from braid.distributed.parallel_state import get_tp_rank, get_tp_size
from braid.layers.linear import linear


def pad_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Smallest size >= vocab_size divisible by tp_size (no padding for tp=1)."""
    return -(-vocab_size // tp_size) * tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.num_embeddings = num_embeddings  # the real vocabulary
        self.embedding_dim = embedding_dim
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if loaded_weight.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"shape mismatch loading {type(self).__name__}: expected {(self.num_embeddings, self.embedding_dim)}, "
                f"checkpoint has {tuple(loaded_weight.shape)}"
            )
        start = self.vocab_start_index
        n = max(0, min(self.vocab_end_index, self.num_embeddings) - start)
        with torch.no_grad():
            if n:
                param.data[:n].copy_(loaded_weight.narrow(0, start, n))
            param.data[n:].zero_()  # padding rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mask = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local = (input_ids - self.vocab_start_index).masked_fill(mask, 0)
        out = F.embedding(local, self.weight).masked_fill(mask.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, tp_size={self.tp_size}"


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection hidden -> vocabulary logits, split like the embedding.
    `tie_weights(embedding)` makes it share the embedding's weight."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False) -> None:
        super().__init__(num_embeddings, embedding_dim)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_embeddings_per_partition), requires_grad=False)
            self.bias.weight_loader = self._bias_loader
        else:
            self.register_parameter("bias", None)

    def _bias_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if loaded_weight.shape != (self.num_embeddings,):
            raise ValueError(f"shape mismatch loading {type(self).__name__} bias: expected {(self.num_embeddings,)}, "
                             f"checkpoint has {tuple(loaded_weight.shape)}")
        start = self.vocab_start_index
        n = max(0, min(self.vocab_end_index, self.num_embeddings) - start)
        with torch.no_grad():
            param.data[:n].copy_(loaded_weight.narrow(0, start, n))
            param.data[n:].zero_()

    def tie_weights(self, embedding: VocabParallelEmbedding) -> "ParallelLMHead":
        if embedding.weight.shape != self.weight.shape:
            raise ValueError(f"cannot tie LM head {tuple(self.weight.shape)} to embedding {tuple(embedding.weight.shape)}")
        self.weight = embedding.weight
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is not called on token ids; use get_logits(hidden)")

    def get_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] logits (in the weight's dtype), padding columns dropped."""
        logits = linear(hidden, self.weight, self.bias)
        if self.tp_size > 1:
            logits = tensor_model_parallel_all_gather(logits, dim=-1)
        if logits.shape[-1] != self.num_embeddings:
            logits = logits[..., : self.num_embeddings]
        return logits
