"""gunicorn entry point: `gunicorn backend.wsgi:app`. Logging is configured here, once."""

from __future__ import annotations

import logging

from backend.app import create_app
from backend.settings import Settings

settings = Settings.from_env()
logging.basicConfig(
    level=getattr(logging, settings.log_level, logging.INFO),
    format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
)
app = create_app(settings)
