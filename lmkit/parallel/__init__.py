"""Sharded and tensor-parallel training: FSDP2 and tensor parallel through Lightning's ModelParallelStrategy.

- `strategy.ShardedStrategy`: what `trainer=fsdp` builds (mesh sizes, threads, bf16 policy, checkpoints);
- `parallelize.parallelize`: one function per backbone that applies TP, then activation checkpointing, then compile,
  then FSDP2 to a plain model;
- `clip.clip_grad_norm`: gradient clipping with the global norm over shards and meshes;
- `checkpoint`: sharded checkpoint folders, read without the training processes (and without unpickling code).
"""
