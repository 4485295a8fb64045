"""lm-evaluation-harness on the project's own model: `harness` (the lm-eval model and task
plumbing, for any `Scorer`) and `scoring` (a `Scorer` over a single-process MoRGPTModel).

A layer of its own, below training | inference | hf | sizing and above parallel: the trainer's
in-loop evaluation and the `mor-eval` tool both use it. Importing it needs `lm-eval` (the `eval`
extra); nothing below it imports it.
"""
