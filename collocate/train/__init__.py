"""Self-distillation training of MTP heads, CLP and the gate baseline: one command, resumable.

    collocate train --model smollm2-135m --k 4 --samples 2000 --out runs/smollm2-k4
    accelerate launch --multi_gpu --num_processes 2 -m collocate.cli train ...   # data-parallel, same bundle
    (on CPUs: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...)

Stages, one module each, each resumable after a kill:
  1. answers.py   data: the backbone's own greedy answers to real prompts, in atomic shards + a manifest;
  2. features.py  its last hidden states over those sequences (cached on disk unless --no-cache-hidden);
  3. heads.py     head j at position t learns token t+j (CE, optionally + KL to the backbone), AdamW,
                  warm-up then cosine; per-offset top-1/top-5 on held-out shards;
  4. policies.py  CLP (labels = how many leading heads agree with the backbone) and the gates (BCE).
config.py holds every setting once (the CLI options are derived from it); pipeline.py runs the stages.
"""
from .config import TrainConfig
from .pipeline import run_training

__all__ = ["TrainConfig", "run_training"]
