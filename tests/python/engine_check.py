"""Drives a Meridian node in front of a real engine with the official `openai` and `anthropic`
Python SDKs: chat, text completions, Responses and Anthropic Messages, each whole and streamed.

Usage: engine_check.py BASE_URL MODEL API_KEY
Prints one JSON object with what the SDK parsed (usage of every call); exits non-zero if the
SDK raised. Generated words are never checked: a small model's answers vary.
"""

import json
import sys

import anthropic
from openai import OpenAI
from sdk_common import ask, ask_streamed, message_text, stream_chat, stream_text

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}


def main() -> None:
    base_url, model, api_key = sys.argv[1], sys.argv[2], sys.argv[3]
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    out = {}

    chat = client.chat.completions.create(
        model=model,
        messages=[SYSTEM, {"role": "user", "content": "Name a colour."}],
        max_tokens=12,
    )
    out["chat"] = {
        "content": chat.choices[0].message.content,
        "finish": chat.choices[0].finish_reason,
        "usage": chat.usage.model_dump(),
    }

    out["chat_stream"] = stream_chat(
        client,
        model=model,
        messages=[SYSTEM, {"role": "user", "content": "Count to five."}],
        max_tokens=12,
    )

    text = client.completions.create(model=model, prompt="The sky is", max_tokens=6)
    out["text"] = {
        "text": text.choices[0].text,
        "finish": text.choices[0].finish_reason,
        "usage": text.usage.model_dump(),
    }

    out["text_stream"] = stream_text(client, model=model, prompt="Once upon a time", max_tokens=6)

    resp = client.responses.create(
        model=model,
        instructions="You are a helpful assistant. Answer briefly.",
        input="Name a city.",
        max_output_tokens=8,
        store=False,
    )
    out["responses"] = {"status": resp.status, "usage": responses_usage(resp.usage)}
    completed = None
    for event in client.responses.create(
        model=model, input="Name a river.", max_output_tokens=8, stream=True, store=False
    ):
        if event.type in ("response.completed", "response.incomplete"):
            completed = event.response
    out["responses_stream"] = {
        "status": completed.status if completed else None,
        "usage": responses_usage(completed.usage) if completed else None,
    }

    messages = anthropic.Anthropic(
        base_url=base_url.removesuffix("/v1"), api_key=api_key, max_retries=0
    )
    message = ask(
        messages, model, 8, "Name a fruit.", system="You are a helpful assistant. Answer briefly."
    )
    out["messages"] = {
        "stop_reason": message.stop_reason,
        "usage": anthropic_usage(message.usage),
    }
    streamed, final = ask_streamed(messages, model, 8, "Name an animal.")
    out["messages_stream"] = {
        "text_matches": streamed == message_text(final),
        "stop_reason": final.stop_reason,
        "usage": anthropic_usage(final.usage),
    }

    print(json.dumps(out))


def responses_usage(u) -> dict:
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
    }


def anthropic_usage(u) -> dict:
    """In OpenAI's terms: Anthropic's input tokens exclude those read from the cache."""
    prompt = u.input_tokens + (u.cache_read_input_tokens or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": u.output_tokens,
        "total_tokens": prompt + u.output_tokens,
    }


if __name__ == "__main__":
    main()
