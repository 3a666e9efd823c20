"""The reward model step of the InstructGPT recipe (Ouyang et al. 2022, section 3.5).

A scalar reward model is the current policy's backbone with a one-output score head
(`AutoModelForSequenceClassification`, num_labels=1), trained with LoRA adapters on
PreferenceGroups with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).

A second form (`RewardConfig.form = "implicit"`) reads the reward through the language-model head
instead: DPO's implicit reward (Rafailov et al. 2023), r = beta * sum over the answer's tokens of
log pi(y_t) / pi_ref(y_t), with pi the LoRA-adapted policy and pi_ref the same policy with its
adapters off. The same Bradley-Terry loss on it is the DPO loss. A preference that sits in a few
words ("for example", a number) moves the logits of those words directly, where a score head has
to find it among the states of a whole answer (docs/learning.md, "Run 9's comparisons relabelled").
A third (`form = "bag_of_tokens"`, rlhf/bag_of_tokens.py) drops the backbone: one weight per token.

A K-way ranking gives C(K, 2) pairs, and CONTRACT.md asks for them the InstructGPT way: all pairs
of one ranking in the same batch, each completion encoded once, each ranking weighted as one
example. So a batch here is a handful of whole groups: every distinct completion of every group
is one row of the forward pass, the pairs are indices into those rows, a group's loss is the mean
over its pairs and the batch loss is the (group-weight) mean over groups.

Why not TRL's RewardTrainer: it takes flat chosen/rejected pair records, so a K=4 ranking becomes
6 rows shuffled across batches, each completion is encoded K-1 times, and a ranking counts as
C(K, 2) examples. InstructGPT found exactly that over-fits (the pairs of one ranking are highly
correlated). The loop below is short enough to read in one go.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from core.causal_lm import answer_logprob, answer_mask, right_pad
from core.chat_format import scored_answer_ids
from core.precision import serving_device, wants_bf16
from core.stats import pearson, wilson
from rlhf.bag_of_tokens import BagOfTokens
from rlhf.data import Message, PreferenceGroup

Progress = Callable[[int, int, float], None]  # (step, total steps, loss)


@dataclass
class RewardConfig:
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # None: the form's own (lr()): LoRA adapters and a bag of token weights want very different steps;
    # full fine-tuning (use_lora = false) wants ~1e-5
    learning_rate: float | None = None
    epochs: int = 3
    groups_per_batch: int = 4  # whole rankings per optimiser step, not pairs
    max_length: int = 1024  # tokens of prompt + completion; longer ones lose their start
    seed: int = 0
    min_heldout_accuracy: float = 0.6  # pairwise, held-out: the gate to go on to PPO
    use_lora: bool = True
    # bf16 autocast in training (the loss, the optimiser and the scores stay fp32). "auto": as this
    # machine's precision plan says (core/precision.py): on a GPU and on a CPU with AVX512-BF16 or AMX,
    # where an epoch runs 1.97x faster than in fp32 (bench/bench_precision.py).
    bf16: str | bool = "auto"
    # "auto": the cycle trains the candidate forms and keeps what ranks a validation part of the training
    # feedback best, one form or their ensemble (rlhf/ensemble.py); "ensemble": always the ensemble; or
    # one form: "score_head", "implicit", "bag_of_tokens" (module docstring).
    form: str = "auto"
    beta: float = 0.1  # implicit form: the DPO temperature of the log-ratio
    l2: float = 0.01  # bag_of_tokens: L2 penalty on the token weights
    length_apart: bool = True  # bag_of_tokens: learn length in a term of its own, left out of the reward
    binary: bool = True  # bag_of_tokens: a token counts once per answer, however often it is repeated

    def __post_init__(self) -> None:
        if self.form not in REWARD_FORMS + REWARD_CHOICES:
            raise ValueError(f"reward form {self.form!r} is not one of {', '.join(REWARD_FORMS + REWARD_CHOICES)}")
        if self.form == "implicit" and not self.use_lora:
            raise ValueError("the implicit reward needs use_lora = true: its reference is the policy with the adapters off")

    def use_bf16(self) -> bool:
        return wants_bf16(self.bf16)

    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 0.05 if self.form == "bag_of_tokens" else 5e-4


REWARD_FORMS = ("score_head", "implicit", "bag_of_tokens")
REWARD_CHOICES = ("auto", "ensemble")  # chosen per cycle by rlhf/ensemble.py choose_reward


@dataclass
class RewardResult:
    # score_head: a plain sequence-classification model (LoRA merged); implicit: the causal LM with its
    # LoRA adapters kept apart (the reference is the same model with them off); bag_of_tokens: a
    # BagOfTokens. Eval mode.
    model: PreTrainedModel
    tokenizer: Any
    metrics: dict[str, Any]
    config: RewardConfig = field(default_factory=RewardConfig)

    def score(self, prompts: Sequence[list[Message]], completions: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        return score(self.model, self.tokenizer, prompts, completions, batch_size, self.config)

    def token_rewards(self) -> Callable[[list[list[int]]], list[torch.Tensor]] | None:
        """How the score splits over the answer's tokens, where it is such a sum (the bag of tokens: each
        token's weight), for PPO's per-token rewards; None for the forms that read the whole answer."""
        return self.model.token_rewards if self.config.form == "bag_of_tokens" else None


class RewardTooWeak(RuntimeError):
    """The reward model does not rank held-out pairs clearly better than chance."""


# -- encoding ----------------------------------------------------------------------------------


@dataclass
class GroupBatch:
    """Whole groups as one forward pass: one row per distinct completion, pairs as row indices."""
    input_ids: torch.Tensor  # (R, T) right padded
    attention_mask: torch.Tensor  # (R, T)
    chosen: torch.Tensor  # (P,) row of the preferred completion of each pair
    rejected: torch.Tensor  # (P,) row of the other one
    pair_group: torch.Tensor  # (P,) which group of the batch each pair belongs to
    group_weight: torch.Tensor  # (G,)
    answer_start: torch.Tensor  # (R,) position of each row's first answer token


def encode_rows(tokenizer, prompts: Sequence[list[Message]], completions: Sequence[str],
                max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, answer_start) of prompt + completion rows, right padded so a score
    head reads each row's last real token."""
    rows, starts = zip(*(scored_answer_ids(tokenizer, p, c, max_length) for p, c in zip(prompts, completions)))
    input_ids, attention_mask = right_pad(rows, tokenizer.pad_token_id)
    return input_ids, attention_mask, torch.tensor(starts)


def collate_groups(tokenizer, groups: Sequence[PreferenceGroup], max_length: int) -> GroupBatch:
    prompts: list[list[Message]] = []
    completions: list[str] = []
    chosen, rejected, pair_group = [], [], []
    for g_index, group in enumerate(groups):
        offset = len(completions)
        prompts.extend([group.prompt] * len(group.completions))
        completions.extend(group.completions)
        for c, r in group.pairs:
            chosen.append(offset + c)
            rejected.append(offset + r)
            pair_group.append(g_index)
    input_ids, attention_mask, answer_start = encode_rows(tokenizer, prompts, completions, max_length)
    return GroupBatch(input_ids, attention_mask, torch.tensor(chosen), torch.tensor(rejected),
                      torch.tensor(pair_group),
                      torch.tensor([g.weight for g in groups], dtype=torch.float32), answer_start)


# -- model and loss ----------------------------------------------------------------------------


def rewards_of(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per row, read at the row's last non-pad token (the model does this from
    config.pad_token_id), on the model's device. (R, T) -> (R,)"""
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.squeeze(-1).float()


def implicit_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_start: torch.Tensor,
                     beta: float) -> torch.Tensor:
    """DPO's implicit reward beta * log pi(y|x) / pi_ref(y|x), the reference being `model` (a PeftModel)
    with its adapters off. (R, T) -> (R,) fp32"""
    with torch.no_grad(), model.disable_adapter():
        reference = answer_logprob(model, input_ids, attention_mask, answer_start)
    return beta * (answer_logprob(model, input_ids, attention_mask, answer_start) - reference)


def row_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_start: torch.Tensor,
                config: RewardConfig) -> torch.Tensor:
    """The reward of each row in the form the config names. (R, T) -> (R,) fp32"""
    if config.form == "implicit":
        return implicit_rewards(model, input_ids, attention_mask, answer_start, config.beta)
    if config.form == "bag_of_tokens":
        return model(input_ids, answer_mask(attention_mask, answer_start))
    return rewards_of(model, input_ids, attention_mask)


def grouped_bt_loss(rewards: torch.Tensor, batch: GroupBatch) -> torch.Tensor:
    """Bradley-Terry loss with each group as one example: mean over a group's pairs, then the
    group-weighted mean over groups (a plain mean when every weight is 1)."""
    pair_loss = -F.logsigmoid(rewards[batch.chosen] - rewards[batch.rejected])  # (P,)
    n_groups = batch.group_weight.shape[0]
    pair_group = batch.pair_group.to(pair_loss.device)
    total = torch.zeros(n_groups, dtype=pair_loss.dtype, device=pair_loss.device).index_add(0, pair_group, pair_loss)
    count = torch.zeros(n_groups, dtype=pair_loss.dtype, device=pair_loss.device).index_add(
        0, pair_group, torch.ones_like(pair_loss))
    group_loss = total / count.clamp_min(1)  # (G,)
    w = batch.group_weight.to(group_loss.device, group_loss.dtype)
    return (w * group_loss).sum() / w.sum()


def build_reward_model(policy_dir: str | Path, config: RewardConfig):
    """(model, tokenizer): the policy's backbone with a fresh score head, LoRA-wrapped when
    config.use_lora (only adapters and the score head train). The seed fixes the head's init."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    torch.manual_seed(config.seed)
    if config.form == "bag_of_tokens":  # no backbone: only the vocabulary is needed
        return BagOfTokens(len(tokenizer), binary=config.binary), tokenizer
    # On the policy's device (the GPU when there is one), but in fp32 there too.
    if config.form == "implicit":
        model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
    model = model.to(serving_device()[0])
    model.config.pad_token_id = tokenizer.pad_token_id
    if config.use_lora:
        from peft import LoraConfig, TaskType, get_peft_model

        # SEQ_CLS puts the score head in modules_to_save, so it trains in full next to the adapters.
        task = TaskType.CAUSAL_LM if config.form == "implicit" else TaskType.SEQ_CLS
        lora = LoraConfig(task_type=task, r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout)
        model = get_peft_model(model, lora)
    return model, tokenizer


def _batches(groups: Sequence[PreferenceGroup], size: int) -> list[list[PreferenceGroup]]:
    return [list(groups[i:i + size]) for i in range(0, len(groups), size)]


def fit(model, tokenizer, train_groups: Sequence[PreferenceGroup], config: RewardConfig,
        progress: Progress | None = None) -> list[float]:
    """Trains in place with AdamW over whole groups; returns the mean loss of each epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr())
    rng = random.Random(config.seed)
    steps_per_epoch = math.ceil(len(train_groups) / config.groups_per_batch)
    total, step = config.epochs * steps_per_epoch, 0
    epoch_losses = []
    device_type = next(model.parameters()).device.type
    model.train()
    for _ in range(config.epochs):
        order = list(train_groups)
        rng.shuffle(order)  # groups move, their pairs stay together
        losses = []
        for mb_groups in _batches(order, config.groups_per_batch):
            mb = collate_groups(tokenizer, mb_groups, config.max_length)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=config.use_bf16()):
                rewards = row_rewards(model, mb.input_ids, mb.attention_mask, mb.answer_start, config)  # read out in fp32
            if config.form == "bag_of_tokens" and config.length_apart:
                rewards = rewards + model.length_term(mb.input_ids, answer_mask(mb.attention_mask, mb.answer_start))
            loss = grouped_bt_loss(rewards, mb)
            if config.form == "bag_of_tokens":
                loss = loss + config.l2 * model.penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if progress is not None:
                progress(step, total, losses[-1])
        epoch_losses.append(sum(losses) / max(len(losses), 1))
    model.eval()
    return epoch_losses


@torch.no_grad()
def heldout_metrics(model, tokenizer, groups: Sequence[PreferenceGroup], config: RewardConfig) -> dict:
    """Held-out pairwise accuracy (over pairs; a tie counts as wrong), the grouped loss, and
    the Pearson correlation of reward with completion length in tokens: a reward model that
    mostly counts tokens would push PPO towards longer, not better, answers."""
    model.eval()
    correct, n_pairs, losses, weights = 0, 0, 0.0, 0.0
    rewards: list[float] = []
    lengths: list[float] = []
    for mb_groups in _batches(groups, config.groups_per_batch):
        mb = collate_groups(tokenizer, mb_groups, config.max_length)
        r = row_rewards(model, mb.input_ids, mb.attention_mask, mb.answer_start, config)  # (R,)
        correct += int((r[mb.chosen] > r[mb.rejected]).sum())
        n_pairs += mb.chosen.numel()
        losses += grouped_bt_loss(r, mb).item() * mb.group_weight.sum().item()
        weights += mb.group_weight.sum().item()
        rewards.extend(r.tolist())
        lengths.extend(len(tokenizer(text, add_special_tokens=False).input_ids)
                       for g in mb_groups for text in g.completions)
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    return {"heldout_accuracy": correct / n_pairs if n_pairs else None,
            "heldout_reward_std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)) if rewards else None,
            "heldout_pairs": n_pairs, "heldout_groups": len(groups),
            "heldout_loss": losses / weights if weights else None,
            "length_correlation": pearson(rewards, lengths)}


def train_reward_model(policy_dir: str | Path, train_groups: Sequence[PreferenceGroup],
                       heldout_groups: Sequence[PreferenceGroup], config: RewardConfig | None = None,
                       progress: Progress | None = None) -> RewardResult:
    """Builds, trains and measures a reward model on the policy in `policy_dir`."""
    config = config or RewardConfig(form="score_head")
    if config.form not in REWARD_FORMS:
        raise ValueError(f"train_reward_model trains one form, not {config.form!r} (rlhf/ensemble.py chooses)")
    if not train_groups:
        raise ValueError("no preference groups to train the reward model on")
    start = time.monotonic()
    model, tokenizer = build_reward_model(policy_dir, config)
    epoch_losses = fit(model, tokenizer, train_groups, config, progress)
    if config.form == "bag_of_tokens" and config.length_apart:
        answers = [scored_answer_ids(tokenizer, g.prompt, text, config.max_length)
                   for g in train_groups for text in g.completions]
        model.center([ids[start:] for ids, start in answers])
    if config.use_lora and config.form == "score_head":
        model = model.merge_and_unload()  # a plain model: PPO and serving need no peft
    model.eval()
    with scoring_autocast(config):
        held_out = heldout_metrics(model, tokenizer, heldout_groups, config)
    metrics = {"train_loss": epoch_losses,
               "train_groups": len(train_groups),
               "train_pairs": sum(len(g.pairs) for g in train_groups),
               **held_out,
               "config": asdict(config)}
    if config.form == "implicit":
        metrics["reference"] = str(policy_dir)  # the saved adapters need it back to give a reward
    if config.form == "bag_of_tokens":
        metrics["heaviest_tokens"] = model.heaviest(tokenizer)
        metrics["length_weight"] = model.length_weight.item()  # per answer token, left out of the reward
    metrics["seconds"] = round(time.monotonic() - start, 3)
    return RewardResult(model=model, tokenizer=tokenizer, metrics=metrics, config=config)


# PPO optimises the reward model and the gate judges every candidate by it, with PPO on or off.
STOP = "the cycle stops before PPO and the gate"


def check_reward_model(metrics: dict[str, Any], config: RewardConfig | None = None) -> None:
    """Raises RewardTooWeak (one line, with the numbers) unless held-out accuracy clears the gate."""
    config = config or RewardConfig()
    accuracy, pairs = metrics.get("heldout_accuracy"), metrics.get("heldout_pairs", 0)
    if accuracy is None or not pairs:
        raise RewardTooWeak("reward model has no held-out pairs to measure its accuracy on; " + STOP)
    if not accuracy > config.min_heldout_accuracy:
        raise RewardTooWeak(f"reward model held-out accuracy {accuracy:.2f} on {pairs} pairs is "
                            f"not above {config.min_heldout_accuracy:.2f}; " + STOP)
    # Few held-out pairs make a chance-level model look good: random feedback can clear the accuracy
    # alone (docs/learning.md, run 2).
    _, low, _ = wilson(round(accuracy * pairs), pairs)
    if low <= 0.5:
        raise RewardTooWeak(f"reward model held-out accuracy {accuracy:.2f} on {pairs} pairs is not clearly "
                            f"above chance (95% interval from {low:.2f}); more feedback is needed; " + STOP)


# -- scoring and storage -----------------------------------------------------------------------


def scoring_autocast(config: RewardConfig) -> torch.autocast:
    """The reward stage reads its models' scores (held-out accuracy, the ensemble's scales, the choice of a
    form) in the precision it trained them in, which is also the precision PPO scores its rollouts in: bf16
    autocast where `config.bf16` says so, about 2.5x faster than fp32 on a CPU with AMX
    (docs/performance.md). Elsewhere a caller's own autocast (PPO's, the gate's) decides."""
    return torch.autocast(serving_device()[0], dtype=torch.bfloat16, enabled=config.use_bf16())


@torch.no_grad()
def score(model, tokenizer, prompts: Sequence[list[Message]], completions: Sequence[str],
          batch_size: int = 8, config: RewardConfig | None = None) -> torch.Tensor:
    """Reward of each (prompt, completion), encoded and read as in training (config.form). -> (N,) float32"""
    config = config or RewardConfig(form="score_head")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = encode_rows(tokenizer, prompts[i:i + batch_size], completions[i:i + batch_size], config.max_length)
        out.append(row_rewards(model, *rows, config))
    model.train(was_training)
    return torch.cat(out).cpu() if out else torch.zeros(0)


def save_reward_model(result: RewardResult, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(out)
    result.tokenizer.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n", encoding="utf-8")
    return out


def load_reward_model(model_dir: str | Path) -> RewardResult:
    """A saved reward model. The implicit form is saved as LoRA adapters, which are loaded onto their
    reference policy (metrics.json names it): both must still be there."""
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    metrics_path = model_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}
    config = RewardConfig(**{"form": "score_head", **metrics.get("config", {})})  # saved before forms were named
    if config.form == "bag_of_tokens":
        model = BagOfTokens.from_pretrained(model_dir)
        return RewardResult(model=model, tokenizer=tokenizer, metrics=metrics, config=config)
    if config.form == "implicit":
        from peft import PeftModel

        reference = Path(metrics.get("reference", ""))
        if not (reference / "config.json").exists():
            raise FileNotFoundError(f"the implicit reward model in {model_dir} needs its reference policy "
                                    f"{str(reference) or '(not recorded)'}, which is not there")
        base = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, model_dir).eval()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return RewardResult(model=model, tokenizer=tokenizer, metrics=metrics, config=config)
