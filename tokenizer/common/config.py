"""One config system: omegaconf YAML in `configs/`, overridden from the command line as `key=value`.

    load_config("ssdd.yaml", ["config=configs/fmnist.yaml", "dataset.limit=100"])

reads `configs/ssdd.yaml` (every knob with its paper default), merges the optional overlay named by
`config=`, then the `key=value` overrides. The result is in struct mode: a misspelt key is an error,
not a silently ignored setting.
"""

import os

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokenizer.common.errors import UserError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def _load_yaml(path: str):
    for candidate in (path, os.path.join(CONFIG_DIR, path)):
        if os.path.isfile(candidate):
            try:
                return OmegaConf.load(candidate)
            except Exception as e:  # yaml syntax errors arrive as several exception types
                raise UserError(f"cannot parse config {candidate}: {str(e).splitlines()[0]}") from None
    raise UserError(f"config file not found: {path} (looked in . and {CONFIG_DIR})")


def load_config(base: str, argv: list[str]):
    overrides, overlays = [], []  # config=<yaml> may repeat: overlays apply in order, then key=value overrides
    for arg in argv:
        if "=" not in arg:
            raise UserError(f"arguments are key=value overrides (e.g. dataset.im_size=256), got '{arg}'")
        if arg.startswith("config="):
            overlays.append(arg.split("=", 1)[1])
        else:
            overrides.append(arg)
    cfg = _load_yaml(base)
    OmegaConf.set_struct(cfg, True)
    try:
        for overlay in overlays:
            cfg = OmegaConf.merge(cfg, _load_yaml(overlay))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise UserError(f"bad config override: {str(e).splitlines()[0]}") from None
    return cfg
