"""Scoring pretrained encoders: frozen features (features), classifiers on them (probes: linear
probe and weighted kNN), and end-to-end fine-tuning (finetuning)."""
