"""Entry points, each a Hydra app over ``conf/``."""
