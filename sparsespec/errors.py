"""One error type for bad input, so every front end (CLI, gRPC) can turn it into a clear message."""


class SparseSpecError(Exception):
    """Base class: something the user can fix. The message names the field or the file."""


class InvalidArgument(SparseSpecError, ValueError):
    """A request or config field is out of range or malformed."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def shown(value, limit: int = 64) -> str:
    """A client's value as an error message may echo it: at most `limit` characters of it (and
    its length), so a 1 MB session_id does not come back in the status."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class ModelLoadError(SparseSpecError):
    """A model path, config or weight file cannot be used."""


class ContextOverflow(InvalidArgument):
    """The prompt (plus what must be generated) does not fit the context limit."""
