"""The Megatron-core learner: model build from an HF config, parallel state, log-probs, forward, checkpoints.

Imports megatron-core; nothing outside learner/, rollout/ and the weight gather code should import this package.
"""
