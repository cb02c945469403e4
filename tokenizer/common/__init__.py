"""The run machinery shared by every part of the suite (tokenizer, dit, sample, eval, app), and by nothing else:

    errors       UserError and friends, one-line messages, the CLI wrapper (`run_cli`)
    config       omegaconf YAML + `key=value` overrides
    validation   the rule table format, the rules both trainers share, sampling limits, argument checks
    devices      device choice, dtypes, available memory, timing helpers for scripts and benchmarks
    atomic       atomic files and folders
    checkpoint   safetensors weights + JSON training states, sha256-checked
    weights      one reader for foreign weight files (.safetensors, .pt/.pth/.ckpt with weights_only=True)
    runs         run folders, checkpoint names, loss logs, image grids
    training     accelerator, optimiser, per-step RNG, step plan, epoch sampler, resume and save
    ema          exponential moving average of weights
    downloads    known weight files: cache, download, or a one-line offline note

Nothing here imports a model module (tests/test_structure.py checks it).
"""
