"""Incremental detokenisation: each step decodes a few tokens, not the whole output.

Decoding `output_token_ids` in full after every step costs O(n) per token, O(n^2) per request. A
token's text is not always its own, though: a byte-level BPE token may hold half of a multi-byte
character (decoded alone it is U+FFFD), and SentencePiece-style tokenizers drop a word's leading
space at the start of a decode. So, as vLLM's incremental detokenizer does, the decode window
starts one already-emitted chunk back (`prefix_offset`): the text of the window minus the text of
its already-emitted part is what the new tokens add, in the context of the tokens before them.
While the window's text ends in U+FFFD the character may still be incomplete, and nothing is
emitted until a later token completes it (or the request ends: `flush`).

The window holds the last emitted chunk plus the tokens not emitted yet, so a step's decode is
bounded by the longest run of tokens that end inside one character (a few bytes), whatever the
output length.
"""

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """The text of a growing token list, one step at a time. `text` is everything emitted so far; it
    equals `tokenizer.decode(token_ids, skip_special_tokens=...)` once flushed."""

    __slots__ = ("decode", "prefix_offset", "read_offset", "text")

    def __init__(self, decode):
        """decode: token ids -> str (the tokenizer's decode with the caller's options)."""
        self.decode = decode
        self.prefix_offset = 0  # first token of the decode window (start of the last emitted chunk)
        self.read_offset = 0  # tokens before it are emitted
        self.text = ""

    def step(self, token_ids: list[int]) -> str:
        """Emit what the tokens after `read_offset` add (possibly ""); `token_ids` is the whole output
        so far, of which only the window is read."""
        return self._advance(token_ids, final=False)

    def flush(self, token_ids: list[int]) -> str:
        """Emit the rest, an incomplete trailing character included (as a full decode shows it)."""
        return self._advance(token_ids, final=True)

    def _advance(self, token_ids: list[int], final: bool) -> str:
        if len(token_ids) <= self.read_offset:
            return ""
        prefix_text = self.decode(token_ids[self.prefix_offset : self.read_offset])
        window_text = self.decode(token_ids[self.prefix_offset :])
        if window_text.endswith(REPLACEMENT) and not final:
            return ""  # the last character may be incomplete: wait for the tokens that finish it
        # Tokens that decode to nothing (skipped special tokens) still advance the window.
        new_text = window_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        self.text += new_text
        return new_text


class OutputText:
    """A request's visible text: its output detokenised incrementally, cut at the first stop string.

    While the request runs with stop strings, the last `len(longest stop) - 1` characters are held
    back (a stop string may be completing across tokens), so the visible text only grows and the
    pieces of a stream (`new_text`) concatenate to the final `text`.
    """

    __slots__ = ("detokenizer", "stops", "holdback", "text", "new_text", "stopped")

    def __init__(self, decode, stops: tuple[str, ...]):
        self.detokenizer = IncrementalDetokenizer(decode)
        self.stops = stops
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.new_text = ""
        self.stopped = False  # a stop string appeared: `text` ends just before it

    def update(self, token_ids: list[int], final: bool) -> None:
        """Take the output after a step (`final`: the request ends, so nothing is held back)."""
        if self.stopped:
            self.new_text = ""
            return
        detokenizer = self.detokenizer
        searched = max(0, len(detokenizer.text) - self.holdback)  # no stop string starts before this
        if final:
            detokenizer.flush(token_ids)
        else:
            detokenizer.step(token_ids)
        full = detokenizer.text
        stop_at = _first_stop(full, self.stops, searched)
        if stop_at is not None:
            visible, self.stopped = full[:stop_at], True
        elif final:
            visible = full
        else:
            visible = full[: max(len(self.text), len(full) - self.holdback)]
        self.new_text = visible[len(self.text) :]
        self.text = visible


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None
