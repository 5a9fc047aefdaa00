"""Asynchronous off-policy RLHF on Megatron-core + vLLM."""
__version__ = "0.1.0"
