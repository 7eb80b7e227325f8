"""Preference training with LoRA: DPO (sigmoid, IPO, hinge), ORPO and KTO as modes of `lorakit train`.

losses.py     the losses as pure functions of per-sequence log-probs (the formula in each docstring)
objective.py  the micro-batch loss the training loop calls, the reference under disable_adapters
run.py        `lorakit train --mode dpo|orpo|kto`: data, before / after metrics, fit, records
"""
