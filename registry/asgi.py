"""The one import-time app, for ASGI servers: ``uvicorn loreg.registry.asgi:app`` (also each
process of `loreg serve --workers N`)."""

from loreg.registry.allocator import tune_for_streaming
from loreg.registry.app import create_app

tune_for_streaming()
app = create_app()
