"""Scoring pretrained encoders: frozen features (features), classifiers on them (probes: linear
probe and weighted kNN), the model pieces of end-to-end fine-tuning (finetuning; the job is
energyvit.finetune), and a classifier's top-1/top-5 streamed over a split (streaming)."""
