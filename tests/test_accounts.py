"""Accounts, roles and isolation: the access-control matrix, logins over HTTP, quotas, the command line.

The matrix runs every endpoint as each of anonymous, learner A, learner B, A's teacher and an admin, on an id
of the caller's own and on someone else's, and checks the documented answer: allowed, or refused with the
unknown-id error and not one row changed anywhere in the database.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from app.accounts import LOCAL, Account, AccountError, Accounts
from app.api import session_actor
from app.engine import EngineBusy, SamplingConfig
from app.quotas import QuotaConfig, Quotas
from app.server import ExposureError, check_exposure
from app.service import UserError
from app.store import Store

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"
PEOPLE = {"admin": ("admin", None), "tess": ("teacher", None), "ada": ("learner", "tess"),
          "ben": ("learner", None)}


def add_people(db: Path) -> None:
    with Store(db) as store:
        accounts = Accounts(store)
        for name in ("admin", "tess", "ada", "ben"):  # the teacher before her learner
            role, teacher = PEOPLE[name]
            accounts.add(name, role, PASSWORD, teacher)


@pytest.fixture(scope="module")
def school(serve_tutor, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("school")
    add_people(root / "c.db")
    with serve_tutor(root, tiny_model_dir, sampling=SamplingConfig(max_new_tokens=8),
                     quotas=QuotaConfig(enabled=False)) as (tutor, url):
        yield tutor, url


def account(tutor, name: str) -> Account:
    found = tutor.service.accounts.get(name)
    assert found is not None
    return found


# -- the matrix ------------------------------------------------------------------------------------------
def objects_of(service, owner: Account) -> dict:
    """A conversation of `owner` with a reply, a decided and an open comparison (in a second conversation)."""
    conversation = service.new_conversation(owner, "", "chat")["conversation_id"]
    reply = list(service.chat(owner, conversation, "What is an atom?"))[-1]
    decided = service.compare(owner, conversation, "And a molecule?", 2)
    service.pick(owner, decided["comparison_id"], "A")
    second = service.new_conversation(owner, "", "chat")["conversation_id"]
    open_comparison = service.compare(owner, second, "What is an ion?", 2)["comparison_id"]
    return {"conversation": conversation, "message": reply["message_id"], "decided": decided["comparison_id"],
            "open": open_comparison, "user": owner.name}


# op: (call, who may do it to an object of `owner`)
def owner_only(actor, owner, teacher_of):
    return actor.name == owner


def readers(actor, owner, teacher_of):
    return actor.name == owner or actor.role == "admin" or (actor.role == "teacher" and teacher_of == actor.name)


def stewards(actor, owner, teacher_of):  # exclusions: a teacher of the owner, or an admin
    return actor.role == "admin" or (actor.role == "teacher" and teacher_of == actor.name)


OPS = {
    "chat": (lambda s, a, o: list(s.chat(a, o["conversation"], "Hello?")), owner_only),
    "compare": (lambda s, a, o: s.compare(a, o["conversation"], "Hello?", 2), owner_only),
    "pick": (lambda s, a, o: s.pick(a, o["open"], "B"), owner_only),
    "abandon": (lambda s, a, o: s.abandon(a, o["open"]), owner_only),
    "rate": (lambda s, a, o: s.rate(a, o["message"], "down", "unclear"), owner_only),
    "rewrite": (lambda s, a, o: s.rewrite(a, o["message"], "A better answer."), owner_only),
    "answer_recheck": (lambda s, a, o: s.answer_recheck(a, o["decided"], "B"), owner_only),
    "history": (lambda s, a, o: s.history(a, o["conversation"]), readers),
    "export_data": (lambda s, a, o: s.export_data(a, o["user"]), readers),
    "delete_conversation": (lambda s, a, o: s.delete_conversation(a, o["conversation"]), readers),
    "delete_data": (lambda s, a, o: s.delete_user_data(a, o["user"]), readers),
    "exclude_user": (lambda s, a, o: s.exclude(a, "user", o["user"], "copies answers"), stewards),
    "exclude_conversation": (lambda s, a, o: s.exclude(a, "conversation", o["conversation"], "off-topic"),
                             stewards),
}
ACTORS = ("ada", "ben", "tess", "admin")
# Whose id: the caller's own, learner A's (whose teacher is tess) and learner B's (no teacher).
CASES = [(op, actor, whose) for op in OPS for actor in ACTORS for whose in ("own", "ada", "ben") if whose != actor]


@pytest.mark.parametrize("op,actor_name,whose", CASES)
def test_access_matrix(school, op, actor_name, whose):
    tutor, _ = school
    service, store = tutor.service, tutor.store
    actor = account(tutor, actor_name)
    owner = actor if whose == "own" else account(tutor, whose)
    objects = objects_of(service, owner)
    call, may = OPS[op]
    expected = may(actor, owner.name, owner.teacher)
    before = store.row_counts()
    if expected:
        call(service, actor, objects)
        if op == "abandon":  # an update, not a new row
            assert store.comparison(objects["open"])["abandoned_at"], "the comparison is still open"
        elif op not in ("history", "export_data"):
            assert store.row_counts() != before, f"{op} by {actor_name} on {whose} wrote nothing"
    else:
        with pytest.raises(UserError, match="unknown|no conversation|no user|only a teacher"):
            call(service, actor, objects)
        assert store.row_counts() == before, f"a refused {op} by {actor_name} changed rows"
        assert store.comparison(objects["open"])["abandoned_at"] is None


def test_the_matrix_allows_and_refuses_as_documented():
    """The rules themselves, stated once more in words, so a change to them is a visible change here."""
    ada, ben = Account("ada", "learner", "tess"), Account("ben", "learner")
    tess, admin = Account("tess", "teacher"), Account("admin", "admin")
    assert owner_only(ada, "ada", "tess") and not owner_only(tess, "ada", "tess") and not owner_only(admin, "ada", "tess")
    assert readers(tess, "ada", "tess") and not readers(tess, "ben", None) and readers(admin, "ben", None)
    assert not readers(ben, "ada", "tess") and not stewards(ada, "ada", "tess") and stewards(tess, "ada", "tess")


def test_a_teacher_lists_her_learners_conversations_and_a_learner_only_his_own(school):
    tutor, _ = school
    service = tutor.service
    ada, ben, tess = (account(tutor, n) for n in ("ada", "ben", "tess"))
    objects_of(service, ada)
    objects_of(service, ben)
    assert {c["user"] for c in service.conversations(tess)} <= {"tess", "ada"}
    assert "ada" in {c["user"] for c in service.conversations(tess)}
    assert {c["user"] for c in service.conversations(ben)} == {"ben"}


# -- over HTTP: the session is the user ------------------------------------------------------------------
def test_anonymous_requests_are_refused_and_a_wrong_password_does_not_log_in(school):
    tutor, url = school
    before = tutor.store.row_counts()
    assert httpx.post(url + "gradio_api/call/new_conversation", json={"data": ["ada", "chat"]}).status_code == 401
    with pytest.raises(Exception):
        Client(url, verbose=False)
    with pytest.raises(ValueError, match="login"):
        Client(url, auth=("ada", "wrong password"), verbose=False)
    assert tutor.store.row_counts() == before


def test_the_session_not_the_argument_names_the_user_and_another_account_is_refused(school):
    tutor, url = school
    store = tutor.store
    ada = Client(url, auth=("ada", PASSWORD), verbose=False)
    ben = Client(url, auth=("ben", PASSWORD), verbose=False)
    conversation = ada.predict("ben", "chat", api_name="/new_conversation")["conversation_id"]
    assert store.owner("conversation", conversation) == "ada"  # not the "ben" it asked for
    reply = ada.predict(conversation, "What is a fraction?", api_name="/chat")
    before = store.row_counts()
    for api, args in (("/chat", (conversation, "hi")), ("/compare", (conversation, "hi", 2)),
                      ("/rate", (reply["message_id"], "down", "")), ("/rewrite", (reply["message_id"], "mine")),
                      ("/history", (conversation,)), ("/delete_conversation", (conversation,))):
        with pytest.raises(AppError, match="unknown|no conversation"):
            ben.predict(*args, api_name=api)
    assert store.row_counts() == before
    assert ada.predict(conversation, api_name="/history")[-1]["content"] == reply["text"]


def test_a_disabled_account_is_refused_at_once_even_with_a_session(school):
    tutor, url = school
    client = Client(url, auth=("ben", PASSWORD), verbose=False)
    client.predict("", "chat", api_name="/new_conversation")
    tutor.service.accounts.set_disabled("ben", True)
    try:
        with pytest.raises(AppError, match="log in"):
            client.predict("", "chat", api_name="/new_conversation")
        assert not tutor.service.accounts.verify("ben", PASSWORD)
    finally:
        tutor.service.accounts.set_disabled("ben", False)


def test_a_request_from_another_site_is_refused(school):
    _, url = school
    assert httpx.get(url, headers={"Origin": "https://evil.example"}).status_code == 403
    host = url.split("//")[1].rstrip("/")
    assert httpx.get(url, headers={"Origin": f"http://{host}"}).status_code != 403


def test_an_internal_error_reaches_the_client_without_its_text(school, monkeypatch):
    tutor, url = school
    client = Client(url, auth=("ada", PASSWORD), verbose=False)

    def broken(*_):
        raise RuntimeError("secret path /srv/tutor/conversations.db")

    monkeypatch.setattr(tutor.store, "feedback_counts", broken)
    with pytest.raises(AppError) as raised:
        client.predict(api_name="/status")
    assert "secret" not in str(raised.value) and "/srv" not in str(raised.value)


# -- exposure --------------------------------------------------------------------------------------------
def test_a_network_host_without_accounts_refuses_to_start():
    with pytest.raises(ExposureError, match="add-user"):
        check_exposure("0.0.0.0", has_accounts=False)
    check_exposure("0.0.0.0", has_accounts=True)
    for host in ("127.0.0.1", "localhost", "::1"):
        check_exposure(host, has_accounts=False)


def test_launch_refuses_a_network_host_without_accounts_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--host", "0.0.0.0", "--db", str(tmp_path / "c.db"),
                           "--models-dir", str(tmp_path / "models")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "add-user" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "models").exists()  # refused before any model work


def test_without_accounts_the_local_user_needs_no_login():
    store = Store(":memory:")
    actor = session_actor(type("S", (), {"accounts": Accounts(store)})(), login_required=False)
    assert actor(None) is LOCAL
    with_login = session_actor(type("S", (), {"accounts": Accounts(store)})(), login_required=True)
    with pytest.raises(UserError, match="log in"):
        with_login(None)


# -- accounts: hashing, the command line, a class from a CSV ---------------------------------------------
def test_passwords_are_stored_as_argon2_hashes_and_checked(tmp_path):
    with Store(tmp_path / "c.db") as store:
        accounts = Accounts(store)
        accounts.add("zoe", "learner", PASSWORD)
        stored = store.account("zoe")["password_hash"]
        assert stored.startswith("$argon2id$") and PASSWORD not in stored
        assert accounts.verify("zoe", PASSWORD) and not accounts.verify("zoe", PASSWORD + "!")
        assert not accounts.verify("nobody", PASSWORD)
        for bad in (("zoe", "learner", "short"), ("zo e", "learner", PASSWORD), ("x", "king", PASSWORD),
                    ("zoe", "learner", PASSWORD)):
            with pytest.raises(AccountError):
                accounts.add(*bad)


def test_repeated_failed_logins_lock_the_name_out(tmp_path):
    with Store(tmp_path / "c.db") as store:
        accounts = Accounts(store)
        accounts.add("zoe", "learner", PASSWORD)
        for _ in range(10):
            assert not accounts.verify("zoe", "guess-guess")
        assert not accounts.verify("zoe", PASSWORD)  # locked for the window, right password or not


def test_add_user_from_the_command_line_and_a_class_from_a_csv(tmp_path):
    db = tmp_path / "c.db"
    run = lambda *args, stdin="": subprocess.run(  # noqa: E731
        [sys.executable, str(ROOT / "launch.py"), "--db", str(db), *args], input=stdin, capture_output=True,
        text=True, timeout=120)
    assert run("--add-user", "tess", "--role", "teacher", stdin=PASSWORD + "\n").returncode == 0
    (tmp_path / "class.csv").write_text("name,role,teacher,password\nada,learner,tess,\nben,learner,tess,"
                                        + PASSWORD + "\n")
    done = run("--add-users", str(tmp_path / "class.csv"))
    assert done.returncode == 0, done.stderr
    generated = dict(line.split(",")[0::3] for line in done.stdout.splitlines())
    assert run("--add-users", str(tmp_path / "class.csv")).returncode == 2  # all or nothing: ada exists
    assert run("--disable-user", "ben").returncode == 0
    with Store(db) as store:
        accounts = Accounts(store)
        assert accounts.verify("ada", generated["ada"]) and accounts.get("ada").teacher == "tess"
        assert accounts.get("ben") is None and not accounts.verify("ben", PASSWORD)
        assert store.learners_of("tess") == ["ada", "ben"]


def test_account_commands_do_not_load_the_serving_stack(tmp_path):
    """A teacher adding a class waits for the DB, not for torch and the model to load."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import launch;"
            "code = launch.main(['--db', sys.argv[2], '--list-users']);"
            "print(code, sorted(m for m in ('torch', 'transformers', 'gradio') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "c.db")], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.split("\n")[-2] == "0 []", done.stdout + done.stderr


# -- quotas ----------------------------------------------------------------------------------------------
def test_the_call_past_a_cap_gets_a_clear_error_and_writes_nothing(school):
    tutor, _ = school
    service = tutor.service
    ada = account(tutor, "ada")
    old = service.quotas
    service.quotas = Quotas(tutor.store, QuotaConfig(per_minute={"rate": 2}, per_day={"rewrite": 1}))
    try:
        objects = objects_of(service, ada)
        for _ in range(2):
            service.rate(ada, objects["message"], "up", "")
        before = tutor.store.row_counts()
        with pytest.raises(UserError, match="too many ratings in a minute"):
            service.rate(ada, objects["message"], "up", "")
        assert tutor.store.row_counts() == before
        # The daily cap counts rows of the last 24 hours, here the one rewrite already stored.
        service.rewrite(ada, objects["message"], "Better.")
        before = tutor.store.row_counts()
        with pytest.raises(UserError, match="today's limit of 1 rewrites"):
            service.rewrite(ada, objects["message"], "Better still.")
        assert tutor.store.row_counts() == before
    finally:
        service.quotas = old


def test_the_minute_window_slides(tmp_path):
    now = [0.0]
    with Store(tmp_path / "c.db") as store:
        quotas = Quotas(store, QuotaConfig(per_minute={"chat": 1}, per_day={}), clock=lambda: now[0])
        quotas.spend("ada", "chat")
        with pytest.raises(Exception, match="try again in"):
            quotas.spend("ada", "chat")
        quotas.spend("ben", "chat")  # per user
        now[0] = 61.0
        quotas.spend("ada", "chat")


def test_a_turn_the_busy_tutor_refused_does_not_count_against_the_minute_limit(school, monkeypatch):
    tutor, _ = school
    service = tutor.service
    ada = account(tutor, "ada")
    conversation = service.new_conversation(ada, "", "chat")["conversation_id"]
    monkeypatch.setattr(service, "quotas", Quotas(tutor.store, QuotaConfig(per_minute={"chat": 1, "compare": 1},
                                                                           per_day={})))

    def busy(*_, **__):
        raise EngineBusy("the tutor is busy (64 requests waiting); try again in a moment")

    with monkeypatch.context() as full_queue:
        for method in ("submit", "submit_group"):
            full_queue.setattr(type(service.engine), method, busy)
        with pytest.raises(UserError, match="busy"):
            list(service.chat(ada, conversation, "What is an atom?"))
        with pytest.raises(UserError, match="busy"):
            service.compare(ada, conversation, "What is a molecule?", 2)
    # the one message and the one comparison a minute allows are still hers
    assert list(service.chat(ada, conversation, "What is an atom?"))[-1]["done"]
    with pytest.raises(UserError, match="too many messages in a minute"):
        list(service.chat(ada, conversation, "What is an ion?"))
    assert service.compare(ada, conversation, "What is a molecule?", 2)["done"]


def test_only_teachers_admins_and_the_local_user_may_see_and_steer_the_loop():
    from app.dashboard import may_steer

    assert [may_steer(a) for a in (Account("tess", "teacher"), Account("root", "admin"), LOCAL)] == [True] * 3
    assert not may_steer(Account("ada", "learner", "tess"))


def test_a_teacher_sees_only_her_learners_on_the_dashboard(school):
    from app.loop_view import learners_of, learners_rows

    tutor, _ = school
    store = tutor.service.store

    def rows(name):
        who = account(tutor, name)
        return [r[0] for r in learners_rows(store, tutor.registry, learners_of(store, who.role, who.name))]
    assert rows("tess") == ["ada"]
    assert sorted(rows("admin")) == ["ada", "ben"]
    assert rows("ben") == ["ben"]