"""Training dgopt's models: the recipe table (recipes), the one training loop and the cache of built models
(trainer), distillation data (distill), token data (data), recipe builds (build), ``dgopt models`` and ``dgopt train``
(cli), ``dgopt train lm`` (finetune)."""
