"""gunicorn entry point: `gunicorn backend.wsgi:app`. Logging is configured here, once."""

from __future__ import annotations

import logging

# The heavy imports (torch, the backbone and predictor modules, ~4-5 s on 2 cores) happen here, when gunicorn
# loads the app: once in the master with --preload (before forking; nothing here starts a thread pool), or in
# each worker at boot otherwise. No request pays for them, /setup included (Label Studio gives it 3 s).
import model.interactive.clickmode  # noqa: F401
import model.interactive.learned  # noqa: F401
import model.engine.residuals  # noqa: F401
from backend.app import create_app
from backend.settings import Settings

settings = Settings.from_env()
logging.basicConfig(
    level=getattr(logging, settings.log_level, logging.INFO),
    format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
)
app = create_app(settings)
