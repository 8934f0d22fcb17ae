"""The model card's title in Label Studio follows the served model version (issue 12 item 7).

Label Studio 1.23 shows no model version on the card, and it sets the project's `model_version` (the version the
Data Manager's *Prediction score* column averages, and the one *Prelabeling* uses) to the card's *title* when the
model is connected. Our predictions carry our version (`adclick-seg-v3`, `residual-click-...`), so the score
column stays empty and, after training, the chosen version is stale. Label Studio moves the project's
`model_version` along when a card's title changes while the project pointed at the old title
(`MLBackend.save()`), so renaming the card to the served version fixes both: the card shows the version, the
score column averages the live version's predictions, and a newly trained version takes over.

`sync_card_title(client, project, version)` finds this backend's card among the project's ML backends (the
one whose `model_version` Label Studio stored from our `/setup` answer), and PATCHes its title when it differs.
It runs in the background after `/setup` and after a training job published a version; the token goes only to
`LABEL_STUDIO_URL` (the label-studio-sdk client). `LS_SYNC_CARD_TITLE=0` switches it off (the card then keeps the
name typed when connecting; pick the version under *Settings > Annotation > Prelabeling* instead)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from backend.projects import label_studio_id

logger = logging.getLogger(__name__)

_WANTED: dict[str, tuple[str, tuple[str, ...]]] = {}  # project -> (version, our versions) for its sync thread
_LOCK = threading.Lock()


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def sync_card_title(client: Any, project: str, version: str, known: tuple[str, ...] = (), attempts: int = 15,
                    delay_s: float = 1.0) -> int | None:
    """Rename this backend's card in Label Studio project `project` to `version`; returns the card's id when
    renamed, None when nothing was to do or no card was found. The card is ours when Label Studio stored one
    of our versions (`version` or `known`) as its model version or its title. Polls a few times: on the first
    *Validate and Save* Label Studio creates the card only after our /setup answered."""
    try:
        project_id = label_studio_id(project)
    except ValueError:
        return None  # a project key that is not a Label Studio id (a test's "default" project)
    ours_names = {version, *known}
    for attempt in range(attempts):
        backends = list(client.ml.list(project=project_id) or [])
        ours = [b for b in backends
                if _field(b, "model_version") in ours_names or _field(b, "title") in ours_names]
        if ours:
            card = ours[0]
            if _field(card, "title") == version:
                return None
            card_id = int(_field(card, "id"))
            client.ml.update(id=card_id, url=_field(card, "url"), project=project_id, title=version)
            logger.info("project %s: model card %d renamed %r -> %r (the project's model version follows)",
                        project, card_id, _field(card, "title"), version)
            return card_id
        if attempt + 1 < attempts:
            time.sleep(delay_s)
    logger.info("project %s: no model card with one of our versions found in Label Studio; title left as is",
                project)
    return None


def sync_in_background(client_factory: Callable[[], Any], project: str, version: str,
                       known: tuple[str, ...] = ()) -> threading.Thread | None:
    """`sync_card_title` in a daemon thread, one per project at a time: a request while one runs only updates
    the version it goes for next. Failures are logged, never raised (the card's title is a convenience; the
    answer to Label Studio is already sent)."""
    with _LOCK:
        running = project in _WANTED
        _WANTED[project] = (version, tuple(known))
        if running:
            return None

    def run() -> None:
        while True:
            with _LOCK:
                wanted = _WANTED[project]
            try:
                sync_card_title(client_factory(), project, wanted[0], wanted[1])
            except Exception as exc:  # noqa: BLE001 - a convenience: never take anything down
                logger.warning("project %s: could not rename the model card to %r: %s", project, wanted[0],
                               str(exc)[:300])
            with _LOCK:
                if _WANTED[project] == wanted:
                    del _WANTED[project]
                    return

    thread = threading.Thread(target=run, name=f"card-title-{project}", daemon=True)
    thread.start()
    return thread
