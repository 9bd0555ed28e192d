"""One error type for bad input, so every front end (CLI, gRPC) can turn it into a clear message."""


class SparseSpecError(Exception):
    """Base class: something the user can fix. The message names the field or the file."""


class InvalidArgument(SparseSpecError, ValueError):
    """A request or config field is out of range or malformed."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ModelLoadError(SparseSpecError):
    """A model path, config or weight file cannot be used."""


class ContextOverflow(InvalidArgument):
    """The prompt (plus what must be generated) does not fit the context limit."""
