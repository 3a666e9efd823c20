"""Wires the store, the model registry, the generation engine and the UI into one running app.

Exposure rules: a server with no accounts serves one local user and runs only on a loopback
address; with accounts every request needs a logged-in session. Either way a request whose Origin
is another site is refused (a page elsewhere cannot drive the tutor from a learner's browser),
Gradio's share links and analytics are off, and a client sees only the messages of `gr.Error`,
never an internal exception's text.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it reads this at import
# Gradio's queue otherwise rebuilds a pandas summary of every event it has kept (up to 10,000) each time an
# event ends, for a monitoring page this app never enables: 3-10 ms of CPU taken from the engine per
# request, growing with uptime (docs/performance.md). Set before the app's queue is created.
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(2**62))

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402

from app.accounts import Accounts  # noqa: E402
from app.canary import Arena  # noqa: E402
from app.config import ServeConfig  # noqa: E402
from app.embedded import ensure_base  # noqa: E402
from app.engine import GenerationEngine  # noqa: E402
from app.quotas import Quotas  # noqa: E402
from app.service import TutorService  # noqa: E402
from app.store import Store  # noqa: E402
from app.ui import CSS, THEME, build_demo  # noqa: E402
from app.versions import ModelRegistry, PinnedSource, record_versions  # noqa: E402
from core.active import CommitteeFile  # noqa: E402
from core.chat_format import fit_context  # noqa: E402
from core.moderation import Moderator  # noqa: E402

log = logging.getLogger(__name__)


class ExposureError(ValueError):
    """The server would be reachable in a way that is not safe; the message says what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, has_accounts: bool) -> None:
    if not has_accounts and not is_loopback(host):
        raise ExposureError(f"--host {host} would serve the tutor to the network without logins; add accounts "
                            "first (python launch.py --add-user NAME --role admin) or serve on 127.0.0.1")


class OriginGuard:
    """ASGI middleware: a request that carries an Origin header must come from this server's own
    origin (or one of `allowed`). Browsers send Origin on cross-site requests, so this stops other
    pages from posting to the API with a learner's cookie; clients without a browser send none."""

    def __init__(self, app, allowed: tuple[str, ...] = ()) -> None:
        self.app, self.allowed = app, {a.rstrip("/").lower() for a in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            origin = headers.get("origin")
            if origin is not None and not self._same_site(origin, headers.get("host", "")):
                if scope["type"] == "http":
                    await PlainTextResponse("requests from other sites are refused", 403)(scope, receive, send)
                return  # a websocket is refused by not accepting it
        await self.app(scope, receive, send)

    def _same_site(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        return origin in self.allowed or urlsplit(origin).netloc == host.lower()


@dataclass
class TutorApp:
    config: ServeConfig
    store: Store
    registry: ModelRegistry
    engine: GenerationEngine
    service: TutorService
    demo: gr.Blocks
    login_required: bool

    def launch(self, block: bool = True) -> str:
        """Starts the web server; returns its URL. With block=False it runs in the background."""
        auth = self.service.accounts.verify if self.login_required else None
        _, url, _ = self.demo.launch(
            server_name=self.config.host, server_port=self.config.port, prevent_thread_lock=not block,
            theme=THEME, css=CSS, quiet=not block, share=False, show_error=False, footer_links=["api"],
            auth=auth, auth_message="Log in with the name and password your teacher gave you.",
            app_kwargs={"middleware": [Middleware(OriginGuard, allowed=tuple(self.config.allowed_origins))]})
        return url

    def close(self) -> None:
        self.demo.close()
        if self.service.arena is not None:
            self.service.arena.close()
        self.engine.close()
        self.store.close()


def create_app(config: ServeConfig, say=print, settings_file: Path | None = None) -> TutorApp:
    """Opens (and migrates) the DB, makes sure a policy is current, and starts the engine.
    `settings_file`: the file the settings came from, which a retrain started from the page reads too."""
    store = Store(config.db)
    try:
        login_required = store.has_accounts()
        check_exposure(config.host, login_required)  # before the slow model work
        registry = ModelRegistry(config.models_dir)
        base = ensure_base(registry, config.model, say=say)
        record_versions(store, registry)
        engine = GenerationEngine(registry, fit_context, config.sampling, config.engine)
    except BaseException:
        store.close()
        raise
    # A set sampling seed also fixes the order in which compared answers are shown.
    arena = Arena(store, registry, engine, config=config.arena, rng=random.Random(config.sampling.seed),
                  make_engine=lambda version: GenerationEngine(PinnedSource(registry, version), fit_context,
                                                               config.sampling, config.engine))
    service = TutorService(store, engine, config.limits, rng=random.Random(config.sampling.seed),
                           accounts=Accounts(store), quotas=Quotas(store, config.quotas),
                           moderator=Moderator(config.moderation), arena=arena, asking=config.asking,
                           committee=CommitteeFile(registry.committee_path()))
    retrain = [sys.executable, str(Path(__file__).resolve().parents[1] / "launch.py"), "--retrain",
               "--db", str(config.db), "--models-dir", str(config.models_dir),
               *(["--model", str(config.model)] if config.model else []),
               *(["--config", str(settings_file)] if settings_file else [])]
    demo = build_demo(service, login_required=login_required, registry=registry, retrain_command=retrain)
    # The engine bounds its own queue; Gradio's queue only needs to hold what the engine may accept.
    demo.queue(default_concurrency_limit=config.engine.max_batch_size + config.engine.max_queue,
               max_size=2 * (config.engine.max_batch_size + config.engine.max_queue))
    log.info("serving %s (base %s), %s", engine.version, base, "with logins" if login_required else "one local user")
    return TutorApp(config, store, registry, engine, service, demo, login_required)
