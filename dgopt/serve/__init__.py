"""`dgopt serve`: a compiled artifact behind an OpenAI-compatible HTTP API (FastAPI + uvicorn), batched and streamed;
`dgopt.serve.ray` runs the same app as a Ray Serve deployment."""
from .app import create_app

__all__ = ["create_app"]
