"""Chat prompts: OpenAI-style messages -> prompt token ids, through the tokenizer's chat template.

The one place that does it, for the HTTP gateway (`/v1/chat/completions`), the SDK
(`client.chat`) and the CLI (`sparsespec generate --chat`), so the three send the verifier the
same tokens for the same messages. The template is rendered to text with the generation prompt
(the assistant's header) appended, then encoded without adding special tokens: the template
writes them itself (SmolLM2's `<|im_start|>` ... `<|im_end|>`).
"""

from __future__ import annotations

from functools import lru_cache

from sparsespec.errors import InvalidArgument

ROLES = ("system", "developer", "user", "assistant", "tool")


def normalize_messages(messages, field: str = "messages") -> list[dict]:
    """Check the messages and return them as [{"role": str, "content": str}, ...].

    `content` may be a string or a list of text parts ({"type": "text", "text": ...}), as the
    OpenAI API allows; an assistant message may have content null. Errors name the field
    (`messages[1].role: ...`)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument(field, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise InvalidArgument(where, "must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidArgument(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r:.40}")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidArgument(f"{where}.content[{j}]", "only text parts ({'type': 'text', "
                                                                   "'text': ...}) are supported")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise InvalidArgument(f"{where}.content", "must be a string or a list of text parts")
        out.append({"role": role, "content": content})
    return out


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, messages, field: str = "messages") -> str:
    """The messages rendered by the tokenizer's chat template, ending with the assistant's header."""
    msgs = normalize_messages(messages, field)
    if tokenizer is None or not has_chat_template(tokenizer):
        raise InvalidArgument(field, "this model's tokenizer has no chat template; send a plain prompt "
                                     "(/v1/completions, or generate without --chat)")
    try:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template that refuses the messages (raise_exception)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidArgument(field, f"the chat template refused these messages: {first[:200]}") from None
    if not isinstance(text, str):
        raise InvalidArgument(field, "the chat template did not render to text")
    return text


def chat_prompt_ids(tokenizer, messages, field: str = "messages") -> list[int]:
    """The prompt token ids for `messages` (what the gateway, the SDK and the CLI send)."""
    from sparsespec.tokens import with_bos  # templates write their BOS; one that does not gets it
    return with_bos(tokenizer, tokenizer.encode(chat_prompt(tokenizer, messages, field), add_special_tokens=False))


@lru_cache(maxsize=8)
def load_chat_tokenizer(model: str):
    """The tokenizer of a model directory, GGUF file or known name (sparsespec.models), cached."""
    from sparsespec.models import load_tokenizer, resolve_model
    return load_tokenizer(resolve_model(model))
