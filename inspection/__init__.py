"""Looking inside a trained model: attention maps, per-head statistics and head ablation.

Analysis, not a task family: it reads any family through the `tasks.base.Task` interface
(its model, its data and `attention_fields`).
"""
