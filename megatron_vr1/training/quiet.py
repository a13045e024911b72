"""Entry points import this first: it silences warnings that say nothing to a user of this
project (optional NVIDIA extras that are not needed, torch deprecations inside megatron-core,
transformers' remarks on Qwen2.5-VL's own config: its M-RoPE ``rope_scaling`` keys, and the toy
model's Qwen token ids beyond its 512-token vocabulary) and keeps megatron-core's INFO logging
(its config dumps, parameter lists) out of the console."""

import logging
import warnings

for pattern in (r".*(Transformer Engine|Apex) (and Apex are|is) not installed.*", r"full scope is deprecated.*",
                r".*is deprecated\. Please use .* instead.*", r"Please use DTensor instead.*",
                r"`load_state_dict` is deprecated.*", r"The \.grad attribute of a Tensor that is not a leaf.*"):
    warnings.filterwarnings("ignore", message=pattern)
logging.getLogger("megatron").setLevel(logging.WARNING)
for name in ("transformers.configuration_utils", "transformers.modeling_rope_utils"):
    logging.getLogger(name).setLevel(logging.ERROR)
