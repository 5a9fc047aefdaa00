"""Reward-model scorers: an HF sequence classifier (one logit) scoring prompt + completion, in transformers
(:class:`RewardModelScorer`) or in a vLLM pooling engine (:class:`VLLMRewardModel`).

Both take text (``score(prompts, completions)``) or token ids (``score_ids``: e.g. a policy's prompt ids + sampled
ids). A reward model exported by ``mode=rm`` records in its config.json how its training pairs became ids (chat
template or not, prompt template); ``score`` builds the ids the same way (``data.preferences.pair_ids``; prompts are
raw prompt strings or message lists), other classifiers get ``prompt + completion`` through their tokenizer. Such a
model gives the same numbers in the learner, in transformers and in vLLM (tests/test_reward_model.py).
"""

from __future__ import annotations

import torch

from megatron_async_rlhf.rewards.scorer import register_reward


class RewardModelScorer:
    def __init__(self, path: str, device: str | None = None, batch_size: int = 16, max_length: int = 1024,
                 dtype: str = "auto"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype if dtype == "auto" else getattr(torch, dtype))  # auto: the checkpoint's dtype
        self.model = self.model.to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path} has num_labels={self.model.config.num_labels}; a reward model has "
                             "one output (num_labels=1)")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length
        self.input_format = _input_format(self.model.config.to_dict())

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]]) -> torch.Tensor:
        """``[N]`` rewards of token-id sequences (right-padded per batch; the model reads each at its last non-pad
        token, so no sequence may end with the pad id)."""
        out = []
        pad = self.model.config.pad_token_id
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i:i + self.batch_size]
            ids = torch.full((len(chunk), max(len(s) for s in chunk)), pad, dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask = (torch.arange(ids.shape[1]) < torch.tensor([len(s) for s in chunk]).unsqueeze(1)).long()
            out.append(self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits[:, 0]
                       .float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def score(self, prompts: list, completions: list[str], answers: list[str] | None = None) -> torch.Tensor:
        """``[N]`` scalar rewards (``answers`` unused: a reward model reads prompt and completion)."""
        if self.input_format is not None:
            return self.score_ids(_format_ids(self.tok, self.input_format, prompts, completions))
        out = []
        texts = [p + c for p, c in zip(prompts, completions)]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=self.max_length).to(self.device)
            out.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(out)


@register_reward("reward_model")
def _reward_model(rc) -> RewardModelScorer:
    return RewardModelScorer(rc.reward_model_path, dtype=rc.dtype)


class VLLMRewardModel:
    """A vLLM pooling engine (``runner="pooling"``) serving an HF sequence classifier with one label; scores are the
    raw logits (``use_activation=False``; vLLM's ``classify`` would return their sigmoid), the same numbers as
    transformers. On CPU it runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) like the rollout engines."""

    def __init__(self, path: str, dtype: str = "float32", max_model_len: int | None = None,
                 kv_cache_gib: float = 0.25, **llm_kwargs):
        import os

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if not torch.cuda.is_available() else "1")
        from transformers import AutoConfig
        from vllm import LLM

        hf_cfg = AutoConfig.from_pretrained(path)
        self.input_format = _input_format(hf_cfg.to_dict())
        labels = hf_cfg.num_labels
        if labels != 1:
            raise ValueError(f"reward model {path} has num_labels={labels}; a reward model has one output "
                             "(num_labels=1)")
        kw = dict(model=path, runner="pooling", dtype=dtype, enforce_eager=True, **llm_kwargs)
        if max_model_len:
            kw["max_model_len"] = max_model_len
        if not torch.cuda.is_available():
            kw.setdefault("kv_cache_memory_bytes", int(kv_cache_gib * 2**30))
        self.llm = LLM(**kw)

    def score_ids(self, seqs: list[list[int]]) -> torch.Tensor:
        from vllm import PoolingParams

        outs = self.llm.classify([{"prompt_token_ids": list(s)} for s in seqs], use_tqdm=False,
                                 pooling_params=PoolingParams(use_activation=False))
        return torch.tensor([o.outputs.probs[0] for o in outs], dtype=torch.float32)

    def score(self, prompts: list, completions: list[str], answers: list[str] | None = None) -> torch.Tensor:
        tok = self.llm.get_tokenizer()
        if self.input_format is not None:
            return self.score_ids(_format_ids(tok, self.input_format, prompts, completions))
        return self.score_ids([tok(p + c)["input_ids"] for p, c in zip(prompts, completions)])


def _input_format(config: dict) -> dict | None:
    from megatron_async_rlhf.learner.value_head import INPUT_FORMAT_KEY

    return config.get(INPUT_FORMAT_KEY)


def _format_ids(tok, fmt: dict, prompts: list, completions: list[str]) -> list[list[int]]:
    from megatron_async_rlhf.data.preferences import pair_ids

    return [pair_ids(tok, p, c, **fmt) for p, c in zip(prompts, completions)]
