"""Attacks on unlearning: relearning (fine-tuning on forget documents) and gate evasion."""
