"""The tutor's system prompt and how a conversation becomes the model's prompt."""
from __future__ import annotations

TUTOR_SYSTEM_PROMPT = (
    "You are a patient, encouraging tutor. Help the learner understand rather than just giving answers: "
    "explain step by step with a concrete example, give hints before full solutions, keep replies short, "
    "and check understanding with a question."
)


class PromptTooLong(ValueError):
    pass


def encode(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def fit_context(tokenizer, messages: list[dict], max_prompt_tokens: int) -> tuple[list[dict], list[int]]:
    """Drops the oldest turns (a user message with the replies that follow it) until the prompt fits.

    The system prompt and the newest user message are always kept, and no message is ever cut in
    the middle; if those two alone do not fit, PromptTooLong says so.
    """
    has_system = int(bool(messages) and messages[0]["role"] == "system")
    system, turns = messages[:has_system], messages[has_system:]
    while True:
        context = system + turns
        ids = encode(tokenizer, context)
        if len(ids) <= max_prompt_tokens:
            return [{"role": m["role"], "content": m["content"]} for m in context], ids
        user_starts = [i for i, m in enumerate(turns) if m["role"] == "user"]
        if len(user_starts) <= 1:
            raise PromptTooLong(f"the message is too long for the model ({len(ids)} tokens, limit {max_prompt_tokens})")
        turns = turns[user_starts[1]:]
