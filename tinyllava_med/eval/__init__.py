"""Evaluation: answer generation (`generate`), LLaVA-Med's VQA metrics (`metrics`, with
`normalize`, `bleu` and `report`) and LLaVA-Med's GPT-4 judge (`judge`, `judge_protocol`).

Nothing is imported here, so scoring never loads torch; import the submodule you need.
"""
