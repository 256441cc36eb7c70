"""Incremental detokenization with stop-string detection, in the frontend.

Decoding token by token breaks multi-byte characters and word-initial spaces,
so each step decodes a short window and emits only the text that the newest
tokens added (the prefix/read offset method of TGI and vLLM). With a fast
tokenizer the same method runs in Rust (`tokenizers`' DecodeStream: a fraction
of the host time, benchmarks/frontend_step.py); the Python path stays for the
other tokenizers.
"""
from __future__ import annotations

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # older tokenizers
    DecodeStream = None

# Prompt tokens kept as decoding context so the first output token gets its spacing right.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.output_text = ""
        self._stream, self._backend = self._make_stream(tokenizer, skip_special_tokens)

    def _make_stream(self, tokenizer, skip_special_tokens: bool):
        """(DecodeStream, backend tokenizer) when the Rust path gives the Python path's text:
        a fast tokenizer that does not clean up spaces after decoding, and a prompt context
        that decodes to whole characters (else the stream would emit the context's tail)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if DecodeStream is None or backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
            return None, None
        context = backend.decode(self.token_ids, skip_special_tokens=skip_special_tokens) if self.token_ids else ""
        if context.endswith("\ufffd"):
            return None, None
        try:
            return DecodeStream(ids=list(self.token_ids), skip_special_tokens=skip_special_tokens), backend
        except TypeError:  # a DecodeStream without a prompt context
            return None, None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, new_token_ids: list[int]) -> str:
        """Append tokens; returns the text they added (possibly empty while a character is incomplete)."""
        added = ""
        if self._stream is not None:
            for token_id in new_token_ids:
                added += self._stream.step(self._backend, token_id) or ""
            self.output_text += added
            return added
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
            new_text = self._decode(self.token_ids[self.prefix_offset :])
            if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
                added += new_text[len(prefix_text) :]
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.token_ids)
        self.output_text += added
        return added

    def check_stop_strings(self, stop: list[str], num_new_chars: int, include_stop_str: bool) -> str | None:
        """If a stop string appears in the text added last, cut the text there and return it."""
        if not stop or num_new_chars == 0:
            return None
        best: tuple[int, str] | None = None
        for stop_str in stop:
            # A new match must end inside the newly added characters.
            start = max(0, len(self.output_text) - num_new_chars - len(stop_str) + 1)
            idx = self.output_text.find(stop_str, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop_str)
        if best is None:
            return None
        idx, stop_str = best
        self.output_text = self.output_text[: idx + len(stop_str) if include_stop_str else idx]
        return stop_str
