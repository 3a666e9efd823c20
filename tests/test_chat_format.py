"""The one chat format: how serving, PPO, the reward model and the gate turn a dialogue into ids, and
which tokens end an answer."""
from __future__ import annotations

import copy

import torch

from core.causal_lm import left_pad, left_pad_to, next_position_ids, position_ids
from core.chat_format import answer_ids, end_of_turn_ids, generation_prompt_ids, scored_answer_ids
from rlhf.evaluate import generate
from rlhf.ppo import response_mask
from tiny import tiny_model, tiny_tokenizer

DIALOGUE = [{"role": "system", "content": "You are a tutor."}, {"role": "user", "content": "What is 3 + 4?"},
            {"role": "assistant", "content": "Try counting."}, {"role": "user", "content": "Seven?"}]


def test_the_generation_prompt_is_the_templates_text_tokenised_as_is():
    tokenizer = tiny_tokenizer()
    text = tokenizer.apply_chat_template(DIALOGUE, add_generation_prompt=True, tokenize=False)
    assert generation_prompt_ids(tokenizer, DIALOGUE) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(generation_prompt_ids(tokenizer, DIALOGUE)).endswith("<|im_start|>assistant\n")


def test_a_scored_answer_starts_after_the_generation_prompt_and_survives_a_cut():
    tokenizer = tiny_tokenizer()
    prompt = generation_prompt_ids(tokenizer, DIALOGUE)
    ids, start = scored_answer_ids(tokenizer, DIALOGUE, "Yes, seven.", max_length=1024)
    assert ids[:start] == prompt and start == len(prompt)
    assert ids[start:start + len(answer_ids(tokenizer, "Yes, seven."))] == answer_ids(tokenizer, "Yes, seven.")
    cut, cut_start = scored_answer_ids(tokenizer, DIALOGUE, "Yes, seven.", max_length=len(ids) - 5)
    assert cut == ids[5:] and cut_start == start - 5  # the start of the prompt goes, never the answer


def test_an_answer_ends_at_the_configs_end_of_turn_or_the_tokenizers():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    assert end_of_turn_ids(model, tokenizer) == [tokenizer.eos_token_id]
    model.generation_config.eos_token_id = [0, tokenizer.eos_token_id]
    assert end_of_turn_ids(model, tokenizer) == [0, tokenizer.eos_token_id]
    model.generation_config.eos_token_id = None
    assert end_of_turn_ids(model, tokenizer) == [tokenizer.eos_token_id]


def test_the_gate_and_ppo_stop_where_the_model_config_ends_a_turn():
    """A chat model whose generation config names an end-of-turn token other than the tokenizer's EOS:
    the gate's answers end there (they ran on to the length limit when only the tokenizer's EOS counted),
    and PPO's response mask counts either as the end."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=3, hidden=64)
    prompts = [DIALOGUE[:2], DIALOGUE]
    _, _, free = generate(model, tokenizer, prompts, max_new_tokens=6)  # greedy
    stop = free[0][0]  # the first token the model writes to the first prompt becomes its end of turn
    assert stop != tokenizer.eos_token_id and len(free[0]) == 6
    ending = copy.deepcopy(model)
    ending.generation_config.eos_token_id = stop
    _, _, ended = generate(ending, tokenizer, prompts, max_new_tokens=6)
    assert ended[0] == [stop]  # kept its closing token, as an answer that ended does

    responses = torch.tensor([[5, stop, 9], [5, tokenizer.eos_token_id, 9], [5, 6, 7]])
    mask, done = response_mask(responses, end_of_turn_ids(ending, tokenizer))
    assert done.tolist() == [True, True, False]
    assert mask.tolist() == [[True, True, False], [True, True, False], [True, True, True]]


def test_padding_and_positions_of_a_left_padded_batch():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    grown = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)  # one decoding step later
    assert next_position_ids(grown).tolist() == [[3], [1]] == position_ids(grown)[:, -1:].tolist()
    assert left_pad_to(mask, 5).tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]]
    cache = torch.ones(2, 4, 3, 8)  # (B, heads, T, head dim): a KV cache widens along T
    assert left_pad_to(cache, 5, dim=2).shape == (2, 4, 5, 8) and left_pad_to(cache, 5, dim=2)[:, :, :2].sum() == 0
