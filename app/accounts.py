"""Accounts, roles and who may see what.

Roles: a learner chats and gives feedback in their own conversations; a teacher has learners
(`accounts.teacher`) and reads, exports, deletes and excludes from training their data; an admin
manages accounts and reads everything. Nobody writes into another user's conversation.

Passwords are hashed with Argon2id (argon2-cffi's defaults, which follow RFC 9106). A server
without accounts serves one local user, `LOCAL`, who owns every conversation in the file: that is
only allowed on a loopback address (app/server.py refuses anything else).
"""
from __future__ import annotations

import csv
import io
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

import argon2

from app.store import ACCOUNT_ROLES, Store

MAX_NAME_CHARS = 64
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 256  # Argon2 takes any length; a bound keeps one login from costing much
# Failed logins of one name within the window lock that name out for the rest of it.
MAX_FAILED_LOGINS, FAILED_LOGIN_WINDOW_S = 10, 600.0


@dataclass(frozen=True)
class Account:
    name: str
    role: str  # "learner" | "teacher" | "admin" | "local"
    teacher: str | None = None

    @property
    def is_local(self) -> bool:
        return self.role == "local"


# The one user of a loopback server without accounts; "" is the user column of its conversations.
LOCAL = Account(name="", role="local")


class AccountError(ValueError):
    """A bad account request; the message is one line for the user."""


class Accounts:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._hasher = argon2.PasswordHasher()
        # Spent on unknown names too, so a login's time does not tell whether the name exists.
        self._dummy_hash = self._hasher.hash(secrets.token_hex(16))
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    # -- managing accounts (command line, admin) ---------------------------------------------------
    def add(self, name: str, role: str, password: str, teacher: str | None = None) -> Account:
        name = _check_name(name)
        if role not in ACCOUNT_ROLES:
            raise AccountError(f"role must be one of {', '.join(ACCOUNT_ROLES)}, not {role!r}")
        _check_password(password)
        if teacher is not None and role != "learner":
            raise AccountError("only a learner has a teacher")
        try:
            self.store.add_account(name, role, self._hasher.hash(password), teacher or None)
        except (LookupError, ValueError) as exc:
            raise AccountError(str(exc.args[0]) if exc.args else str(exc)) from None
        return Account(name, role, teacher or None)

    def add_from_csv(self, text: str) -> list[tuple[Account, str]]:
        """A class at once: CSV with a header `name,role,teacher,password` (teacher and password
        may be empty; a missing password is generated). All rows are checked before any is added.
        Returns each account with its password, to hand out."""
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or "name" not in rows[0]:
            raise AccountError("the CSV needs a header line with at least: name,role,teacher,password")
        planned, names = [], set()
        for line, row in enumerate(rows, start=2):
            name = _check_name(row.get("name") or "", where=f"line {line}: ")
            role = (row.get("role") or "learner").strip()
            teacher = (row.get("teacher") or "").strip() or None
            password = (row.get("password") or "").strip() or generate_password()
            if role not in ACCOUNT_ROLES:
                raise AccountError(f"line {line}: role must be one of {', '.join(ACCOUNT_ROLES)}")
            _check_password(password, where=f"line {line}: ")
            if name in names or self.store.account(name) is not None:
                raise AccountError(f"line {line}: account {name!r} already exists")
            names.add(name)
            planned.append((name, role, password, teacher))
        # Teachers first, so learners of a teacher added in the same file can name them.
        planned.sort(key=lambda p: p[1] != "teacher")
        return [(self.add(*p), p[2]) for p in planned]

    def set_password(self, name: str, password: str) -> None:
        _check_password(password)
        self._require(name)
        self.store.update_account(name, password_hash=self._hasher.hash(password))

    def set_disabled(self, name: str, disabled: bool) -> None:
        self._require(name)
        self.store.update_account(name, disabled=disabled)

    # -- logging in and using the app ------------------------------------------------------------
    def verify(self, name: str, password: str) -> bool:
        """Gradio's `auth` callable: True for an enabled account with this password."""
        if not isinstance(name, str) or not isinstance(password, str) or len(password) > MAX_PASSWORD_CHARS:
            return False
        if self._locked_out(name):
            return False
        row = self.store.account(name) if len(name) <= MAX_NAME_CHARS else None
        try:
            ok = self._hasher.verify(row["password_hash"] if row else self._dummy_hash, password)
        except argon2.exceptions.VerificationError:
            ok = False
        ok = ok and row is not None and not row["disabled"]
        if not ok:
            self._record_failure(name)
        return ok

    def get(self, name: str | None) -> Account | None:
        """The enabled account of this name; None for an unknown or disabled one."""
        row = self.store.account(name) if isinstance(name, str) and name else None
        if row is None or row["disabled"]:
            return None
        return Account(row["name"], row["role"], row["teacher"])

    def can_read(self, actor: Account, owner: str) -> bool:
        """Whether `actor` may read (history, export) data of the user `owner`."""
        if actor.is_local or actor.name == owner or actor.role == "admin":
            return True
        if actor.role == "teacher":
            row = self.store.account(owner)
            return row is not None and row["teacher"] == actor.name
        return False

    def readable_users(self, actor: Account) -> list[str]:
        if actor.role == "teacher":
            return [actor.name, *self.store.learners_of(actor.name)]
        if actor.role == "admin":
            return [row["name"] for row in self.store.accounts()]
        return [actor.name]

    # -- helpers ---------------------------------------------------------------------------------
    def _require(self, name: str) -> None:
        if self.store.account(name) is None:
            raise AccountError(f"no account named {name!r}")

    def _locked_out(self, name: str) -> bool:
        with self._lock:
            recent = self._failures.get(name)
            now = time.monotonic()
            while recent and now - recent[0] > FAILED_LOGIN_WINDOW_S:
                recent.popleft()
            return bool(recent) and len(recent) >= MAX_FAILED_LOGINS

    def _record_failure(self, name: str) -> None:
        with self._lock:
            self._failures.setdefault(name[:MAX_NAME_CHARS], deque()).append(time.monotonic())


def generate_password() -> str:
    return secrets.token_urlsafe(9)  # 12 characters, 72 bits


def _check_name(name: str, where: str = "") -> str:
    name = (name or "").strip()
    if not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable() or any(c.isspace() for c in name):
        raise AccountError(f"{where}an account name is 1 to {MAX_NAME_CHARS} printable characters "
                           "without spaces")
    return name


def _check_password(password: str, where: str = "") -> None:
    if not isinstance(password, str) or not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise AccountError(f"{where}a password is {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters")
