"""The malformed requests of the fuzz tier, generated from a seed: every route and method, bad JSON, wrong
types, huge numbers, deep nesting, odd content types, bad project ids, bad click contexts, odd image
references, broken transfers. Each case says whether the application must answer it ("app") or gunicorn's HTTP
parser may answer it first ("protocol"); either way a 4xx/5xx is a JSON {"error": ...} (gunicorn's own refusals
through backend/gunicorn_conf.py) and never a 500."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from typing import Any

from tests.api_support import CONTRACT_CONFIG

ROUTES = ["/", "/health", "/setup", "/predict", "/webhook", "/train", "/versions", "/metrics"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/json; charset=utf-16",
    "application/xml",
    "*/*",
    None,
    "application/vnd.api+json",
    "application/json; charset=latin-1",
]
# raw JSON tokens json.dumps cannot write: substituted for the marker strings after dumping
RAW_TOKENS = {
    "@INF@": "1e999",
    "@NINF@": "-1e999",
    "@NAN@": "NaN",
    "@INFINITY@": "Infinity",
    "@MZERO@": "-0",
    "@BIGINT@": "9" * 400,
    "@HUGEINT@": "9" * 5000,
    "@NEGBIG@": "-" + "9" * 40,
    "@FRAC@": "1e-400",
    "@BIGFLOAT@": "1.7976931348623157e308",
}
PROJECT_IDS = [
    "@INF@",
    "@NINF@",
    "@NAN@",
    "@MZERO@",
    "@BIGINT@",
    "@HUGEINT@",
    "@NEGBIG@",
    "@FRAC@",
    "@BIGFLOAT@",
    "1e999",
    "NaN",
    "-0",
    "-1",
    "0",
    "00",
    "1e3",
    "1.5.7",
    "inf",
    "-inf",
    "+1",
    " 1",
    "1 ",
    "0x10",
    "1_000",
    "../etc",
    "..",
    "/",
    "a/b",
    "1/../2",
    "1\x00",
    "\u0661",
    "\uff11",
    "é",
    "x" * 100,
    "9" * 19,
    "9" * 25,
    -1,
    0,
    -0.0,
    0.5,
    1.5,
    2**63,
    2**64,
    10**30,
    1e300,
    True,
    False,
    None,
    [],
    [1],
    {},
    {"id": None},
    {"id": "NaN"},
    {"id": -3},
    {"id": [1]},
    {"id": {"id": 1}},
    "",
    " ",
    "12.1700000000",
    7,
    "7.17",
]
JUNK = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    "",
    " ",
    "x",
    "x" * 20000,
    [],
    [None],
    {},
    {"a": 1},
    [[[]]],
    "@INF@",
    "@NAN@",
    "@BIGINT@",
    "@HUGEINT@",
    "@MZERO@",
    "\x00",
    "\ud800",
    "%s%s%n",
    "${jndi:ldap://x}",
    "<script>alert(1)</script>",
    "../../../../etc/passwd",
    "C:\\Windows\\win.ini",
    "\u202e",
    2**70,
    {"$ref": "#"},
    ["Scratch"],
    {"Scratch": True},
    "Scratch",
    "keypointlabels",
]
IMAGE_REFS = [
    "http://[::1",
    "http://[::1]:99999/x.png",
    "http://127.0.0.1:99999/x.png",
    "http://127.0.0.1:abc/x.png",
    "http://host:9511:80/x.png",
    "http://127.0.0.1:0/x.png",
    "http://",
    "http:///x.png",
    "http://?",
    "//x/y.png",
    "/data/local-files/?d=x%00y.jpg",
    "/data/local-files/?d=../../etc/passwd",
    "/data/local-files/",
    "/data/upload/../../etc/passwd",
    "/etc/passwd",
    "file:///etc/passwd",
    "ftp://127.0.0.1/x.png",
    "data:image/png;base64,!!!",
    "data:image/png,abc",
    "data:",
    "data:;base64,",
    "s3://",
    "s3://b/k.png",
    "gs://b/",
    "azure-blob://c/x.png",
    "javascript:alert(1)",
    "\\\\server\\share\\x.png",
    "x" * 5000,
    "http://user:secret@127.0.0.1:9/x.png",
    "http://127.0.0.1:9/%00.png",
    "http://127.0.0.1:9/x.png\r\nX: y",
    "http://\u0430pple.com/x.png",
    "http://256.256.256.256/x.png",
    "http://-1/x.png",
    "http://[fe80::1%25eth0]/",
    "@LOCAL@/text",
    "@LOCAL@/missing.png",
    "@LOCAL@/ok.png",
    "@LOCAL@/bomb.png",
    "@LOCAL@/empty",
    "http://localhost:1/x.png",
    "https://127.0.0.1:9/x.png",
    "HTTP://127.0.0.1:9/X.PNG",
    "http:x.png",
]


@dataclass
class Case:
    method: str
    path: str
    body: bytes | None = None
    headers: dict = field(default_factory=dict)
    raw: bytes | None = None  # exact bytes on the wire (the request line included)
    kind: str = "app"  # "app" or "protocol"
    name: str = ""


def dump(value: Any) -> bytes:
    text = json.dumps(value, allow_nan=True)
    for marker, token in RAW_TOKENS.items():
        text = text.replace(json.dumps(marker), token)
    return text.encode()


def keypoint(rng: random.Random, label: str = "Scratch") -> dict:
    return {
        "id": f"k{rng.randrange(10**6)}",
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": 128,
        "original_height": 96,
        "image_rotation": 0,
        "is_positive": rng.random() > 0.3,
        "value": {
            "x": rng.uniform(0, 100),
            "y": rng.uniform(0, 100),
            "width": 0.6,
            "keypointlabels": [label],
        },
    }


def predict_body(rng: random.Random, image: str) -> dict:
    clicks = [keypoint(rng) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3:
        clicks.append(
            {
                "type": "rectanglelabels",
                "value": {"x": 10, "y": 10, "width": 30, "height": 30, "rectanglelabels": ["Scratch"]},
            }
        )
    return {
        "tasks": [{"id": rng.randint(1, 50), "data": {"image": image}}],
        "project": f"{rng.randint(1, 4)}.17",
        "label_config": CONTRACT_CONFIG,
        "params": {"context": {"result": clicks}},
    }


def set_path(body: Any, path: list, value: Any) -> None:
    node = body
    for key in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(key, {})
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict) or isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value


CTX = ["params", "context", "result", 0]
PREDICT_PATHS = [
    ["project"],
    ["tasks"],
    ["tasks", 0],
    ["tasks", 0, "data"],
    ["tasks", 0, "data", "image"],
    ["tasks", 0, "id"],
    ["tasks", 0, "project"],
    ["tasks", 0, "drafts"],
    ["label_config"],
    ["params"],
    ["params", "context"],
    ["context"],
    ["params", "context", "result"],
    CTX,
    CTX + ["value"],
    CTX + ["value", "x"],
    CTX + ["value", "y"],
    CTX + ["value", "keypointlabels"],
    CTX + ["value", "keypointlabels", 0],
    CTX + ["type"],
    CTX + ["is_positive"],
    CTX + ["value", "width"],
    CTX + ["value", "text"],
    ["params", "context", "result", 1, "value", "height"],
]


class CaseGenerator:
    def __init__(self, seed: int, local_url: str):
        self.rng = random.Random(seed)
        self.local = local_url

    def image(self) -> str:
        ref = self.rng.choice(IMAGE_REFS)
        return ref.replace("@LOCAL@", self.local)

    def json_case(
        self, path: str, body: Any, ctype: str | None = "application/json", name: str = ""
    ) -> Case:
        data = dump(body)
        headers = {"Content-Type": ctype} if ctype else {}
        return Case("POST", path, data, headers, name=name or path)

    # -- generators, one family each ---------------------------------------------------------------------
    def predict_mutation(self) -> Case:
        rng = self.rng
        body = predict_body(rng, self.image() if rng.random() < 0.5 else f"{self.local}/ok.png")
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(PREDICT_PATHS)
            value = copy.deepcopy(rng.choice(PROJECT_IDS if path == ["project"] else JUNK + IMAGE_REFS[:8]))
            set_path(body, path, value)
        return self.json_case("/predict", body, name="predict-mutation")

    def predict_clicks(self) -> Case:
        rng = self.rng
        body = predict_body(rng, f"{self.local}/ok.png")
        n = rng.choice([0, 1, 99, 100, 101, 150, 1000, 5000])
        label = rng.choice(["Scratch", "Dent", "scratch", "Crack", "", "\x00"])
        regions = [keypoint(rng, label) for _ in range(n)]
        if n and rng.random() < 0.5:
            regions[rng.randrange(n)]["value"]["x"] = rng.choice(
                ["@BIGINT@", "@HUGEINT@", "@INF@", "@NAN@", -1e-300, 100.0000001, "50", "5e1", "0x10", None]
            )
        body["params"]["context"]["result"] = regions
        return self.json_case("/predict", body, name=f"predict-{n}-clicks")

    def predict_batch(self) -> Case:
        rng = self.rng
        n = rng.choice([1, 2, 5, 1001, 3000])
        tasks = [
            {"id": i, "data": {"image": self.image() if rng.random() < 0.2 else f"{self.local}/ok.png"}}
            for i in range(n)
        ]
        if rng.random() < 0.3:
            tasks[rng.randrange(n)] = rng.choice(JUNK)
        body = {
            "tasks": tasks,
            "project": rng.choice(PROJECT_IDS[-4:]),
            "label_config": CONTRACT_CONFIG,
            "params": {"context": None},
        }
        return self.json_case("/predict", body, name=f"predict-batch-{n}")

    def setup(self) -> Case:
        rng = self.rng
        body: dict = {"project": rng.choice(PROJECT_IDS), "schema": CONTRACT_CONFIG}
        what = rng.randrange(4)
        if what == 0:
            body[rng.choice(["schema", "label_config"])] = rng.choice(
                JUNK
                + [
                    "<View>",
                    "<View><Image name='i' value='$image'/></View>",
                    "<!DOCTYPE x [<!ENTITY a 'b'>]><View/>",
                    "<View>" + "<View>" * 2000,
                    "<?xml version='1.0'?>" + "x" * 100,
                ]
            )
        elif what == 1:
            body["extra_params"] = rng.choice(
                JUNK
                + [
                    "{",
                    '{"normal_dir": "/etc"}',
                    "[object Object]",
                    '"x"',
                    "[" * 5000,
                    '{"a":' * 900 + "1" + "}" * 900,
                ]
            )
        elif what == 2:
            body["project"] = rng.choice(PROJECT_IDS)
        else:
            body = rng.choice(JUNK)
        return self.json_case("/setup", body, name="setup")

    def webhook(self) -> Case:
        rng = self.rng
        route = rng.choice(["/webhook", "/webhook", "/train"])
        action = rng.choice(
            [
                "START_TRAINING",
                "ANNOTATION_CREATED",
                "ANNOTATIONS_DELETED",
                "PROJECT_UPDATED",
                None,
                1,
                [],
                "",
                "start_training",
                "x" * 5000,
            ]
        )
        where = rng.randrange(5)
        pid = rng.choice(PROJECT_IDS)
        body: Any = {"action": action}
        if where == 0:
            body["project"] = pid
        elif where == 1:
            body["project"] = {"id": pid, "label_config": rng.choice(JUNK + [CONTRACT_CONFIG])}
        elif where == 2:
            body["annotation"] = {"project": pid}
        elif where == 3:
            body["annotations"] = rng.choice([[{"project": pid}], [pid], pid, []])
        else:
            body = rng.choice(JUNK)
        return self.json_case(route, body, name="webhook")

    def query(self) -> Case:
        rng = self.rng
        route = rng.choice(["/versions", "/health", "/metrics", "/"])
        value = rng.choice(
            [
                "1e999",
                "NaN",
                "-0",
                "-1",
                "0",
                "%00",
                "..%2F..",
                "1" * 100,
                "%ff%fe",
                "&project=2",
                "7",
                "7.1",
                "%E2%80%AE",
                "a" * 3000,
            ]
        )
        return Case("GET", f"{route}?project={value}", name="query")

    def body_junk(self) -> Case:
        rng = self.rng
        route = rng.choice(["/predict", "/setup", "/webhook", "/train"])
        depth = rng.choice([100, 500, 900, 990, 1000, 3000, 100000])
        opener, closer = rng.choice([("[", "]"), ('{"a":', "}"), ('{"tasks":[', "]}")])
        bodies = [
            (opener * depth + "1" + closer * depth).encode(),
            (opener * depth).encode(),
            b"\xff\xfe\x00{",
            bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))),
            b"",
            b"null",
            b"[]",
            b"1",
            b'"x"',
            b"{",
            b"{}" * 3,
            b'{"tasks": NaN}',
            b"\x00" * 10,
            '{"tasks": "\u00e9"}'.encode("utf-16"),
            b'{"project": 1e999, "action": "START_TRAINING"}',
            b'{"a": "\\ud800"}',
            b'{"a": 1, "a": 2}',
            b"{'a': 1}",
        ]
        ctype = rng.choice(CONTENT_TYPES)
        headers = {"Content-Type": ctype} if ctype else {}
        return Case("POST", route, rng.choice(bodies), headers, name=f"body-junk-{depth}")

    def method_path(self) -> Case:
        rng = self.rng
        method = rng.choice(METHODS + ["PROPFIND", "CONNECT", "X" * 20, "GETT", "MOVE"])
        path = rng.choice(
            ROUTES
            + [
                "/predict/",
                "/PREDICT",
                "/nope",
                "/%2e%2e/etc/passwd",
                "/static/../x",
                "/health?x=%00",
                "/data/local-files/?d=x%00y.jpg",
                "//health",
                "/;x",
            ]
        )
        body = None if rng.random() < 0.5 else dump(rng.choice(JUNK))
        headers = {"Content-Type": rng.choice(CONTENT_TYPES) or "application/json"} if body else {}
        kind = "protocol" if method in ("CONNECT",) else "app"
        return Case(method, path, body, headers, kind=kind, name=f"method-{method}")

    def transfer(self, port: int) -> Case:
        rng = self.rng
        route = rng.choice(["/predict", "/setup", "/webhook"])
        head = (
            f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
            "Content-Type: application/json\r\n"
        )
        what = rng.randrange(9)
        if what == 0:  # a chunk size that is not hex
            raw, kind = head + "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", "app"
        elif what == 1:  # chunk data longer than announced
            raw, kind = head + 'Transfer-Encoding: chunked\r\n\r\n2\r\n{"tasks":1}\r\n0\r\n\r\n', "app"
        elif what == 2:  # no terminating chunk (the client half-closes)
            raw, kind = head + "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n", "app"
        elif what == 3:  # Content-Length larger than the body
            raw, kind = head + "Content-Length: 100\r\n\r\n{}", "app"
        elif what == 4:  # a Content-Length that is not a number, negative, or two of them
            cl = rng.choice(["abc", "-1", "1e3", "10, 20", " 2"])
            raw, kind = head + f"Content-Length: {cl}\r\n\r\n{{}}", "protocol"
        elif what == 5:  # both framings at once (request smuggling)
            raw, kind = (
                head + "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
                "protocol",
            )
        elif what == 6:  # huge announced body
            raw, kind = head + f"Content-Length: {rng.choice([10**9, 10**12, 2**63])}\r\n\r\n{{}}", "app"
        elif what == 7:  # a chunk size with an extension or huge hex
            size = rng.choice(["2;x=y", "ffffffffffffffffffff", "-2", "0x2", " 2"])
            raw, kind = head + f"Transfer-Encoding: chunked\r\n\r\n{size}\r\n{{}}\r\n0\r\n\r\n", "protocol"
        else:  # header-level junk gunicorn answers itself
            junk = rng.choice(
                [
                    "X-A: " + "a" * 9000,
                    "Bad Header: x",
                    "X-\x01: y",
                    " folded",
                    "Expect: 100-continue",
                    "Transfer-Encoding: gzip, chunked",
                    "Transfer-Encoding: identity",
                ]
            )
            raw, kind = head + junk + "\r\nContent-Length: 2\r\n\r\n{}", "protocol"
        return Case("POST", route, raw=raw.encode("latin-1"), kind=kind, name=f"transfer-{what}")

    def cases(self, n: int, port: int) -> list[Case]:
        families = [
            (self.predict_mutation, 30),
            (self.predict_clicks, 8),
            (self.predict_batch, 3),
            (self.setup, 14),
            (self.webhook, 14),
            (self.query, 6),
            (self.body_junk, 10),
            (self.method_path, 8),
            (lambda: self.transfer(port), 7),
        ]
        funcs, weights = zip(*families)
        return [self.rng.choices(funcs, weights)[0]() for _ in range(n)]
