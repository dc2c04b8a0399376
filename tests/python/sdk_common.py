"""What the SDK checks share: streamed OpenAI completions read to their end, and Anthropic
messages of one user turn, whole and streamed."""

# Asks an OpenAI-style stream for a last chunk with the usage.
STREAM_WITH_USAGE = {"stream": True, "stream_options": {"include_usage": True}}


def stream_chat(client, **request) -> dict:
    """Streams a chat completion (usage asked for) and reads it to its end: the content, the
    finish reason, the number of chunks and the usage (a dict, from the last chunk, when one
    came)."""
    parts, finish, usage, chunks = [], None, None, 0
    for chunk in client.chat.completions.create(**request, **STREAM_WITH_USAGE):
        chunks += 1
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return {"content": "".join(parts), "finish": finish, "chunks": chunks, "usage": usage}


def stream_text(client, **request) -> dict:
    """Streams a text completion (usage asked for) and reads it to its end: the text and the
    usage (a dict, when a chunk carried one)."""
    parts, usage = [], None
    for chunk in client.completions.create(**request, **STREAM_WITH_USAGE):
        parts.extend(choice.text for choice in chunk.choices)
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return {"text": "".join(parts), "usage": usage}


def ask(client, model: str, max_tokens: int, text: str, **request):
    """An Anthropic message to `model` with one user turn, `text`."""
    return client.messages.create(
        model=model,
        max_tokens=max_tokens,
        messages=[{"role": "user", "content": text}],
        **request,
    )


def ask_streamed(client, model: str, max_tokens: int, text: str, **request) -> tuple:
    """`ask`, streamed: the text as it streamed in, and the final message the SDK put together
    from the events."""
    with client.messages.stream(
        model=model,
        max_tokens=max_tokens,
        messages=[{"role": "user", "content": text}],
        **request,
    ) as stream:
        streamed = "".join(stream.text_stream)
        return streamed, stream.get_final_message()


def message_text(message) -> str:
    """The text blocks of an Anthropic message, joined."""
    return "".join(b.text for b in message.content if b.type == "text")
