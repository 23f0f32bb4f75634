"""The SSE chunks of a stream: one per generated token, so a client can time tokens by chunks."""

import json

from kvlab.engine.llm_engine import RequestOutput
from kvlab.server.responses import ChunkWriter, Envelope


def test_a_token_that_completes_no_character_still_gets_its_chunk():
    # A token holding part of a multi-byte character adds no text yet; it was sent no chunk, so a
    # client timing tokens by chunks (the serving bench's TTFT and TPOT) missed it.
    writer = ChunkWriter(Envelope.new("text_completion", "m"), 1, lambda token_id: "", False)
    steps = [([7], ""), ([8], "\u00e9"), ([9], "x")]
    chunks = []
    for count, (new_ids, new_text) in enumerate(steps, start=1):
        output = RequestOutput("r", None, [1], [7, 8, 9][:count], new_ids, "", new_text=new_text)
        chunks += writer.events(0, output)
    texts = [json.loads(chunk.removeprefix(b"data: "))["choices"][0]["text"] for chunk in chunks]
    assert texts == ["", "\u00e9", "x"]
