"""The main job: ``python -m megatron_vr1.demo out=<dir>`` runs Vision-R1's pipeline end to end
offline (see :mod:`.pipeline`, ``conf/demo.yaml``)."""
