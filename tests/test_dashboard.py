"""The Teacher tab's events as an attacker sends them: raw HTTP to Gradio's queue by event index, past the
hidden tab. A learner's session gets an error and no data from every one of them, and changes nothing;
the teacher's session gets the data, so the probe itself works."""
import json
import shutil
import uuid

import httpx
import pytest

from app.accounts import Accounts
from app.embedded import ensure_base
from app.engine import SamplingConfig
from app.quotas import QuotaConfig
from app.store import Store
from app.versions import ModelRegistry

PASSWORD = "pw-dashboard-1234"
# Every event of the tab, by the element that fires it and the data it sends.
DASHBOARD_EVENTS = {("dashboard-refresh", "click"): [], ("rollback", "click"): ["v0000"],
                    ("retrain-now", "click"): [], ("ppo-cycle", "input"): [None], ("teacher-tab", "select"): [],
                    ("exclude", "click"): ["ada", "spam"]}


@pytest.fixture(scope="module")
def school(serve_tutor, tiny_model_dir, tmp_path_factory):
    """A teacher and her learner; v0001 (a copy of the base) is current, so a rollback would show."""
    root = tmp_path_factory.mktemp("dashboard")
    registry = ModelRegistry(root / "models")
    ensure_base(registry, tiny_model_dir, say=lambda *_: None)
    shutil.copytree(registry.path("v0000"), registry.path("v0001"))
    (registry.path("v0001") / "meta.json").write_text(json.dumps({**registry.meta("v0000"), "parent": "v0000"}))
    registry.set_current("v0001")
    with Store(root / "c.db") as store:
        accounts = Accounts(store)
        accounts.add("tess", "teacher", PASSWORD)
        accounts.add("ada", "learner", PASSWORD, teacher="tess")
    with serve_tutor(root, tiny_model_dir, sampling=SamplingConfig(max_new_tokens=4),
                     quotas=QuotaConfig(enabled=False)) as (tutor, url):
        yield tutor, url.rstrip("/"), registry


def logged_in(base: str, name: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=60)
    response = client.post("/login", data={"username": name, "password": PASSWORD})
    assert response.status_code in (200, 302, 303), response.text
    return client


def events_of(client: httpx.Client) -> dict:
    """(elem_id, trigger) -> (event index, trigger component id), from the page's own config."""
    config = client.get("/config").json()
    ids = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    found = {}
    for dependency in config["dependencies"]:
        for component, trigger in dependency["targets"]:
            if (ids.get(component), trigger) in DASHBOARD_EVENTS:
                found[(ids[component], trigger)] = (dependency["id"], component)
    return found


def fire(client: httpx.Client, fn_index: int, trigger_id: int, data: list, session: str | None = None) -> dict:
    """One event through the queue, as the page's JavaScript sends it; its process_completed message."""
    session = session or uuid.uuid4().hex
    joined = client.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                         "event_data": None, "trigger_id": trigger_id})
    assert joined.status_code == 200, joined.text
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("no process_completed message")


def test_a_learner_cannot_fire_any_teacher_event_by_raw_http(school):
    tutor, base, registry = school
    ada, tess = logged_in(base, "ada"), logged_in(base, "tess")
    events = events_of(ada)
    assert set(events) == set(DASHBOARD_EVENTS), "an event of the tab is not probed"
    log = registry.root / "cycles" / "retrain-now.log"
    # The teacher's page session has loaded the tab (so the rollback list holds v0000); the learner sends
    # her events in that very session, whose id is only a string a client picks.
    teachers_page = uuid.uuid4().hex
    assert fire(tess, *events[("dashboard-refresh", "click")], [], session=teachers_page)["success"] is True
    for key, (fn_index, trigger) in events.items():
        message = fire(ada, fn_index, trigger, DASHBOARD_EVENTS[key], session=teachers_page)
        assert message["success"] is False, (key, message)
        assert "only a teacher or an admin" in json.dumps(message), (key, message)
        assert "ada" not in json.dumps(message.get("output", {}).get("data", [])), key  # nothing of the tab's data
    assert registry.current_version() == "v0001" and not log.exists()  # no rollback, no retrain started
    assert tutor.service.store.training_exclusions() == []  # and nobody left out
    refreshed = fire(tess, *events[("dashboard-refresh", "click")], [], session=teachers_page)
    assert refreshed["success"] is True and "ada" in json.dumps(refreshed["output"]["data"])  # the probe works
    rolled = fire(tess, *events[("rollback", "click")], ["v0000"], session=teachers_page)
    assert rolled["success"] is True and registry.current_version() == "v0000"
    excluded = fire(tess, *events[("exclude", "click")], ["ada", "copied answers"], session=teachers_page)
    assert excluded["success"] is True
    assert [(e["kind"], e["target"]) for e in tutor.service.store.training_exclusions()] == [("user", "ada")]
