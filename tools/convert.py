#!/usr/bin/env python3
"""Convert Qwen2.5-VL checkpoints between Hugging Face and Megatron-Core, and check the result.

The same as ``python -m megatron_vr1.cli.convert`` (run ``--help`` for the commands):

  python tools/convert.py hf-to-mcore --hf Qwen2.5-VL-7B-Instruct --out ckpt/7b --tp 2
  python tools/convert.py mcore-to-hf --mcore ckpt/7b-sft --out export/7b-sft
  python tools/convert.py verify --hf export/7b-sft --mcore ckpt/7b-sft
"""

import sys

from megatron_vr1.cli.convert import main, run  # noqa: F401  (run: for callers that import this file)

if __name__ == "__main__":
    sys.exit(main())
