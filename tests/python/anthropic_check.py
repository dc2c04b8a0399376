"""Drives a Meridian node's Messages API with the official `anthropic` Python SDK: a plain
message, a streamed one, a tool-use loop of several turns (whole and streamed), token counting
and an error.

Usage: anthropic_check.py BASE_URL MODEL TOOL_MODEL API_KEY
Prints one JSON object with what the SDK parsed; exits non-zero if the SDK raised where it
should not have.
"""

import json
import sys

import anthropic
from sdk_common import message_text

TOOLS = [
    {
        "name": "lookup",
        "description": "Looks a word up.",
        "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
    }
]


def main() -> None:
    base_url, model, tool_model, api_key = sys.argv[1:5]
    client = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0)
    out = {}

    plain = client.messages.create(
        model=model,
        max_tokens=64,
        system="Be brief.",
        messages=[{"role": "user", "content": "hello from the anthropic sdk"}],
    )
    out["plain"] = {
        "id": plain.id,
        "model": plain.model,
        "text": message_text(plain),
        "stop_reason": plain.stop_reason,
        "usage": plain.usage.model_dump(),
    }

    with client.messages.stream(
        model=model,
        max_tokens=64,
        messages=[{"role": "user", "content": "stream please"}],
    ) as stream:
        streamed_text = "".join(stream.text_stream)
        final = stream.get_final_message()
    out["stream"] = {
        "text": streamed_text,
        "final_text": message_text(final),
        "stop_reason": final.stop_reason,
        "usage": final.usage.model_dump(),
    }

    # The model calls the tool until it has had enough results, then answers in text.
    messages = [{"role": "user", "content": "look two things up"}]
    turns, calls = 0, []
    while turns < 6:
        reply = client.messages.create(
            model=tool_model, max_tokens=64, tools=TOOLS, messages=messages
        )
        turns += 1
        if reply.stop_reason != "tool_use":
            break
        uses = [b for b in reply.content if b.type == "tool_use"]
        calls.extend({"id": b.id, "name": b.name, "input": b.input} for b in uses)
        messages.append({"role": "assistant", "content": reply.content})
        messages.append(
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": b.id,
                        "content": "result for " + json.dumps(b.input),
                    }
                    for b in uses
                ],
            }
        )
    out["loop"] = {
        "turns": turns,
        "calls": calls,
        "last_stop_reason": reply.stop_reason,
        "last_text": message_text(reply),
    }

    with client.messages.stream(
        model=tool_model,
        max_tokens=64,
        tools=TOOLS,
        messages=[{"role": "user", "content": "look it up, streamed"}],
    ) as stream:
        streamed_tool = stream.get_final_message()
    out["stream_tool"] = {
        "stop_reason": streamed_tool.stop_reason,
        "content": [b.model_dump() for b in streamed_tool.content],
    }

    counted = client.messages.count_tokens(
        model=model, messages=[{"role": "user", "content": "how many tokens is this?"}]
    )
    out["count_tokens"] = counted.input_tokens

    try:
        client.messages.create(
            model="no-such-model",
            max_tokens=8,
            messages=[{"role": "user", "content": "hi"}],
        )
        out["error"] = None
    except anthropic.NotFoundError as e:
        out["error"] = {"status": e.status_code, "type": e.body["error"]["type"]}

    try:
        anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0).messages.create(
            model=model, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        out["auth_error"] = None
    except anthropic.AuthenticationError as e:
        out["auth_error"] = {"status": e.status_code, "type": e.body["error"]["type"]}

    print(json.dumps(out))


if __name__ == "__main__":
    main()
