"""``python -m megatron_vr1.serve``: a checkpoint behind the OpenAI chat-completions API (see
:mod:`.app`)."""
