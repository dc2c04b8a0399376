"""Drives a Meridian node's Messages API with the official `anthropic` Python SDK: a plain
message, a streamed one, a tool-use loop of several turns (whole and streamed), token counting
and an error.

Usage: anthropic_check.py BASE_URL MODEL TOOL_MODEL API_KEY
BASE_URL is the node's OpenAI base (`…/v1`), as the other checks take it; the SDK is given the
node's root.
Prints one JSON object with what the SDK parsed; exits non-zero if the SDK raised where it
should not have.
"""

import json
import sys

import anthropic
from sdk_common import ask, ask_streamed, message_text

TOOLS = [
    {
        "name": "lookup",
        "description": "Looks a word up.",
        "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
    }
]


def main() -> None:
    base_url, model, tool_model, api_key = sys.argv[1:5]
    base_url = base_url.removesuffix("/v1")
    client = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0)
    out = {}

    plain = ask(client, model, 64, "hello from the anthropic sdk", system="Be brief.")
    out["plain"] = {
        "id": plain.id,
        "model": plain.model,
        "text": message_text(plain),
        "stop_reason": plain.stop_reason,
        "usage": plain.usage.model_dump(),
    }

    streamed_text, final = ask_streamed(client, model, 64, "stream please")
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

    _, streamed_tool = ask_streamed(client, tool_model, 64, "look it up, streamed", tools=TOOLS)
    out["stream_tool"] = {
        "stop_reason": streamed_tool.stop_reason,
        "content": [b.model_dump() for b in streamed_tool.content],
    }

    counted = client.messages.count_tokens(
        model=model, messages=[{"role": "user", "content": "how many tokens is this?"}]
    )
    out["count_tokens"] = counted.input_tokens

    try:
        ask(client, "no-such-model", 8, "hi")
        out["error"] = None
    except anthropic.NotFoundError as e:
        out["error"] = {"status": e.status_code, "type": e.body["error"]["type"]}

    try:
        wrong_key = anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0)
        ask(wrong_key, model, 8, "hi")
        out["auth_error"] = None
    except anthropic.AuthenticationError as e:
        out["auth_error"] = {"status": e.status_code, "type": e.body["error"]["type"]}

    print(json.dumps(out))


if __name__ == "__main__":
    main()
