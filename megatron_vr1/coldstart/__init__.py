"""Cold-start data by modality bridging (Vision-R1): ``python -m megatron_vr1.coldstart``.

A multimodal model writes a Pseudo-CoT from the image, question and answer, then a detailed
description of the image; a text reasoner answers from the description alone; right answers
that pass the rule-based filters become ShareGPT samples for the cold-start SFT.
"""
