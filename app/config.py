"""Typed settings of the server, filled from defaults, an optional TOML/YAML file and the command line."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from app.canary import ArenaConfig
from app.engine import EngineConfig, SamplingConfig
from app.quotas import QuotaConfig
from app.service import Limits
from app.store import DEFAULT_DB
from core.active import AskingConfig
from core.moderation import ModerationConfig


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    db: Path = DEFAULT_DB
    models_dir: Path = Path("models")
    model: Path | None = None  # a local HF model directory; None = the embedded SmolLM2-135M-Instruct
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    moderation: ModerationConfig = field(default_factory=ModerationConfig)
    arena: ArenaConfig = field(default_factory=ArenaConfig)  # blind pairs of versions besides a canary's
    asking: AskingConfig = field(default_factory=AskingConfig)  # which answers a comparison shows
    # Origins besides the server's own that may call it from a browser (e.g. a school portal).
    allowed_origins: list[str] = field(default_factory=list)
