"""gunicorn entry for the adversarial server tests: the real app and routes (backend.app.create_app, settings
from the environment) with the tiny test engine/predictor instead of the network (tests/api_support.py), so a
gunicorn worker boots in about a second."""

from backend.settings import Settings
from tests.api_support import make_app

app, _, _ = make_app(Settings.from_env(), start_jobs=False)
