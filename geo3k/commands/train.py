"""`geo3k train`: train on preprocessed shards (the GPU stage, train/), or print its memory plan."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Optional

import typer

from geo3k.options import ConfigOpt, JsonOpt, NprocOpt, RayOpt, SetOpt, load_pipeline_config, relaunch


def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in train.output_dir.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over in a train.output_dir that holds another run, deleting its checkpoints and metrics.")
    ] = False,
    allow_schedule_change: Annotated[
        bool,
        typer.Option("--allow-schedule-change", help="With --resume: continue although train_iters, epochs, lr or another schedule setting changed."),
    ] = False,
    nproc: NprocOpt = 1,
    backend: Annotated[Optional[str], typer.Option("--backend", help="megatron (default) or fsdp.")] = None,
    ray: RayOpt = None,
    nodes: Annotated[int, typer.Option("--nodes", help="With --ray: nodes to spread over, --nproc processes (GPUs) on each.")] = 1,
    plan: Annotated[
        bool, typer.Option("--plan", help="Print the memory each GPU needs for this model and layout, and stop (no GPU needed).")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train on preprocessed shards (never re-tokenizes).

    Examples:

      geo3k train

      geo3k train -c demo_data/pipeline.yaml --set train.random_init=true --set train.global_batch_size=32

      geo3k train --nproc 8 --set train.tensor_parallel=4 --set train.sequence_parallel=true

      geo3k train --resume

      geo3k train --overwrite --set train.output_dir=runs/geo3k

      geo3k train --plan --nproc 8 --set model.name_or_path=qwen3-vl-30b-a3b --set train.expert_parallel=8

      geo3k train --ray auto --nproc 8 --nodes 2    # 16 processes on two nodes of a Ray cluster

    Several nodes: on a Ray cluster, --ray ADDRESS --nodes N; otherwise run `torchrun --nnodes N --node-rank R
    --rdzv-endpoint HOST:PORT --nproc-per-node G -m geo3k train ...` on each node.
    """
    if resume and overwrite:
        from shared.config import ConfigError

        raise ConfigError("--resume continues the run in train.output_dir, --overwrite deletes it: pass one of them")
    if nodes != 1 and not ray:
        from shared.config import ConfigError

        raise ConfigError("--nodes places processes on a Ray cluster: add --ray ADDRESS (or run torchrun on each node)")
    overrides = list(set_ or [])
    if backend:
        overrides.append(f"train.backend={backend}")
    cfg, _ = load_pipeline_config(config, overrides)
    if "RANK" not in os.environ:
        from shared.errors import UserError
        from train.models.source import resolve_source
        from train.trainer import check_layout

        # the config the model will be built from: a checkpoint's own when weights are loaded
        try:
            hf_config = resolve_source(cfg.model.name_or_path, pretrained=not cfg.train.random_init).hf_config
        except UserError as e:
            if not plan:
                raise
            # a plan needs no weights: the preset's transcription of the config will do
            hf_config = resolve_source(cfg.model.name_or_path, pretrained=False).hf_config
            print(f"note: {e}; planning with the preset's config", file=sys.stderr)
        check_layout(cfg.train, hf_config, nproc * nodes)  # before any process starts
        if plan:
            from train.memory_plan import H200_BYTES
            from train.trainer import memory_plan

            p = memory_plan(cfg, hf_config, nproc * nodes)
            if json_out:
                print(json.dumps({**p.__dict__, "total": p.total}, indent=2))
                return
            print("\n".join(p.lines(H200_BYTES)))
            if not p.fits(H200_BYTES):
                from train.memory_plan import advice

                print(f"  to fit: {advice(p, cfg.train, nproc * nodes, hf_config)}")
            return
    options = dict(resume=resume, overwrite=overwrite, allow_schedule_change=allow_schedule_change)
    if ray:
        from train.ray_launch import train_on_ray

        result = train_on_ray(ray, nproc, nodes, cfg, **options)
    else:
        relaunch(nproc)
        from train.trainer import run_training  # one loop for both backends; the Trainer picks the engine

        result = run_training(cfg, **options)
    if json_out and int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result, indent=2, default=str))

