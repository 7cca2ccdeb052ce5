"""Analyses of a fitted guardrail (the gate's Neyman-Pearson behaviour, separation of statistics, plots)."""
