"""``python -m megatron_async_rlhf``: the main job (see README)."""

import sys

from megatron_async_rlhf.demo import main

if __name__ == "__main__":
    sys.exit(main())
