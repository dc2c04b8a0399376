"""What the SDK checks share: reading a streamed chat completion, and the text of a message."""


def read_chat_stream(stream) -> dict:
    """Reads a streamed chat completion to its end: the content, the finish reason, the number
    of chunks and the usage (the SDK's object, from the last chunk, when one came)."""
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
    return {"content": "".join(parts), "finish": finish, "chunks": chunks, "usage": usage}


def read_text_stream(stream) -> dict:
    """Reads a streamed text completion to its end: the text and the usage (the SDK's object,
    when a chunk carried one)."""
    parts, usage = [], None
    for chunk in stream:
        parts.extend(choice.text for choice in chunk.choices)
        if chunk.usage is not None:
            usage = chunk.usage
    return {"text": "".join(parts), "usage": usage}


def message_text(message) -> str:
    """The text blocks of an Anthropic message, joined."""
    return "".join(b.text for b in message.content if b.type == "text")
