"""Wires the store, the model registry, the generation engine and the UI into one running app."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import gradio as gr

from app.config import ServeConfig
from app.embedded import ensure_base
from app.engine import GenerationEngine
from core.chat_format import fit_context
from app.service import TutorService
from app.store import Store
from app.ui import THEME, CSS, build_demo
from app.versions import ModelRegistry, record_versions

log = logging.getLogger(__name__)


@dataclass
class TutorApp:
    config: ServeConfig
    store: Store
    registry: ModelRegistry
    engine: GenerationEngine
    service: TutorService
    demo: gr.Blocks

    def launch(self, block: bool = True) -> str:
        """Starts the web server; returns its URL. With block=False it runs in the background."""
        _, url, _ = self.demo.launch(server_name=self.config.host, server_port=self.config.port,
                                     prevent_thread_lock=not block, theme=THEME, css=CSS, quiet=not block,
                                     show_error=True, footer_links=["api"])
        return url

    def close(self) -> None:
        self.demo.close()
        self.engine.close()
        self.store.close()


def create_app(config: ServeConfig, say=print) -> TutorApp:
    """Opens (and migrates) the DB, makes sure a policy is current, and starts the engine."""
    registry = ModelRegistry(config.models_dir)
    base = ensure_base(registry, config.model, say=say)
    store = Store(config.db)
    record_versions(store, registry)
    engine = GenerationEngine(registry, fit_context, config.sampling, config.engine)
    # A set sampling seed also fixes the order in which compared answers are shown.
    service = TutorService(store, engine, config.limits, rng=random.Random(config.sampling.seed))
    demo = build_demo(service)
    # The engine bounds its own queue; Gradio's queue only needs to hold what the engine may accept.
    demo.queue(default_concurrency_limit=config.engine.max_batch_size + config.engine.max_queue,
               max_size=2 * (config.engine.max_batch_size + config.engine.max_queue))
    log.info("serving %s (base %s)", engine.version, base)
    return TutorApp(config, store, registry, engine, service, demo)
