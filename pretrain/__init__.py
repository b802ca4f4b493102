"""Proteus distillation pretraining: `torchrun --nproc_per_node=N -m pretrain.main --help`."""
