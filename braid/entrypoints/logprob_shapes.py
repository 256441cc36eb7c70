"""Engine logprobs (token id -> Logprob per position) in the response shapes: the legacy
completions shape, the chat shape, and vLLM's prompt_logprobs."""
from __future__ import annotations

from braid.entrypoints.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, PromptLogprob, TopLogprob


def token_name(tokenizer, tid: int, decoded: str | None, as_ids: bool) -> str:
    """How a response names a token: its text, or "token_id:<id>" (vLLM's
    return_tokens_as_token_ids, for tokens whose text is not a whole character)."""
    if as_ids:
        return f"token_id:{tid}"
    return decoded if decoded is not None else tokenizer.decode([tid])


def top_entries(entry: dict, n: int) -> list[tuple[int, object]]:
    """The top-n (by rank) of one position's entry, best first."""
    ranked = [(tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= n]
    return sorted(ranked, key=lambda item: item[1].rank)[:n]


def completion_logprobs(tokenizer, token_ids: list[int], entries: list, start_offset: int = 0, *,
                        top_n: int | None = None, as_ids: bool = False) -> CompletionLogprobs:
    """Legacy logprobs of `token_ids`; an entry of None (the first prompt token) has no logprob.
    top_n: how many alternatives per position (None: all the entry has)."""
    result = CompletionLogprobs()
    offset = start_offset
    for tid, entry in zip(token_ids, entries):
        chosen = entry.get(tid) if entry else None
        if chosen is None:
            token = token_name(tokenizer, tid, None, as_ids)
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            token = token_name(tokenizer, tid, chosen.decoded_token, as_ids)
            result.token_logprobs.append(chosen.logprob)
            kept = entry.items() if top_n is None else [(tid, chosen)] + top_entries(entry, top_n)
            top: dict[str, float] = {}
            for other, lp in kept:  # the sampled token first; tokens that decode alike keep the first
                top.setdefault(token_name(tokenizer, other, lp.decoded_token or "", as_ids), lp.logprob)
            result.top_logprobs.append(top)
        result.tokens.append(token)
        result.text_offset.append(offset)
        offset += len(token)
    return result


def extend(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(text_offset=a.text_offset + b.text_offset, token_logprobs=a.token_logprobs + b.token_logprobs,
                              tokens=a.tokens + b.tokens, top_logprobs=a.top_logprobs + b.top_logprobs)


def end_offset(lp: CompletionLogprobs, start: int) -> int:
    return lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens else start


def chat_logprobs(tokenizer, token_ids: list[int], entries: list, top_n: int, as_ids: bool = False) -> ChatLogprobs:
    def top_logprob(tid: int, lp) -> TopLogprob:
        name = token_name(tokenizer, tid, lp.decoded_token or "", as_ids)
        return TopLogprob(token=name, logprob=lp.logprob, bytes=list(name.encode("utf-8")))

    content = []
    for tid, entry in zip(token_ids, entries):
        chosen = entry[tid]
        token = token_name(tokenizer, tid, chosen.decoded_token, as_ids)
        content.append(ChatTokenLogprob(
            token=token, logprob=chosen.logprob, bytes=list(token.encode("utf-8")),
            top_logprobs=[top_logprob(other, lp) for other, lp in top_entries(entry, top_n)]))
    return ChatLogprobs(content=content)


def prompt_logprobs(tokenizer, token_ids: list[int], entries: list | None,
                    top_n: int) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's prompt_logprobs: per prompt token (None for the first), the token's own
    logprob and the top_n alternatives, keyed by token id (so decoded_token stays text
    even with return_tokens_as_token_ids, as in vLLM)."""
    result: list[dict[int, PromptLogprob] | None] = []
    for tid, entry in zip(token_ids, entries or []):
        if not entry or tid not in entry:
            result.append(None)
            continue
        kept = dict([(tid, entry[tid])] + top_entries(entry, top_n))
        result.append({other: PromptLogprob(logprob=lp.logprob, rank=lp.rank,
                                            decoded_token=token_name(tokenizer, other, lp.decoded_token, False))
                       for other, lp in kept.items()})
    return result
