"""`ctc-drafter serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with streaming.

    app.py       the routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics
    protocol.py  the OpenAI wire format (pydantic request models, response and chunk bodies, errors)
    worker.py    the one decoding thread and its bounded queue (batch 1)
    stops.py     stop strings across token boundaries (what may be streamed yet)
    metrics.py   Prometheus counters and histograms
    settings.py  what the server was started with
"""

from .app import create_app
from .settings import ServeSettings

__all__ = ["create_app", "ServeSettings"]
