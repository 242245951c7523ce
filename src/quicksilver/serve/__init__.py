"""``quicksilver serve``: an OpenAI-compatible HTTP server with continuous batching.

``protocol`` holds the wire format (pydantic models with OpenAI's field names),
``scheduler`` the thread that owns the engine's batch, ``app`` the FastAPI layer that
validates, queues and streams. The HTTP layer never touches tensors.
"""

from .app import ServeSettings, create_app
from .scheduler import Event, GenerationRequest, QueueFull, Scheduler

__all__ = ["create_app", "ServeSettings", "Scheduler", "GenerationRequest", "Event", "QueueFull"]
