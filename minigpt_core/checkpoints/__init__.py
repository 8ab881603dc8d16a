"""The checkpoints layer: a model's checkpoint directory (weights, spec, metadata, hashes) and a
run's training checkpoints (optimizer state, shards, latest/best, resolving a path to one).

May import base, spec, model and data; knows nothing of tasks, fine-tuning or training.
"""
