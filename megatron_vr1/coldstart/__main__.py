"""``python -m megatron_vr1.coldstart input=<records> out=<dir> mllm.base_url=... mllm.model=...
reasoner.base_url=... reasoner.model=...`` (config: ``conf/coldstart.yaml``)."""

from __future__ import annotations

import asyncio
import os
import sys

from omegaconf import DictConfig, OmegaConf

from ..entry import hydra_main
from ..errors import UsageError


def endpoint_settings(section: DictConfig):
    from .client import EndpointSettings

    options = OmegaConf.to_container(section, resolve=True)
    known = set(EndpointSettings.__dataclass_fields__)
    unknown = set(options) - known
    if unknown:
        raise UsageError(f"unknown endpoint option(s) {sorted(unknown)}; known: {sorted(known)}")
    return EndpointSettings(**options)


async def main_async(cfg: DictConfig) -> dict:
    from .client import Endpoint
    from .pipeline import Pipeline, load_items

    items = load_items(cfg.input, cfg.image_root)
    if cfg.limit is not None:
        items = items[:int(cfg.limit)]
    bad = [i for i in items if i.bad]
    if bad and not cfg.skip_bad_records:
        raise UsageError(f"{cfg.input}: record {bad[0].id!r} (#{bad[0].index}): {bad[0].bad}"
                         + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                         + "; fix it, or pass skip_bad_records=true to count such records as dropped (bad_record)")
    mllm = Endpoint("mllm", endpoint_settings(cfg.mllm))
    reasoner = Endpoint("reasoner", endpoint_settings(cfg.reasoner))
    try:
        pipeline = Pipeline(cfg, mllm, reasoner)
        progress = cfg.progress if cfg.progress is not None else os.isatty(2)
        return await pipeline.run(items, bool(progress))
    finally:
        await mllm.close()
        await reasoner.close()


@hydra_main("coldstart", "coldstart")
def main(cfg: DictConfig) -> None:
    from ..data.formats import RecordError

    try:
        report = asyncio.run(main_async(cfg))
    except (UsageError, RecordError, FileNotFoundError) as e:
        print(f"coldstart: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"
    print(f"coldstart: {report['input']} records: {report['kept']} kept, dropped: {dropped}"
          + (f"; {report['pending']} pending" if report["pending"] else "") + f"; {cfg.out}/sft.json", flush=True)
    if report["stopped"]:
        print("coldstart: stopped on request; run the same command again to go on", file=sys.stderr, flush=True)
        sys.exit(130)
    failed = {k: v for k, v in report["dropped"].items() if k.startswith("error:")}
    if not report["kept"] and failed and sum(failed.values()) == report["input"] - report["pending"]:
        reasons = ", ".join(f"{k[len('error:'):]} {v}" for k, v in failed.items())
        print(f"coldstart: error: every request failed ({reasons}): check mllm.base_url, reasoner.base_url and "
              f"their model names, then run again with retry_failed=true", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
