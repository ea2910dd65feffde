"""The one import-time app, for ASGI servers: ``uvicorn loreg.registry.asgi:app``."""

from loreg.registry.app import create_app

app = create_app()
