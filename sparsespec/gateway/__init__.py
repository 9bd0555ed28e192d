"""OpenAI-compatible HTTP in front of one or more verifiers (`python -m sparsespec.gateway`).

    python -m sparsespec.gateway --model smollm2-135m --redis redis://127.0.0.1:6379/0 --port 8000

`POST /v1/completions`, `POST /v1/chat/completions` (the tokenizer's chat template), `GET
/v1/models`, `GET /health`. server.py is the HTTP side, protocol.py the OpenAI wire format,
verifiers.py where requests go and whether they can be served. docs/design.md, "HTTP gateway".
"""

from sparsespec.gateway.server import Gateway, GatewayConfig, GatewayThread, main

__all__ = ["Gateway", "GatewayConfig", "GatewayThread", "main"]
