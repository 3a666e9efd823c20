"""Step 1 of InstructGPT: supervised fine-tuning on demonstrations (rewrites and up-rated answers).

TRL's SFTTrainer with LoRA on prompt/completion records: the loss is on the demonstrated answer only
(`completion_only_loss`), never on the earlier model-written turns of the prompt. The adapters are
merged afterwards, so the result is a plain model that PPO starts from and uses as its reference.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

from transformers import AutoModelForCausalLM

from core.precision import serving_device, training_device


@dataclass
class SFTSettings:
    min_demonstrations: int = 8  # fewer than this: skip SFT, PPO starts from the current policy
    ranking_winners: bool = False  # also imitate the top answer of each ranking (best-of-k); on for SFT-only cycles
    epochs: int = 2
    learning_rate: float = 2e-4
    batch_size: int = 4
    max_length: int = 1024
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0
    bf16: str | bool = "auto"  # bf16 autocast: "auto" as this machine's precision plan says (core/precision.py)


def run_sft(model, tokenizer, records: list[dict], settings: SFTSettings, progress=None):
    """records: TRL conversational prompt/completion dicts. Returns (merged model, metrics)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    losses: list[float] = []

    class Report(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                if progress:
                    progress(state.global_step, state.max_steps, float(logs["loss"]))

    with tempfile.TemporaryDirectory(prefix="sft-") as out:
        config = SFTConfig(
            output_dir=out, num_train_epochs=settings.epochs, learning_rate=settings.learning_rate,
            per_device_train_batch_size=settings.batch_size, max_length=settings.max_length,
            completion_only_loss=True, packing=False, logging_steps=1, save_strategy="no", report_to=[],
            disable_tqdm=True, seed=settings.seed, **training_device(settings.bf16),
        )
        lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                             processing_class=tokenizer, peft_config=lora, callbacks=[Report()])
        trainer.train()
        merged = trainer.model.merge_and_unload()
    # A plain model built anew from the merged weights: the model the Trainer leaves behind carries
    # state of its training (hooks, checkpointing) under which PPO's adapters got no gradient.
    clean = AutoModelForCausalLM.from_config(merged.config, dtype=merged.dtype)
    clean.load_state_dict(merged.state_dict())
    clean.generation_config = merged.generation_config
    device, dtype = serving_device()  # where and how every policy of a cycle is held
    clean = clean.to(device=device, dtype=dtype)
    return clean.eval(), {"sft_examples": len(records), "sft_loss_first": losses[0] if losses else None,
                           "sft_loss_last": losses[-1] if losses else None,
                           "sft_seconds": round(time.perf_counter() - started, 1)}
