"""Evaluation: the scripts users run (`eval/<name>.py`), the libraries they share (`eval.lib`) and the stress
harnesses (`eval/stress/`: kills, memory, load). A script imports libraries only, never another script."""
