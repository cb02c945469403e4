"""Evaluation tools: reconstruction-quality scripts and the bundled Fashion-MNIST classifier
(`eval.fmnist_classifier`), which gives offline Fréchet distances and class accuracy without downloads."""
