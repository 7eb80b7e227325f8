"""Preference training with LoRA: DPO (sigmoid, IPO, hinge), ORPO and KTO as modes of `lorakit train`.

losses.py     the losses as pure functions of per-sequence log-probs (the formula in each docstring)
objective.py  the micro-batch loss the training loop calls, the reference under disable_adapters
run.py        `lorakit train --mode dpo|orpo|kto`: data, before / after metrics, fit, records
grpo.py       GRPO's micro-batch loss: rollouts, rewards, group advantages, `grpo_loss` (TRL choices listed)
rewards.py    `--reward SPEC`: loading reward functions (built-ins exact, regex:PATTERN), checking their scores
rollout.py    rollouts sampled by `serve.Engine` from the live model and adapter (`LiveEngine`)
grpo_run.py   `lorakit train --mode grpo`: prompt rows, the rollout engine, before / after metrics, fit
"""
