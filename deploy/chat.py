"""Chat messages to a prompt: the tokenizer's chat template, or ``DEFAULT_CHAT_TEMPLATE``.

One function for every entry point that takes OpenAI-style ``messages`` (the Serve app's
``/v1/chat/completions`` and the batch job's ``messages`` lines), so the same messages
become the same prompt everywhere.

A model whose tokenizer has no chat template (the shipped model has none) uses the default:
one ``ROLE: content`` paragraph per message, then ``ASSISTANT:`` for the reply::

    SYSTEM: Answer in verse.

    USER: Who is Romeo?

    ASSISTANT:
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant")

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def check_messages(messages) -> list[dict]:
    """``messages`` as a list of ``{"role", "content"}``; ValueError naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} objects, got {messages!r:.80}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {message!r:.80}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {content!r:.80}")
        out.append({"role": role, "content": content})
    return out


def render_chat(tokenizer, messages) -> str:
    """The prompt text for ``messages``, ending where the assistant's reply begins."""
    messages = check_messages(messages)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot take chat messages; send a prompt instead")
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
