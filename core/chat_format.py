"""How a dialogue becomes the model's tokens: the one chat format of the server and of training.

Every caller that turns messages into ids goes through here, so serving, PPO's rollouts, the reward
model and the gate all see a conversation exactly the same way:
- `generation_prompt_ids`: a dialogue followed by the assistant header, ready for the model to answer;
- `scored_answer_ids`: a dialogue and a finished assistant answer, with where the answer starts (what a
  reward model reads);
- `answer_ids`: an answer's own tokens, without special tokens (what a log-probability is taken over);
- `end_of_turn_ids`: every token id that ends an answer;
- `fit_context`: the oldest whole turns dropped until a prompt fits a budget.
"""
from __future__ import annotations

from collections.abc import Sequence

Message = dict[str, str]

TUTOR_SYSTEM_PROMPT = (
    "You are a patient, encouraging tutor. Help the learner understand rather than just giving answers: "
    "explain step by step with a concrete example, give hints before full solutions, keep replies short, "
    "and check understanding with a question."
)

# One answer, wherever it is sampled: the reply a learner reads ([serve.sampling]), PPO's rollouts
# ([retrain.ppo]) and the gate's samples ([retrain.gate]) default to the same length and temperature,
# so the policy is trained and judged on the answers learners see. A settings file that changes
# [serve.sampling] changes the other two with it unless they set their own (rlhf/cli.py).
ANSWER_MAX_NEW_TOKENS = 128
ANSWER_TEMPERATURE = 0.7


class PromptTooLong(ValueError):
    pass


def _ids(encoded) -> list[int]:
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):  # some tokenizers return a BatchEncoding
        encoded = encoded["input_ids"]
    return list(encoded)


def generation_prompt_ids(tokenizer, messages: Sequence[Message]) -> list[int]:
    """The chat template of `messages` with the assistant header after them: the model answers next."""
    return _ids(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True))


def scored_answer_ids(tokenizer, prompt: Sequence[Message], answer: str, max_length: int) -> tuple[list[int], int]:
    """Chat-template tokens of prompt + the assistant's answer as one finished turn, cut from the left to
    fit (a reward is read at the end, so the end, the answer, is what must survive), and where the answer
    starts in them (after the assistant header)."""
    messages = [*prompt, {"role": "assistant", "content": answer}]
    ids = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    start = len(generation_prompt_ids(tokenizer, prompt))
    cut = max(0, len(ids) - max_length)
    return ids[cut:], max(0, start - cut)


def answer_ids(tokenizer, text: str) -> list[int]:
    """An answer's own tokens, as the model would have written them after the assistant header."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the model's generation config's (one or several) and the tokenizer's
    EOS, in that order, without repeats. A chat model's config may name its end-of-turn token where the
    tokenizer names another; an answer ends at whichever comes first."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids.append(getattr(tokenizer, "eos_token_id", None))
    return list(dict.fromkeys(i for i in ids if i is not None))


def fit_context(tokenizer, messages: list[Message], max_prompt_tokens: int) -> tuple[list[Message], list[int]]:
    """Drops the oldest turns (a user message with the replies that follow it) until the prompt fits.

    The system prompt and the newest user message are always kept, and no message is ever cut in
    the middle; if those two alone do not fit, PromptTooLong says so.

    Linear in the history: each message is tokenized once to estimate where the kept turns must
    start, and the template is then applied to a few candidate starts only (dropping a turn never
    makes a prompt longer, so the first start that fits is found by stepping from the estimate).
    """
    has_system = int(bool(messages) and messages[0]["role"] == "system")
    system, turns = messages[:has_system], messages[has_system:]
    encoded: dict[int, list[int]] = {}

    def prompt(start: int) -> list[int]:
        if start not in encoded:
            encoded[start] = generation_prompt_ids(tokenizer, system + turns[start:])
        return encoded[start]

    def fits(start: int) -> bool:
        return len(prompt(start)) <= max_prompt_tokens

    keep = 0  # index in `turns` of the oldest message kept
    if not fits(0):
        starts = [i for i, m in enumerate(turns) if m["role"] == "user"]
        if len(starts) <= 1:
            raise _too_long(len(prompt(0)), max_prompt_tokens)
        # Estimate what dropping up to each user turn saves: its messages' tokens plus the template's
        # share per message (measured on the whole prompt), then correct the guess exactly. Dropping
        # starts at the second user turn.
        sizes = [len(answer_ids(tokenizer, m["content"])) for m in turns]
        per_message = max(0.0, (len(prompt(0)) - sum(sizes)) / max(1, len(messages)))
        excess, saved, dropped, n = len(prompt(0)) - max_prompt_tokens, 0.0, 0, len(starts) - 1
        for i, start in enumerate(starts):
            saved += sum(sizes[dropped:start]) + per_message * (start - dropped)
            dropped = start
            if saved >= excess:
                n = i
                break
        n = max(1, n)
        while n < len(starts) - 1 and not fits(starts[n]):
            n += 1
        while n > 1 and fits(starts[n - 1]):
            n -= 1
        keep = starts[n]
        if not fits(keep):  # even the newest user message alone
            raise _too_long(len(prompt(keep)), max_prompt_tokens)
    return [{"role": m["role"], "content": m["content"]} for m in system + turns[keep:]], prompt(keep)


def _too_long(tokens: int, limit: int) -> PromptTooLong:
    return PromptTooLong(f"the message is too long for the model ({tokens} tokens, limit {limit})")
