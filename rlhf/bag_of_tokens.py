"""A linear reward over the answer's tokens: r(x, y) = sum over the distinct tokens v of the answer of w[v].

The third reward form (`RewardConfig.form = "bag_of_tokens"`), trained by rlhf/reward.py's grouped
Bradley-Terry loss plus an L2 penalty on w. It has one weight per vocabulary entry and no backbone, so
it cannot see the prompt or word order, trains in seconds, and says plainly what it learned (the
heaviest tokens). It is here for preferences that sit in a few words: on `uses_example` feedback the
backbone's reward models (score head, DPO's implicit reward) memorised their 300 items and stayed near
chance on held-out pairs, where a linear model over words or tokens generalised (docs/learning.md).

Binary features by default (a token counts once however often it is said, as in binarised bag-of-words
classifiers, Wang & Manning 2012): with counts, a token that merely co-occurs with the taste is worth
more each time it is repeated, and PPO learns to say it over and over ("uuuuuuuuuuuu" for a taste for the
letter "a", docs/learning.md "The short learning run of the tests"). `binary = False` keeps counts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "token_weights.safetensors"


class BagOfTokens(nn.Module):
    def __init__(self, vocab_size: int, binary: bool = True) -> None:
        super().__init__()
        self.binary = binary
        self.weight = nn.Parameter(torch.zeros(vocab_size))  # 0: every answer starts equal
        # Length apart: a weight per answer token, trained beside the token weights without a penalty and
        # left out of the reward (as ODIN, Chen et al. 2024, keeps length in a head of its own). Without
        # it, whatever the token weights share is a price per token, and PPO paid per token learns to
        # cut answers short (docs/learning.md, runs 15 and 16). The L2 penalty moves most of that shared
        # part here; center() moves the rest.
        self.length_weight = nn.Parameter(torch.zeros(()))

    def features(self, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        """(R, T) -> (R, V): how often each vocabulary entry is in the answer, or whether it is (binary)."""
        counts = torch.zeros(input_ids.shape[0], self.weight.numel(), device=input_ids.device,
                             dtype=self.weight.dtype).scatter_add_(1, input_ids, answer_mask.to(self.weight.dtype))
        return (counts > 0).to(counts.dtype) if self.binary else counts

    def forward(self, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        """(R, T) token ids and a mask of the answer's positions -> (R,) rewards."""
        # A product and a sum, not a matmul: bf16 autocast leaves them in fp32, as the scores should be.
        return (self.features(input_ids, answer_mask) * self.weight).sum(-1)

    @torch.no_grad()
    def token_rewards(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Each answer's reward split over its tokens (fp32, CPU): a token's weight where it first appears,
        and, binary, 0 where it is repeated. Ids past the tokenizer's (an embedding padded wider than the
        vocabulary) weigh 0."""
        n = self.weight.numel()
        weight = torch.cat([self.weight.detach().float().cpu(), torch.zeros(1)])
        parts = []
        for ids in token_ids:
            ids = torch.as_tensor(ids, dtype=torch.long).clamp(max=n)
            part = weight[ids]
            if self.binary and len(ids):
                first = torch.ones(len(ids), dtype=torch.bool)
                seen: set[int] = set()
                for t, i in enumerate(ids.tolist()):
                    first[t] = i not in seen
                    seen.add(i)
                part = part * first
            parts.append(part)
        return parts

    def size(self, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        """(R,): the answers' length as the reward counts it: tokens, or distinct tokens (binary)."""
        return self.features(input_ids, answer_mask).sum(-1)

    def length_term(self, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        """(R,): what the answers' length alone adds in training; not part of the reward."""
        return self.length_weight * self.size(input_ids, answer_mask)

    @torch.no_grad()
    def center(self, answer_token_ids: list[list[int]]) -> float:
        """Moves the mean token weight over these answers' tokens (distinct tokens, binary) into the length
        term: the trained model ranks every pair as before, and an average token of these answers is now
        worth 0 in the reward. Returns the shift."""
        counted = (dict.fromkeys(answer) if self.binary else answer for answer in answer_token_ids)
        ids = torch.tensor([i for answer in counted for i in answer], dtype=torch.long)
        shift = self.weight[ids].mean() if len(ids) else torch.zeros(())
        self.weight -= shift
        self.length_weight += shift
        return shift.item()

    def penalty(self) -> torch.Tensor:
        return (self.weight ** 2).sum()

    def heaviest(self, tokenizer, n: int = 12) -> dict[str, list[str]]:
        """The tokens that raise and lower the reward most: what the model learned, in words."""
        order = self.weight.detach().argsort()
        return {"up": [tokenizer.decode([i]) for i in order.flip(0)[:n].tolist()],
                "down": [tokenizer.decode([i]) for i in order[:n].tolist()]}

    def save_pretrained(self, out_dir: str | Path) -> None:
        save_file({"weight": self.weight.detach().cpu().contiguous(),
                   "length_weight": self.length_weight.detach().cpu().contiguous()}, str(Path(out_dir) / WEIGHTS),
                  metadata={"binary": str(self.binary).lower()})

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "BagOfTokens":
        path = str(Path(model_dir) / WEIGHTS)
        saved = load_file(path)
        with safe_open(path, "pt") as f:  # saved before binary features existed: counts
            binary = (f.metadata() or {}).get("binary", "false") == "true"
        model = cls(saved["weight"].numel(), binary=binary)
        with torch.no_grad():
            model.weight.copy_(saved["weight"])
            model.length_weight.copy_(saved.get("length_weight", torch.zeros(())))
        return model.eval()
