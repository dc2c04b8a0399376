"""Drives a Meridian node with the official `openai` Python SDK.

Usage: sdk_check.py BASE_URL MODEL API_KEY
Prints one JSON object with what the SDK parsed; exits non-zero if the SDK raised.
"""

import json
import sys

from openai import OpenAI


def main() -> None:
    base_url, model, api_key = sys.argv[1], sys.argv[2], sys.argv[3]
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)

    unary = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hello from the python sdk"}],
        max_tokens=32,
    )

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage, chunks = [], None, None, 0
    for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage

    print(
        json.dumps(
            {
                "unary_content": unary.choices[0].message.content,
                "unary_finish": unary.choices[0].finish_reason,
                "unary_usage": unary.usage.model_dump() if unary.usage else None,
                "stream_content": "".join(parts),
                "stream_finish": finish,
                "stream_chunks": chunks,
                "stream_usage": usage.model_dump() if usage else None,
            }
        )
    )


if __name__ == "__main__":
    main()
