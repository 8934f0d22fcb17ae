"""The adversarial tier (marker `adversarial`): the backend as an attacker and a careless client meet it."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/adversarial/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.adversarial)
