"""What the browser test does in Label Studio 1.23.2's web UI, one method per user action, with the selectors
found in its frontend (web/dist/apps/labelstudio/*.js.map): the login form, the Connect Model form, the model
card's menu, the editor's Auto-Annotation switch, the Auto-Detect flyout of smart tools, the label rows, the
suggestion accept button, Submit, and the Data Manager's Actions menu.

Positions on the image are given in image pixels and mapped to the page through the editor's own image
state (stage size, zoom and offset), so a click lands on the pixel the test means whatever the layout."""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from playwright.sync_api import Page, Response

# The label rows under the image, in the order of the label config (tests/e2e/ls_api.LABEL_CONFIG).
ROW_BRUSH, ROW_CLICK, ROW_BOX = 0, 1, 2

# The editor's store (window.Htx) as the test reads it: the selected annotation's suggestions and regions.
_STATE_JS = """() => { const s = window.Htx, a = s && s.annotationStore && s.annotationStore.selected;
  if (!a) return null;
  return {suggestions: [...a.suggestions.keys()], regions: a.regions.map(r => r.type),
          awaiting: !!s.awaitingSuggestions}; }"""
_IMAGE_JS = """() => { const o = window.Htx.annotationStore.selected.objects.find(t => t.type === 'image');
  return {stageWidth: o.stageWidth, naturalWidth: o.naturalWidth, naturalHeight: o.naturalHeight,
          zoom: o.zoomScale, x: o.zoomingPositionX, y: o.zoomingPositionY}; }"""
# True once a suggestion that was not there before the action exists and the editor has drawn a frame since.
_NEW_SUGGESTION_JS = """(before) => { const a = window.Htx.annotationStore.selected;
  return [...a.suggestions.keys()].some(k => !before.includes(k)) && !window.Htx.awaitingSuggestions; }"""


@dataclass
class SmartAnswer:
    """One smart request as the user lives it: how long from the click until the suggestion was drawn, and
    what Label Studio sent to and got back from the backend (through /api/ml/<id>/interactive-annotating)."""
    seconds: float
    request: dict
    answer: dict

    @property
    def items(self) -> list[dict]:
        return (self.answer.get("data") or {}).get("result") or []


class LabelStudioUI:
    def __init__(self, page: Page, url: str):
        self.page = page
        self.url = url.rstrip("/")
        # Confirmations are answered with OK (e.g. "leave the page?" with a draft open).
        page.on("dialog", lambda dialog: dialog.accept())

    # -- pages -----------------------------------------------------------------------------------------------
    def login(self, email: str, password: str) -> None:
        self.page.goto(self.url + "/user/login")
        self.page.locator("#email").fill(email)
        self.page.locator("#password").fill(password)
        self.page.get_by_role("button", name="Log in").click()
        self.page.wait_for_url(lambda u: "/user/login" not in u, timeout=30_000)

    def model_settings(self, project: int) -> None:
        self.page.goto(f"{self.url}/projects/{project}/settings/ml")
        self.page.get_by_role("heading", name="Model").first.wait_for()

    # -- Settings > Model ------------------------------------------------------------------------------------
    def _ml_form(self):
        return self.page.locator("form").filter(has=self.page.locator("[name=extra_params]"))

    def open_connect_form(self, name: str, url: str, extra_params: str, interactive: bool = True):
        """Connect Model: Name (required by the form), Backend URL, the Extra params box, Interactive
        preannotations. Returns the form, filled, not yet saved."""
        self.page.get_by_text("Connect Model", exact=True).click()
        form = self._ml_form()
        form.locator("input[name=title]").fill(name)
        form.locator("input[name=url]").fill(url)
        form.locator("[name=extra_params]").fill(extra_params)
        toggle = form.locator("input[name=is_interactive]")
        if toggle.is_checked() != interactive:
            form.get_by_text("Interactive preannotations").click()
        return form

    def open_edit_form(self):
        """The model card's menu > Edit; returns the form once Label Studio filled it from the stored model.

        Label Studio's form fills its fields from the stored model in timers that fire up to 50 ms after the form
        mounts (`Form.componentDidMount`), overwriting anything typed before: a person never types that fast,
        a script does (the Extra params typed right away were sent as the stored "" once in five runs). So this
        waits until the Name field holds the stored title, then a little longer than those timers."""
        self.card_menu("Edit")
        form = self._ml_form()
        form.wait_for()
        self.page.wait_for_function(
            "() => [...document.querySelectorAll('form input[name=title]')].some(e => e.value.length > 0)",
            timeout=10_000)
        self.page.wait_for_timeout(300)
        return form

    def save_ml_form(self, form) -> Response:
        """Validate and Save; returns Label Studio's answer (POST /api/ml or PATCH /api/ml/<id>)."""
        with self.page.expect_response(lambda r: "/api/ml" in r.url and r.request.method in ("POST", "PATCH"),
                                       timeout=60_000) as answer:
            form.get_by_text("Validate and Save").click()
        return answer.value

    def card_menu(self, item: str) -> None:
        self.page.get_by_role("button", name="Machine learning model options").click()
        self.page.get_by_text(item, exact=True).click()

    def start_training(self) -> str:
        """Card menu > Start Training > Start Training; returns the text the dialog shows afterwards."""
        self.card_menu("Start Training")
        dialog = self.page.get_by_role("dialog").filter(has_text="trigger your model")
        if not dialog.count():
            dialog = self.page.locator(".modal, [class*=modal]").filter(has_text="trigger your model").last
        with self.page.expect_response(lambda r: r.url.endswith("/train") and r.request.method == "POST",
                                       timeout=60_000) as answer:
            dialog.get_by_role("button", name="Start Training").click()
        if answer.value.status != 200:
            raise AssertionError(f"Start Training -> {answer.value.status}: {answer.value.text()[:500]}")
        shown = dialog.get_by_text("Response:")
        shown.wait_for(timeout=30_000)
        return shown.inner_text()

    # -- the editor ------------------------------------------------------------------------------------------
    def open_task(self, project: int, task: int) -> None:
        self.page.goto(f"{self.url}/projects/{project}/data?task={task}")
        self.page.locator(".konvajs-content").wait_for(timeout=60_000)
        # The editor of the task asked for (after a Submit the old task's editor may be up for a moment).
        self.page.wait_for_function("(task) => { const s = window.Htx, a = s && s.annotationStore && "
                                    "s.annotationStore.selected; "
                                    "const o = a && s.task && s.task.id === task && "
                                    "a.objects.find(t => t.type === 'image'); "
                                    "return !!(o && o.naturalWidth && o.stageWidth); }", arg=task,
                                    timeout=60_000)
        # Prelabeling fills the new annotation a moment later (it may first ask the backend for a prediction):
        # wait until the regions stay the same for a second.
        self.page.wait_for_function(
            """() => { const n = window.Htx.annotationStore.selected.regions.length, now = Date.now();
                 if (window.__adclickRegions !== n) {
                   window.__adclickRegions = n; window.__adclickSince = now; }
                 return now - window.__adclickSince > 1000; }""", polling=100, timeout=120_000)

    def state(self) -> dict:
        return self.page.evaluate(_STATE_JS)

    def auto_annotation(self, on: bool = True) -> None:
        toggle = self.page.get_by_test_id("bottombar-auto-annotation-toggle")
        if toggle.is_checked() != on:
            self.page.get_by_text("Auto-Annotation", exact=True).click()
        self.page.wait_for_function(f"() => window.Htx.autoAnnotation === {str(on).lower()}")

    def smart_tool(self, aria_label: str) -> None:
        """Pick a tool in the Auto-Detect flyout (it opens on hover): key-point-tool, rectangle-tool."""
        self.page.locator("button.lsf-tool_smart").first.hover()
        self.page.locator(f"button[aria-label={aria_label}]").click()

    def label(self, row: int, value: str) -> None:
        """Select a label in a label row; Label Studio drops the selection after each smart region, so the
        test (like the user) selects it again before every smart click."""
        self.page.locator(".lsf-labels").nth(row).get_by_text(value, exact=True).click()
        # A row below the fold scrolls the editor; bring the whole image back into view before drawing.
        self.page.locator(".konvajs-content").evaluate("e => e.scrollIntoView({block: 'start'})")

    def to_page(self, x: float, y: float) -> tuple[float, float]:
        """Image pixel (x, y) -> page coordinates, through the editor's stage size, zoom and offset."""
        o = self.page.evaluate(_IMAGE_JS)
        box = self.page.locator(".konvajs-content").bounding_box()
        scale = o["zoom"] * o["stageWidth"] / o["naturalWidth"]
        return box["x"] + o["x"] + scale * x, box["y"] + o["y"] + scale * y

    def _smart(self, act, timeout_s: float) -> SmartAnswer:
        before = self.state()["suggestions"]
        t0 = time.monotonic()
        with self.page.expect_response(lambda r: "interactive-annotating" in r.url,
                                       timeout=timeout_s * 1000) as answer:
            act()
        body = answer.value.json()
        if "data" not in body:
            raise AssertionError(f"the smart request failed: {json.dumps(body)[:1500]}")
        self.page.wait_for_function(_NEW_SUGGESTION_JS, arg=before, polling="raf", timeout=timeout_s * 1000)
        seconds = time.monotonic() - t0
        return SmartAnswer(seconds, json.loads(answer.value.request.post_data or "{}"), body)

    def smart_click(self, x: float, y: float, label: str, negative: bool = False,
                    timeout_s: float = 120.0) -> SmartAnswer:
        """Select the keypoint label, click (Alt-click for a negative point) at image pixel (x, y) and wait
        until the suggestion is drawn."""
        self.label(ROW_CLICK, label)
        px, py = self.to_page(x, y)

        def click():
            if negative:
                self.page.keyboard.down("Alt")
            try:
                self.page.mouse.click(px, py)
            finally:
                if negative:
                    self.page.keyboard.up("Alt")
        return self._smart(click, timeout_s)

    def smart_box(self, x0: float, y0: float, x1: float, y1: float, label: str,
                  timeout_s: float = 120.0) -> SmartAnswer:
        """Select the rectangle label and drag a box from image pixel (x0, y0) to (x1, y1)."""
        self.label(ROW_BOX, label)
        (px0, py0), (px1, py1) = self.to_page(x0, y0), self.to_page(x1, y1)

        def drag():
            self.page.mouse.move(px0, py0)
            self.page.mouse.down()
            self.page.mouse.move((px0 + px1) / 2, (py0 + py1) / 2, steps=4)
            self.page.mouse.move(px1, py1, steps=4)
            self.page.mouse.up()
        return self._smart(drag, timeout_s)

    def accept_suggestions(self) -> None:
        self.page.get_by_test_id("bottombar-accept-suggestions-button").click()
        self.page.wait_for_function("() => window.Htx.annotationStore.selected.suggestions.size === 0")

    def choose(self, value: str) -> None:
        """Tick a Choices value (its label is followed by the hotkey in a <sup>)."""
        self.page.get_by_role("checkbox", name=re.compile(rf"^{re.escape(value)}\b")).check()

    def submit(self) -> dict:
        """Submit; returns the annotation Label Studio stored."""
        with self.page.expect_response(lambda r: "/annotations" in r.url and r.request.method == "POST",
                                       timeout=60_000) as answer:
            self.page.get_by_role("button", name="Submit").click()
        if answer.value.status != 201:
            raise AssertionError(f"Submit -> {answer.value.status}: {answer.value.text()[:500]}")
        return answer.value.json()

    def prelabel_with(self, project: int, option_start: str) -> Response:
        """Settings > Annotation > Prelabeling: "Use predictions to prelabel tasks" on and the option of the
        model-version list that starts with `option_start` (a connected model "<card title> (Connected)" or a
        prediction version "<version> (N predictions)"); Save. Returns Label Studio's answer (PATCH
        project)."""
        self.page.goto(f"{self.url}/projects/{project}/settings/annotation")
        toggle = self.page.locator("input[name=show_collab_predictions]")
        toggle.wait_for(state="attached")
        if not toggle.is_checked():
            self.page.get_by_text("Use predictions to prelabel tasks", exact=True).click()
        # The list shows its current value (or a placeholder) over a hidden <select name=model_version>.
        self.page.wait_for_function("() => { const s = document.querySelector('select[name=model_version]');"
                                    " return s && !s.disabled; }")
        current = re.compile(r"^(Please select model or predictions|.+ \((Connected|Disconnected|"
                             r"Error|Training|Predicting)\)|.+ \(\d+ predictions\))$")
        self.page.get_by_text(current).first.click()
        self.page.get_by_text(re.compile("^" + re.escape(option_start))).last.click()
        with self.page.expect_response(lambda r: f"/api/projects/{project}" in r.url and
                                       r.request.method == "PATCH") as answer:
            self.page.get_by_role("button", name="Save annotation settings").click()
        return answer.value

    # -- the Data Manager ------------------------------------------------------------------------------------
    def data_manager(self, project: int) -> None:
        self.page.goto(f"{self.url}/projects/{project}/data")
        self.page.get_by_role("button", name="Tasks Actions").wait_for(timeout=60_000)

    def show_column(self, name: str) -> None:
        """Columns > tick `name` (the choice is kept in the Data Manager tab), then close the list."""
        if self.column_values(name) is not None:
            return
        columns = self.page.get_by_role("button", name="Columns")
        columns.click()
        self.page.get_by_text(name, exact=True).click()
        columns.click()
        self.page.wait_for_function(
            "(name) => [...document.querySelectorAll('[class*=table-head] *')]"
            ".some(e => e.children.length <= 2 && e.innerText && e.innerText.trim() === name)", arg=name)

    def retrieve_predictions(self, timeout_s: float = 300.0) -> Response:
        """Select all tasks, Actions > Retrieve Predictions > OK; returns Label Studio's answer once every
        selected task went through the backend's /predict."""
        self.page.locator("input[type=checkbox]").first.check()
        self.page.get_by_role("button", name="Tasks Actions").click()
        self.page.get_by_text("Retrieve Predictions", exact=True).click()
        with self.page.expect_response(lambda r: "retrieve_tasks_predictions" in r.url and
                                       r.request.method == "POST", timeout=timeout_s * 1000) as answer:
            self.page.get_by_text("OK", exact=True).click()
        return answer.value

    def column_values(self, name: str) -> list[str] | None:
        """The texts of a Data Manager column, top to bottom, read by position: the row cells that lie under
        the header cell named `name` (None when there is no such column)."""
        return self.page.evaluate(
            """(name) => {
                 const head = [...document.querySelectorAll('[class*=table-head] *')]
                   .find(e => e.children.length <= 2 && e.innerText && e.innerText.trim() === name);
                 if (!head) return null;
                 const h = head.getBoundingClientRect(), mid = (h.left + h.right) / 2;
                 return [...document.querySelectorAll('[data-testid=table-row]')].map(row => {
                   const cell = [...row.querySelectorAll('[class*=__cell]')].find(c => {
                     const r = c.getBoundingClientRect(); return r.left <= mid && mid <= r.right; });
                   return cell ? cell.innerText.trim() : null; });
               }""", name)
