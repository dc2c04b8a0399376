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

    text = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=5, echo=True, logprobs=2
    )
    text_stream = client.completions.create(
        model=model,
        prompt=["streamed prompt"],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    text_parts, text_usage = [], None
    for chunk in text_stream:
        for choice in chunk.choices:
            text_parts.append(choice.text)
        if chunk.usage is not None:
            text_usage = chunk.usage

    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    embedded = client.embeddings.create(model=model, input=["first text", "second text"])
    embedded_floats = client.embeddings.create(
        model=model, input=[[1, 2, 3]], encoding_format="float", dimensions=4
    )

    print(
        json.dumps(
            {
                "text": text.choices[0].text,
                "text_logprobs": text.choices[0].logprobs.model_dump()
                if text.choices[0].logprobs
                else None,
                "text_usage": text.usage.model_dump() if text.usage else None,
                "text_stream": "".join(text_parts),
                "text_stream_usage": text_usage.model_dump() if text_usage else None,
                "embeddings": [d.embedding for d in embedded.data],
                "embeddings_usage": embedded.usage.model_dump(),
                "embeddings_floats": [d.embedding for d in embedded_floats.data],
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
