"""The rollout pool: vLLM engines that sample with the learner's weights, synced in every step."""
