"""What the endpoints do, independent of Gradio: check who asks, validate, moderate, generate, store.

Every call names its `actor`, the account of the session (app/accounts.py); an id that belongs to
somebody the actor may not act for is refused exactly like an unknown id, so a refusal does not
even tell that the id exists. Every check (type, size, ownership, quota, moderation) runs before the
first write, so a refused request raises `UserError` and leaves the database as it was. A reply is
stored (user turn and answer together, in one transaction) only once it is complete; a client that
goes away mid-reply cancels its generation and leaves no half turn behind.

What a learner writes is moderated before the model sees it: an unsafe message gets a kind refusal
and is kept only flagged, off the conversation's line. What the model writes is moderated as it
streams: an unsafe reply is replaced before any of its unsafe part is shown, and stored flagged.
"""
from __future__ import annotations

import random
import re
import threading
import uuid
from datetime import datetime, timezone
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from app.accounts import LOCAL, Account, Accounts
from app.engine import EngineBusy, EngineFault, GenerationEngine, submit_across
from app.quotas import QuotaExceeded, Quotas
from app.store import CONSENT_CHOICES, EXCLUSION_KINDS, Store
from core.active import AskingConfig, Asked, CommitteeFile, choose_shown, offers_comparison
from core.chat_format import TUTOR_SYSTEM_PROMPT, PromptTooLong
from core.moderation import OUTPUT_REPLACEMENT, STREAM_WINDOW, Moderator, refusal
from core.privacy import redact

PURPOSES = ("chat", "eval")
RATINGS = ("up", "down")
# Offered by the UI; /rate also accepts free text up to MAX_REASON_CHARS.
REASONS_DOWN = ("wrong", "unclear", "gave the answer away", "too long", "off-topic", "other")
REASONS_UP = ("clear", "encouraging", "good hint", "good example")
MAX_ID_CHARS = 64  # ids are uuid hex strings (32); anything longer is not one
# An arena pair shows one answer of each version, whatever the asking mode says.
ARENA_ASKED = Asked("arena", "a canary's arena pair: one answer from each version", 2, None, None).as_dict()


class UserError(ValueError):
    """Bad input or a request that cannot be served now; the message is shown to the user as is."""


@dataclass
class Limits:
    max_message_chars: int = 4000  # a long question fits easily; a pasted book does not
    max_reason_chars: int = 500
    max_rewrite_chars: int = 8000
    max_user_chars: int = 200
    max_candidates: int = 4
    recheck_every: int = 5  # after every 5th pick the page asks again about an earlier one
    # An undecided comparison older than this is abandoned when its conversation goes on, so a
    # learner who left one open (a closed tab, a lost connection) never finds it locked.
    comparison_timeout_s: float = 15 * 60


class TutorService:
    def __init__(self, store: Store, engine: GenerationEngine, limits: Limits | None = None,
                 system_prompt: str = TUTOR_SYSTEM_PROMPT, rng: random.Random | None = None, *,
                 accounts: Accounts | None = None, quotas: Quotas | None = None,
                 moderator: Moderator | None = None, arena=None, asking: AskingConfig | None = None,
                 committee: CommitteeFile | None = None) -> None:
        self.store, self.engine = store, engine
        # Which answers a comparison shows (core/active.py): as sampled, or where the committee that the
        # last cycle fitted is least sure; without a committee file, always as sampled.
        self.asking, self.committee = asking or AskingConfig(), committee
        self.arena = arena  # app/canary.py's Arena: canary conversations and arena pairs; None: neither
        self.limits = limits or Limits()
        self.system_prompt = system_prompt
        self.rng = rng or random.Random()
        self.accounts = accounts or Accounts(store)
        self.quotas = quotas or Quotas(store)
        self.moderator = moderator or Moderator()
        self._busy: set[str] = set()  # conversations with a reply being written
        self._busy_lock = threading.Lock()

    # -- conversations ---------------------------------------------------------------------------
    def new_conversation(self, actor: Account, user: str = "", purpose: str = "chat") -> dict:
        if purpose not in PURPOSES:
            raise UserError(f"purpose must be one of {', '.join(PURPOSES)}, not {_show(purpose)}")
        if not isinstance(user, str):
            raise UserError(f"user must be a string, not {_show(user)}")
        if len(user) > self.limits.max_user_chars:
            raise UserError(f"user name is longer than {self.limits.max_user_chars} characters")
        # With accounts the session says who the user is; the argument only names the local user.
        owner = user if actor.is_local else actor.name
        self._spend(actor, "conversation")
        return {"conversation_id": self.store.new_conversation(owner, purpose, self.system_prompt)}

    def chat(self, actor: Account, conversation_id: str, message: str) -> Iterator[dict]:
        """Streams {"message_id", "text", "model_version", "done"}; `text` is the reply so far."""
        conversation_id = self._own(actor, "conversation", conversation_id)
        message = self.check_message(message)
        messages = self._context(conversation_id, message)
        self._spend(actor, "chat")
        verdict = self.moderator.check(message)
        if verdict.flagged:  # never reaches the model; kept flagged for a teacher to see
            yield self._refuse(conversation_id, message, verdict)
            return
        with self._turn(conversation_id):
            engine = self.arena.engine_for(self.store.conversation(conversation_id)) if self.arena else self.engine
            request = self._submit(actor, "chat", messages, engine=engine)
            message_id = uuid.uuid4().hex
            tokens: list[int] = []
            flag = None
            try:
                # the engine finds that the prompt cannot fit, or cannot serve it (a clear message)
                with as_user_error(PromptTooLong, EngineFault):
                    for chunk in request.token_chunks(self.engine.config.token_timeout_s):
                        tokens.extend(chunk)
                        text, flag = self._shown(request, tokens)
                        if flag:  # stop before this chunk is shown
                            break
                        if text is None:
                            continue
                        yield {"message_id": message_id, "text": text,
                               "model_version": request.model_version, "done": False}
            finally:
                request.cancel()  # no-op when finished; stops the row when the client went away
            if request.finish_reason == "cancelled" and flag is None:
                return
            text, flag = self._final(request, tokens, flag)
            self.store.add_turn(conversation_id, message, text, message_id=message_id,
                                model_version=request.model_version, generation=self._generation(request, flag),
                                context=request.context, reply_flag=flag)
            yield {"message_id": message_id, "text": text, "model_version": request.model_version, "done": True}

    def compare(self, actor: Account, conversation_id: str, message: str, k: int = 2, *,
                offered: bool = False) -> dict:
        """The last chunk of `compare_stream`: every candidate complete and stored."""
        result = None
        for result in self.compare_stream(actor, conversation_id, message, k, offered=offered):
            pass
        return result

    def offers_comparison(self, actor: Account, conversation_id: str) -> bool:
        """Whether the app answers the learner's next message in this conversation with a comparison
        instead of one answer (core/active.py `offers_comparison`). Only learners whose feedback may be
        used are asked: a choice nobody may learn from is not worth their time; and only while their
        comparison quota lasts, so that a learner whose comparisons are spent gets the answer she asked for."""
        conversation_id = self._own(actor, "conversation", conversation_id)
        if self.asking.offer_share <= 0 or self.consent(actor) != "given":
            return False
        if not actor.is_local and not self.quotas.allows(actor.name, "compare"):
            return False
        return offers_comparison(self.store.turns_since_comparison(conversation_id), self.asking, self.rng)

    def compare_stream(self, actor: Account, conversation_id: str, message: str, k: int = 2, *,
                       offered: bool = False) -> Iterator[dict]:
        """k answers to the same turn, sampled in one batch and streamed side by side, in the random
        order they are shown and stored in. Chunks are {"comparison_id", "candidates": [{"message_id",
        "text" so far, "model_version"}], "done"}; the comparison is stored only when all k are
        complete, so a client that goes away stops all k and leaves nothing behind. An arena pair (two
        versions' answers, app/canary.py) is blind: its model_version stays None until the pick.

        In active asking (core/active.py) `pool_factor` times k answers are sampled and the k the committee
        is least sure about are shown: nothing can be shown before all are complete, so the chunks before
        the last carry empty answers. Every comparison stores why it shows what it shows (`asked`), and
        whether the app offered it (`offered`) or the learner asked for it."""
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= self.limits.max_candidates:
            raise UserError(f"k must be a whole number from 2 to {self.limits.max_candidates}, not {_show(k)}")
        conversation_id = self._own(actor, "conversation", conversation_id)
        message = self.check_message(message)
        messages = self._context(conversation_id, message)
        self._spend(actor, "compare")
        verdict = self.moderator.check(message)
        if verdict.flagged:
            raise UserError(refusal(verdict))
        with self._turn(conversation_id):
            opponent = self.arena.opponent() if self.arena and k == 2 else None
            committee = self.committee.get() if self.committee is not None and opponent is None else None
            pooled = committee is not None and self.asking.mode == "active" and self.asking.pool_factor > 1
            # at most one engine batch: k is the learner's to choose, and one request must not crowd out the rest
            n = min(k * self.asking.pool_factor, max(k, self.engine.config.max_batch_size)) if pooled else k
            group = (self._submit(actor, "compare", messages, n) if opponent is None
                     else self._submit(actor, "compare", messages, engines=[self.engine, opponent]))
            comparison_id, ids = uuid.uuid4().hex, [uuid.uuid4().hex for _ in range(k)]
            shown = list(range(k))  # shown[j]: the request shown at position j (label A, B, ...)
            self.rng.shuffle(shown)
            tokens: list[list[int]] = [[] for _ in range(n)]
            texts, flags = [""] * n, [None] * n

            def chunk(done: bool) -> dict:
                return {"comparison_id": comparison_id, "done": done, "candidates": [
                    {"message_id": ids[j], "text": texts[i],
                     "model_version": None if opponent else group.requests[i].model_version}
                    for j, i in enumerate(shown)]}
            try:
                with as_user_error(PromptTooLong, EngineFault):
                    for new in group.token_chunks(self.engine.config.token_timeout_s):
                        for i, more in new.items():
                            tokens[i].extend(more)
                            text, flags[i] = self._shown(group.requests[i], tokens[i])
                            if flags[i]:  # this candidate stops; its unsafe part is never shown
                                texts[i] = OUTPUT_REPLACEMENT
                                group.cancel(i)
                            elif text is not None:
                                texts[i] = text
                        # a pool is chosen from once complete: until then empty answers, which still give a
                        # client that went away the point at which it stops the pool
                        yield chunk(done=False) if not pooled else {**chunk(done=False), "candidates": [
                            {"message_id": ids[j], "text": "", "model_version": None} for j in range(k)]}
            finally:
                group.cancel()  # no-op for finished rows; stops them all when the client went away
            if any(r.finish_reason == "cancelled" and flag is None for r, flag in zip(group.requests, flags)):
                return
            for i, request in enumerate(group.requests):
                texts[i], flags[i] = self._final(request, tokens[i], flags[i])
            why = self._ask(committee, tokens, flags, k) if opponent is None else ARENA_ASKED
            asked = {**why, "offered": offered}
            if pooled:
                shown = list(asked.pop("shown"))
                self.rng.shuffle(shown)
            else:
                asked.pop("shown", None)
            candidates = [{"text": texts[i], "model_version": group.requests[i].model_version,
                           "generation": self._generation(group.requests[i], flags[i]),
                           "context": group.requests[i].context, "flag": flags[i]} for i in shown]
            self.store.add_comparison(conversation_id, message, group.requests[shown[0]].context, candidates,
                                      comparison_id=comparison_id, message_ids=ids, arena=opponent is not None,
                                      asked=asked)
        yield chunk(done=True)

    def _ask(self, committee, tokens: list[list[int]], flags: list[str | None], k: int) -> dict:
        """Which k of the sampled answers to show (all of them unless the pool is larger) and why, with
        the shown request indices under "shown". Answers moderation stopped are shown only when fewer
        than k others are left."""
        safe = [i for i in range(len(tokens)) if flags[i] is None]
        choosable = safe if len(safe) >= k else (safe + [i for i in range(len(tokens)) if flags[i]])[:k]
        picked, asked = choose_shown(committee, [tokens[i] for i in choosable], k, self.asking, self.rng)
        return {**asked.as_dict(), "shown": [choosable[p] for p in picked]}

    def open_comparison(self, actor: Account, conversation_id: str) -> dict | None:
        """The conversation's undecided comparison in `compare`'s shape, for a learner who comes back
        (only the owner may pick, so only the owner is shown it)."""
        conversation_id = self._own(actor, "conversation", conversation_id)
        undecided = self.store.undecided_comparison(conversation_id)
        comparison = undecided and self.store.comparison(undecided)
        if not comparison or self._stale(comparison):
            return None
        return {"comparison_id": undecided, "done": True, "candidates": [
            {"message_id": c["message_id"], "text": c["content"], "model_version": None}
            for c in comparison["candidates"]]}

    def abandon(self, actor: Account, comparison_id: str) -> dict:
        """Skips an undecided comparison: the conversation goes on without that turn."""
        comparison_id = self._own(actor, "comparison", comparison_id)
        with as_user_error(ValueError):
            self.store.abandon_comparison(comparison_id)
        return {"ok": True}

    # -- feedback --------------------------------------------------------------------------------
    def pick(self, actor: Account, comparison_id: str, choice: str) -> dict:
        comparison_id = self._own(actor, "comparison", comparison_id)
        if not isinstance(choice, str) or len(choice) > 32:
            raise UserError("choice must be a short string such as 'A', 'tie', 'C,A,B' or 'C,A=B'")
        self._spend(actor, "pick")
        with as_user_error(LookupError, ValueError):
            decision = self.store.decide_comparison(comparison_id, choice)
        if not decision["versions"]:
            return {"ok": True, "winner": decision["winner"]}
        # an arena vote: the versions are shown now that the pick is in, and may decide a canary
        ended = self.arena.review() if self.arena else None
        return {"ok": True, "winner": decision["winner"], "canary": ended, "versions": decision["versions"]}

    def rate(self, actor: Account, message_id: str, rating: str, reason: str = "") -> dict:
        message_id = self._own(actor, "message", message_id)
        if rating not in RATINGS:
            raise UserError(f"rating must be 'up' or 'down', not {_show(rating)}")
        if not isinstance(reason, str) and reason is not None:
            raise UserError("reason must be text")
        reason = (reason or "").strip()
        if len(reason) > self.limits.max_reason_chars:
            raise UserError(f"reason is longer than {self.limits.max_reason_chars} characters")
        self._check_safe(reason)
        self._spend(actor, "rate")
        with as_user_error(LookupError, ValueError):
            self.store.add_rating(message_id, rating, reason)
        return {"ok": True}

    def rewrite(self, actor: Account, message_id: str, text: str) -> dict:
        message_id = self._own(actor, "message", message_id)
        text = (text or "").strip() if isinstance(text, str) or text is None else None
        if text is None:
            raise UserError("the rewritten answer must be text")
        if not text:
            raise UserError("the rewritten answer is empty")
        if len(text) > self.limits.max_rewrite_chars:
            raise UserError(f"the rewritten answer is longer than {self.limits.max_rewrite_chars} characters")
        self._check_safe(text)
        self._spend(actor, "rewrite")
        with as_user_error(LookupError, ValueError):
            self.store.add_rewrite(message_id, text)
        return {"ok": True}

    def recheck(self, actor: Account, skip: str | None = None) -> dict | None:
        """Now and then a learner is shown a comparison they decided before, in flipped order; how
        often the second pick agrees with the first is one measure of how much their picks say.
        `skip`: the comparison just decided, which would be asked again from memory."""
        comparison = self.store.repeat_candidate(actor.name, skip)
        if comparison is None:
            return None
        a, b = comparison["candidates"]
        return {"comparison_id": comparison["id"], "context": comparison["context"],
                "candidates": [{"label": "A", "text": b["content"]}, {"label": "B", "text": a["content"]}]}

    def recheck_after_pick(self, actor: Account, just_decided: str) -> dict | None:
        """After every `recheck_every`-th pick of `actor`: an earlier comparison to ask again about."""
        picks = self.store.activity_since(actor.name, "")["pick"]
        return self.recheck(actor, skip=just_decided) if picks % self.limits.recheck_every == 0 else None

    def answer_recheck(self, actor: Account, comparison_id: str, choice: str) -> dict:
        comparison_id = self._own(actor, "comparison", comparison_id)
        if choice not in ("A", "B"):
            raise UserError(f"choice must be 'A' or 'B', not {_show(choice)}")
        self._spend(actor, "recheck")
        flipped = {"A": "B", "B": "A"}[choice]  # the labels were shown swapped
        with as_user_error(LookupError, ValueError):
            self.store.add_repeat_check(comparison_id, actor.name, flipped)
        return {"ok": True}

    # -- reading, consent, export and delete -----------------------------------------------------
    def status(self, actor: Account | None = None) -> dict:
        if self.arena:
            self.arena.review_if_due()  # a canary's time budget ends even when nobody votes
        return {"model_version": self.engine.version, "feedback": self.store.feedback_counts(),
                "last_cycle": self.store.last_cycle(), "load": self.engine.load_stats(),
                "engine": self.engine.health(), "canary": self.arena.summary() if self.arena else None}

    def history(self, actor: Account, conversation_id: str) -> list[dict]:
        conversation_id = self._readable(actor, "conversation", conversation_id)
        with as_user_error(LookupError, ValueError):
            return self.store.history(conversation_id)

    def conversations(self, actor: Account) -> list[dict]:
        if actor.is_local:
            raise UserError("listing conversations needs accounts")
        return self.store.conversations_of(self.accounts.readable_users(actor))

    def set_consent(self, actor: Account, choice: str) -> dict:
        if choice not in CONSENT_CHOICES:
            raise UserError(f"consent must be one of {', '.join(CONSENT_CHOICES)}, not {_show(choice)}")
        self.store.set_consent(actor.name, choice)
        return {"ok": True, "consent": choice}

    def consent(self, actor: Account) -> str | None:
        return self.store.consent(actor.name)

    def export_data(self, actor: Account, user: str | None = None) -> list[dict]:
        """The user's conversations and feedback as JSON records, personal details redacted."""
        user = self._data_owner(actor, user)
        return [_redacted(record) for record in self.store.user_data(user)]

    def delete_conversation(self, actor: Account, conversation_id: str) -> dict:
        conversation_id = self._readable(actor, "conversation", conversation_id)
        gone = self.store.delete_conversations([conversation_id], "conversation", conversation_id)
        return {"ok": True, "deleted_feedback": sum(map(len, gone.values()))}

    def delete_user_data(self, actor: Account, user: str | None = None) -> dict:
        user = self._data_owner(actor, user)
        ids = [c["conversation_id"] for c in self.store.conversations_of([user])]
        gone = self.store.delete_conversations(ids, "user", user)
        return {"ok": True, "deleted_conversations": len(ids), "deleted_feedback": sum(map(len, gone.values()))}

    def exclude(self, actor: Account, kind: str, target: str, reason: str) -> dict:
        """A teacher leaves one of their learners, or one conversation, out of every later cycle."""
        if actor.role not in ("teacher", "admin"):
            raise UserError("only a teacher or an admin can exclude data from training")
        if kind not in EXCLUSION_KINDS:
            raise UserError(f"kind must be one of {', '.join(EXCLUSION_KINDS)}, not {_show(kind)}")
        if kind == "conversation":
            target = _check_id("conversation", target)
            owner = self.store.owner("conversation", target)
            if owner is None or not self._steward(actor, owner):
                raise UserError(_unknown("conversation", target))
        elif not isinstance(target, str) or self.store.account(target) is None or not self._steward(actor, target):
            raise UserError(f"no user named {_show(target)}")
        if not isinstance(reason, str) or len(reason.strip()) > self.limits.max_reason_chars:
            raise UserError(f"reason must be text of at most {self.limits.max_reason_chars} characters")
        self.store.add_exclusion(kind, target, redact(reason.strip()), actor.name)
        return {"ok": True}

    # -- checks (each runs before any write) -----------------------------------------------------
    def check_message(self, message: str) -> str:
        if not isinstance(message, str) or not message.strip():
            raise UserError("the message is empty")
        if len(message) > self.limits.max_message_chars:
            raise UserError(f"the message is {len(message):,} characters; the limit is "
                            f"{self.limits.max_message_chars:,}")
        return message.strip()

    def _own(self, actor: Account, kind: str, item_id: Any) -> str:
        """The id, if `actor` may write to it; the unknown-id error otherwise."""
        item_id = _check_id(kind, item_id)
        owner = self.store.owner(kind, item_id)
        if owner is None or not (actor.is_local or owner == actor.name):
            raise UserError(_unknown(kind, item_id))
        return item_id

    def _readable(self, actor: Account, kind: str, item_id: Any) -> str:
        item_id = _check_id(kind, item_id)
        owner = self.store.owner(kind, item_id)
        if owner is None or not self.accounts.can_read(actor, owner):
            raise UserError(_unknown(kind, item_id))
        return item_id

    def _data_owner(self, actor: Account, user: str | None) -> str:
        if user in (None, "") or user == actor.name:
            return actor.name
        if not isinstance(user, str) or len(user) > self.limits.max_user_chars \
                or not self.accounts.can_read(actor, user) or self.store.account(user) is None:
            raise UserError(f"no user named {_show(user)}")
        return user

    def _steward(self, actor: Account, owner: str) -> bool:
        """An admin, or the teacher of `owner`: who may leave `owner`'s data out of training."""
        if actor.role == "admin":
            return True
        row = self.store.account(owner)
        return actor.role == "teacher" and row is not None and row["teacher"] == actor.name

    def _spend(self, actor: Account, kind: str) -> None:
        # Quotas stop one account from steering what others' feedback teaches; the local user of a
        # server without accounts is the only one (and bench/learner.py drives it at full speed).
        if actor.is_local:
            return
        try:
            self.quotas.spend(actor.name, kind)
        except QuotaExceeded as exc:
            raise UserError(str(exc)) from None

    def _refund(self, actor: Account, kind: str) -> None:
        """Gives back what `_spend` counted for an action that did not happen (the engine refused it)."""
        if not actor.is_local:
            self.quotas.refund(actor.name, kind)

    def _check_safe(self, text: str) -> None:
        if text:
            verdict = self.moderator.check(text)
            if verdict.flagged:
                raise UserError(refusal(verdict))

    def _refuse(self, conversation_id: str, message: str, verdict) -> dict:
        text = refusal(verdict)
        message_id = self.store.add_turn(conversation_id, message, text, model_version=None,
                                         input_flag=f"unsafe_input:{verdict.category}")
        return {"message_id": message_id, "text": text, "model_version": self.engine.version, "done": True}

    def _context(self, conversation_id: str, message: str) -> list[dict]:
        conversation = self.store.conversation(conversation_id)
        undecided = self.store.undecided_comparison(conversation_id)
        # a comparison whose learner left long ago: nobody will pick, so it is skipped
        if undecided and self._stale(self.store.comparison(undecided)):
            self.store.abandon_comparison(undecided)
        elif undecided:
            raise UserError("pick the best answer of the open comparison (or skip it) before going on")
        turns = [{"role": m["role"], "content": m["content"]} for m in self.store.history(conversation_id)]
        return [{"role": "system", "content": conversation["system_prompt"]}, *turns,
                {"role": "user", "content": message}]

    def _stale(self, comparison: dict) -> bool:
        created = datetime.fromisoformat(comparison["created_at"])
        if created.tzinfo is None:
            created = created.replace(tzinfo=timezone.utc)
        return (datetime.now(timezone.utc) - created).total_seconds() > self.limits.comparison_timeout_s

    def _submit(self, actor: Account, kind: str, messages: list[dict], n: int | None = None,
                engine: GenerationEngine | None = None, engines: list[GenerationEngine] | None = None):
        """One reply (from `engine`, by default the current version's), a group of `n` (a comparison's),
        or one reply from each of `engines` (an arena pair); a full queue is the user's clear "busy", and
        the `kind` action it refused is not counted against the actor's per-minute limit."""
        engine = engine or self.engine
        try:
            if engines:
                return submit_across(engines, messages)
            return engine.submit(messages) if n is None else engine.submit_group(messages, n)
        except EngineBusy as exc:
            self._refund(actor, kind)
            raise UserError(str(exc)) from None

    def _shown(self, request, tokens: list[int]) -> tuple[str | None, str | None]:
        """A streamed reply so far as it may be shown, as (text, flag): a character whose bytes are still
        arriving is held back (the rest is shown, so a reply that ends mid-character at every step
        still streams); (None, None) while nothing can be shown yet; (None, flag) once moderation
        stops it, before its unsafe part is shown."""
        text = _decode(request, tokens).rstrip("\ufffd")
        if not text:
            return None, None
        verdict = self.moderator.check(text[-STREAM_WINDOW:])
        return (None, f"unsafe_reply:{verdict.category}") if verdict.flagged else (text, None)

    def _final(self, request, tokens: list[int], flag: str | None) -> tuple[str, str | None]:
        """A finished reply as stored and shown: the replacement if moderation stopped it while it
        streamed or finds the whole of it unsafe."""
        if flag is None:
            text = _decode(request, tokens)
            if not self.moderator.check(text).flagged:
                return text, None
            flag = "unsafe_reply"
        return OUTPUT_REPLACEMENT, flag

    def _turn(self, conversation_id: str):
        return _ConversationTurn(self, conversation_id)

    def _generation(self, request, flag: str | None = None) -> dict:
        # a reply that moderation stopped ends there, whatever the engine made of its cancel
        return {**request.sampling.as_dict(), "finish_reason": "moderated" if flag else request.finish_reason}


class _ConversationTurn:
    """Only one reply at a time per conversation: two would both answer the same history."""

    def __init__(self, service: TutorService, conversation_id: str) -> None:
        self.service, self.conversation_id = service, conversation_id

    def __enter__(self):
        with self.service._busy_lock:
            if self.conversation_id in self.service._busy:
                raise UserError("the tutor is still answering in this conversation")
            self.service._busy.add(self.conversation_id)

    def __exit__(self, *exc):
        with self.service._busy_lock:
            self.service._busy.discard(self.conversation_id)


@contextmanager
def as_user_error(*kinds: type[Exception]):
    """Errors of these kinds, raised by the store (LookupError for an unknown id, ValueError for an
    invalid value) or the engine (PromptTooLong), become a UserError with the same message."""
    try:
        yield
    except UserError:
        raise
    except kinds as exc:
        # KeyError quotes its message; args[0] is the text itself.
        raise UserError(str(exc.args[0]) if exc.args else str(exc)) from None


# Control characters (NUL and the like) are never text a learner should see or could send back in a
# rewrite; a model that samples their tokens still writes only printable text.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _decode(request, tokens: list[int]) -> str:
    return _CONTROL.sub("", request.tokenizer.decode(tokens, skip_special_tokens=True)).strip()


def _check_id(kind: str, item_id: Any) -> str:
    if not isinstance(item_id, str) or not 0 < len(item_id) <= MAX_ID_CHARS or not item_id.isascii():
        raise UserError(f"{kind}_id must be an id string of at most {MAX_ID_CHARS} characters")
    return item_id


def _unknown(kind: str, item_id: str) -> str:
    # The same words the store uses for an id it does not hold.
    return f"no conversation with id {item_id!r}" if kind == "conversation" else f"unknown {kind} {item_id!r}"


def _show(value: Any) -> str:
    """A value quoted for an error message, cut short: never echo a whole oversized input."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _redacted(record: dict) -> dict:
    """An exported conversation with personal details replaced in every text."""
    out = {**record, "messages": [{**m, "content": redact(m["content"])} for m in record["messages"]],
           "ratings": [{**r, "reason": redact(r["reason"])} for r in record["ratings"]],
           "rewrites": [{**w, "text": redact(w["text"])} for w in record["rewrites"]]}
    return out
