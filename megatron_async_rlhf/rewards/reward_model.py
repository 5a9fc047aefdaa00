"""Reward-model scorers: an HF sequence classifier (one logit) scoring prompt + completion, in transformers
(:class:`RewardModelScorer`) or in a vLLM pooling engine (:class:`VLLMRewardModel`).

Both take text (``score(prompts, completions)``) or token ids (``score_ids``: e.g. a policy's prompt ids + sampled
ids). A reward model reads what it was trained on, whole:

- format: a reward model exported by ``mode=rm`` records in its config.json how its training pairs became ids (chat
  template or not, prompt template: :data:`learner.value_head.INPUT_FORMAT_KEY`); ``score`` builds the ids the same
  way (``data.preferences.pair_ids``; prompts are raw prompt strings or message lists). A classifier that records
  none reads prompt and completion in the policy's format (``data.use_chat_template``, ``data.prompt_template``,
  carried as ``reward.policy_format``), which the log states.
- length: never truncated. A sequence longer than the model's ``max_position_embeddings`` is an error; the preflight
  (``checks/model.py``) refuses a run whose ``data.max_prompt_len`` + completion budget cannot fit.

Such a model gives the same numbers in the learner, in transformers and in vLLM (tests/test_reward_model.py).
"""

from __future__ import annotations

import logging

import torch

from megatron_async_rlhf.rewards.scorer import register_reward

log = logging.getLogger("megatron_async_rlhf")

PLAIN_FORMAT = {"use_chat_template": False, "template": ""}
"""``data.preferences.pair_ids``'s defaults: the prompt's ids (BOS + text) followed by the completion's own ids."""


class RewardModelScorer:
    def __init__(self, path: str, device: str | None = None, batch_size: int = 16, dtype: str = "auto",
                 policy_format: dict | None = None):
        """``policy_format``: how the policy's prompts are formatted (``pair_ids``' keyword arguments), used when
        the model records no input format of its own; None: plain text (:data:`PLAIN_FORMAT`)."""
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
        self.batch_size, self.path = batch_size, path
        self.max_length = int(self.model.config.max_position_embeddings)  # the longest sequence it reads, whole
        self.input_format = resolve_format(path, self.model.config.to_dict(), policy_format)

    @torch.no_grad()
    def score_ids(self, seqs: list[list[int]]) -> torch.Tensor:
        """``[N]`` rewards of token-id sequences (right-padded per batch; the model reads each at its last non-pad
        token, so no sequence may end with the pad id). A sequence longer than the model's context is an error."""
        check_lengths(seqs, self.max_length, self.path)
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
        """``[N]`` scalar rewards of prompt + completion in the model's input format (``answers`` unused: a reward
        model reads prompt and completion)."""
        return self.score_ids(format_ids(self.tok, self.input_format, prompts, completions))


@register_reward("reward_model")
def _reward_model(rc) -> RewardModelScorer:
    return RewardModelScorer(rc.reward_model_path, dtype=rc.dtype, policy_format=rc.policy_format)


class VLLMRewardModel:
    """A vLLM pooling engine (``runner="pooling"``) serving an HF sequence classifier with one label; scores are the
    raw logits (``use_activation=False``; vLLM's ``classify`` would return their sigmoid), the same numbers as
    transformers. On CPU it runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) like the rollout engines, on GPU
    in vLLM's multi-process mode, whatever an engine built earlier in this process set."""

    def __init__(self, path: str, dtype: str = "float32", max_model_len: int | None = None,
                 kv_cache_gib: float = 0.25, policy_format: dict | None = None, **llm_kwargs):
        import os

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if torch.cuda.is_available() else "0"
        from transformers import AutoConfig
        from vllm import LLM, envs

        envs.disable_envs_cache()  # vLLM froze its environment when an earlier engine of this process was built

        hf_cfg = AutoConfig.from_pretrained(path)
        self.input_format = resolve_format(path, hf_cfg.to_dict(), policy_format)
        self.path, self.max_length = path, int(max_model_len or hf_cfg.max_position_embeddings)
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

        check_lengths(seqs, self.max_length, self.path)
        outs = self.llm.classify([{"prompt_token_ids": list(s)} for s in seqs], use_tqdm=False,
                                 pooling_params=PoolingParams(use_activation=False))
        return torch.tensor([o.outputs.probs[0] for o in outs], dtype=torch.float32)

    def score(self, prompts: list, completions: list[str], answers: list[str] | None = None) -> torch.Tensor:
        return self.score_ids(format_ids(self.llm.get_tokenizer(), self.input_format, prompts, completions))


def recorded_format(config: dict) -> dict | None:
    """The input format a reward model's config.json records (``mode=rm`` exports it), or None."""
    from megatron_async_rlhf.learner.value_head import INPUT_FORMAT_KEY

    return config.get(INPUT_FORMAT_KEY)


def resolve_format(path: str, config: dict, policy_format: dict | None) -> dict:
    """The format a reward model reads: its recorded one, else the policy's (stated in the log), else plain text."""
    fmt = recorded_format(config)
    if fmt is not None:
        return dict(fmt)
    fmt = dict(policy_format or PLAIN_FORMAT)
    log.info("reward model %s records no input format in its config.json; it reads prompt + completion in the "
             "policy's format: use_chat_template=%s, prompt_template=%r", path, fmt.get("use_chat_template", False),
             fmt.get("template", ""))
    return fmt


def format_ids(tok, fmt: dict, prompts: list, completions: list[str]) -> list[list[int]]:
    from megatron_async_rlhf.data.preferences import pair_ids

    return [pair_ids(tok, p, c, **fmt) for p, c in zip(prompts, completions)]


def check_lengths(seqs: list[list[int]], max_length: int, path: str) -> None:
    """A reward model reads a sequence whole or not at all: one longer than its context is an error, not a cut."""
    n = max((len(s) for s in seqs), default=0)
    if n > max_length:
        i = max(range(len(seqs)), key=lambda j: len(seqs[j]))
        raise ValueError(f"reward model {path}: sequence {i} (prompt + completion in its input format) is {n} tokens > "
                         f"its max_position_embeddings={max_length}; it is never truncated. Fix: lower "
                         "data.max_prompt_len / algorithm.max_new_tokens / eval.max_new_tokens, or a reward model "
                         "with a longer context")
