"""Drives a Meridian node with the official `openai` Python SDK.

Usage: sdk_check.py BASE_URL MODEL TOOL_MODEL API_KEY
Prints one JSON object with what the SDK parsed; exits non-zero if the SDK raised.
"""

import json
import sys

from openai import BadRequestError, OpenAI
from sdk_common import stream_chat, stream_text


def main() -> None:
    base_url, model, tool_model, api_key = sys.argv[1:5]
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0)

    unary = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hello from the python sdk"}],
        max_tokens=32,
    )

    streamed = stream_chat(
        client, model=model, messages=[{"role": "user", "content": "stream please"}]
    )

    text = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=5, echo=True, logprobs=2
    )
    text_read = stream_text(client, model=model, prompt=["streamed prompt"], max_tokens=4)

    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    embedded = client.embeddings.create(model=model, input=["first text", "second text"])
    embedded_floats = client.embeddings.create(
        model=model, input=[[1, 2, 3]], encoding_format="float", dimensions=4
    )

    # The Responses API, which Meridian serves by translation (nothing stored).
    resp = client.responses.create(
        model=model, instructions="Be brief.", input="hello", max_output_tokens=32, store=False
    )
    events, streamed_text, completed = [], "", None
    for event in client.responses.create(
        model=model, input=[{"role": "user", "content": "stream"}], stream=True, store=False
    ):
        events.append(event.type)
        if event.type == "response.output_text.delta":
            streamed_text += event.delta
        if event.type == "response.completed":
            completed = event.response
    # The SDK's stream helper accumulates the events and checks they fit together.
    with client.responses.stream(model=model, input="helper") as helper:
        helped = helper.get_final_response()
    # A function call, its output sent back, then the answer.
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    called = client.responses.create(model=tool_model, input="look it up", tools=tools)
    calls = [item for item in called.output if item.type == "function_call"]
    answered = client.responses.create(
        model=tool_model,
        tools=tools,
        input=[{"role": "user", "content": "look it up"}]
        + [c.model_dump(exclude_none=True) for c in calls]
        + [{"type": "function_call_output", "call_id": c.call_id, "output": "found"} for c in calls],
    )
    try:
        client.responses.create(model=model, input="hi", store=True)
        refused = None
    except BadRequestError as e:
        refused = e.body.get("param") if isinstance(e.body, dict) else str(e.body)

    print(
        json.dumps(
            {
                "responses_text": resp.output_text,
                "responses_status": resp.status,
                "responses_usage": resp.usage.model_dump() if resp.usage else None,
                "responses_events": events,
                "responses_stream_text": streamed_text,
                "responses_stream_usage": completed.usage.model_dump() if completed else None,
                "responses_helper_text": helped.output_text,
                "responses_calls": [c.model_dump() for c in calls],
                "responses_answered": answered.output_text,
                "responses_refused_param": refused,
                "text": text.choices[0].text,
                "text_logprobs": text.choices[0].logprobs.model_dump()
                if text.choices[0].logprobs
                else None,
                "text_usage": text.usage.model_dump() if text.usage else None,
                "text_stream": text_read["text"],
                "text_stream_usage": text_read["usage"],
                "embeddings": [d.embedding for d in embedded.data],
                "embeddings_usage": embedded.usage.model_dump(),
                "embeddings_floats": [d.embedding for d in embedded_floats.data],
                "unary_content": unary.choices[0].message.content,
                "unary_finish": unary.choices[0].finish_reason,
                "unary_usage": unary.usage.model_dump() if unary.usage else None,
                "stream_content": streamed["content"],
                "stream_finish": streamed["finish"],
                "stream_chunks": streamed["chunks"],
                "stream_usage": streamed["usage"],
            }
        )
    )


if __name__ == "__main__":
    main()
