"""Incremental detokenisation (issue 10, defect 8): streamed text pieces concatenate to the full
decode, multi-byte characters split across tokens included, and a step's decode does not grow with
the output length."""

import pytest

from kvlab.engine.detokenizer import IncrementalDetokenizer, OutputText
from kvlab.engine.request import SamplingParams

from .test_llm_engine import make_engine

# Toy ids -> UTF-8 bytes: ASCII letters, and the bytes of multi-byte characters one per token, so
# a random toy output splits "é", "日" and "🙂" (and makes invalid sequences) like a byte-level BPE.
BYTES = [bytes([b]) for b in b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMN"] + [
    bytes([b]) for b in "é日🙂ü".encode()
]
BYTES += [b"\xe2\x82\xac"] * (61 - len(BYTES))  # "€" as one token


class ByteTokenizer:
    """Decodes like a byte-level BPE: the ids' bytes, joined, then UTF-8 with replacement; counts the
    tokens every decode call reads."""

    def __init__(self):
        self.decoded_lengths: list[int] = []

    def encode(self, text: str) -> list[int]:
        return [ord(c) % len(BYTES) for c in text]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded_lengths.append(len(token_ids))
        return b"".join(BYTES[t] for t in token_ids).decode("utf-8", errors="replace")


def byte_engine(**config):
    engine = make_engine(num_blocks=64, **config)
    engine.tokenizer = ByteTokenizer()
    return engine


@pytest.mark.parametrize("prompt", ["hello", "a longer prompt", "zz"])
def test_streamed_pieces_concatenate_to_the_full_decode_and_steps_decode_a_bounded_window(prompt):
    engine = byte_engine()
    engine.add_request(prompt, SamplingParams(max_tokens=48))
    pieces, texts, final = [], [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            pieces.append(output.new_text)
            texts.append(output.text)
            final = output
    assert len(final.output_token_ids) == 48
    expected = ByteTokenizer().decode(final.output_token_ids)
    assert "".join(pieces) == final.text == expected
    assert all(
        later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False)
    )  # only grows
    # Whole-output decoding read 1, 2, ..., 48 tokens per step; the window stays a few tokens.
    assert max(engine.tokenizer.decoded_lengths) <= 8


def test_stop_string_pieces_concatenate_to_the_cut_text():
    free = byte_engine().generate(["hello"], SamplingParams(max_tokens=30))[0].text
    stop = free[6:9]
    engine = byte_engine()
    engine.add_request("hello", SamplingParams(max_tokens=30, stop=(stop,)))
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            pieces.append(output.new_text)
            final = output
    assert final.finish_reason == "stop" and final.text == free[: free.index(stop)]
    assert "".join(pieces) == final.text


def test_abort_output_holds_the_text_so_far():
    engine = byte_engine()
    request_id = engine.add_request("hello", SamplingParams(max_tokens=30))
    for _ in range(6):
        engine.step()
    output = engine.abort(request_id)
    assert output.text == ByteTokenizer().decode(output.output_token_ids)


def test_multibyte_text_of_a_real_tokenizer_one_token_at_a_time():
    from kvlab.models.loader import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    text = "Héllo wörld, 日本語のテキスト 🙂🚀 naïve café — “quotes” ∑∫ Ελληνικά 한국어 <|endoftext|> end"
    ids = tokenizer.encode(text)
    lengths = []

    def decode(token_ids):
        lengths.append(len(token_ids))
        return tokenizer.decode(token_ids, skip_special_tokens=True)

    detokenizer = IncrementalDetokenizer(decode)
    pieces = [detokenizer.step(ids[:i]) for i in range(1, len(ids) + 1)] + [detokenizer.flush(ids)]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert any(p == "" for p in pieces)  # some tokens hold part of a character only
    assert max(lengths) <= 8 < len(ids)


def test_an_incomplete_character_at_the_end_is_flushed_as_the_full_decode_shows_it():
    tokenizer = ByteTokenizer()
    ids = [BYTES.index(b"a"), BYTES.index(b"b"), BYTES.index("日".encode()[:1])]
    text = OutputText(tokenizer.decode, ())
    text.update(ids[:2], final=False)
    text.update(ids, final=False)
    assert text.text == "ab" and text.new_text == ""  # the lead byte may still become a character
    text.update(ids, final=True)
    assert text.text == tokenizer.decode(ids) == "ab\ufffd"
