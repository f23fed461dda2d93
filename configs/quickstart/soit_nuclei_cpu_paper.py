"""The CPU quick start trained as the paper trains: soit_nuclei_cpu.py without the training
options beyond the paper (the two-stage queries take content and position from the
proposals, no look-forward-twice, focal classification).

    bash scripts/quickstart.sh --config-file configs/quickstart/soit_nuclei_cpu_paper.py
"""
from .soit_nuclei_cpu import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

model.transformer.mixed_query_selection = False
model.transformer.look_forward_twice = False
model.criterion.cls_loss = "focal"
