"""``python -m megatron_async_rlhf [hydra overrides]``: the main job, asynchronous RLHF (default: the tiny CPU recipe)."""

import sys

from megatron_async_rlhf.cli import main

if __name__ == "__main__":
    sys.exit(main())
