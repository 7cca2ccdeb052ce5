"""Unlearning baselines compared with DSG: static SAE clamping, RMU, GradDiff and NPO.

Fine-tuning baselines take ``(model, forget_texts, retain_texts, cfg)`` and return an
:class:`~dsg_tl.baselines.common.UnlearnResult` holding an edited deep copy of the model.
"""
