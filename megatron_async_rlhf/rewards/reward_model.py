"""Reward-model scorer: an HF sequence classifier (one logit) scoring prompt + completion text.

Loaded with ``from_pretrained`` from a local directory, on the device of the pool it is placed on
(``rewards.reward_model_pool``: the learner pool's controller by default).
"""

from __future__ import annotations

import torch


class RewardModelScorer:
    def __init__(self, path: str, device: str | None = None, batch_size: int = 16, max_length: int = 1024):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path} has num_labels={self.model.config.num_labels}; a reward model has "
                             "one output (num_labels=1)")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """``[N]`` scalar rewards."""
        out = []
        texts = [p + c for p, c in zip(prompts, completions)]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=self.max_length).to(self.device)
            out.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(out)
