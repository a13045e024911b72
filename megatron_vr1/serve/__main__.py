"""``python -m megatron_vr1.serve checkpoint=<dir> [port=8000]``: a Hugging Face folder or a
megatron-vr1 checkpoint behind the OpenAI chat-completions API, through a rollout engine
(config: ``conf/serve.yaml``). For the cold-start pipeline's tests and demos; on GPUs point
clients at ``vllm serve`` instead."""

from ..training import quiet  # noqa: F401  (first: before megatron-core is imported)

from pathlib import Path

from omegaconf import DictConfig

from ..entry import hydra_main
from ..training.setup import main_guard


def run(cfg: DictConfig) -> None:
    import torch
    import uvicorn

    from .. import platform
    from ..eval.runner import image_config_of, load_model_for_eval
    from .app import Server, create_app

    dtype = torch.bfloat16 if platform.has_cuda() else torch.float32
    engine, args, assets = load_model_for_eval(cfg.checkpoint, cfg.engine, dtype)
    name = cfg.model_name or Path(str(cfg.checkpoint)).resolve().name
    server = Server(engine, args, image_config_of(assets), name, max_prompt_tokens=int(cfg.max_prompt_tokens),
                    default_max_tokens=int(cfg.default_max_tokens))
    print(f"serve: {name} at http://{cfg.host}:{cfg.port}/v1 (engine {cfg.engine})", flush=True)
    uvicorn.run(create_app(server), host=str(cfg.host), port=int(cfg.port), log_level=str(cfg.log_level))


@hydra_main("serve", "serve")
def main(cfg: DictConfig) -> None:
    main_guard(run, cfg, "serve")


if __name__ == "__main__":
    main()
