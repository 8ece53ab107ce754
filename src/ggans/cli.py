"""``python -m ggans``: Hydra at the edge, the plain core inside.

Bad input (config values, data files, unknown config-group choices) is one line on stderr
naming the key and what is allowed, and exit code 2.
"""

from __future__ import annotations

import difflib
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ggans.errors import GGansError

log = logging.getLogger("ggans")


def config_dir() -> Path:
    """``conf/`` of the checkout, or the copy packaged inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError("ggans: cannot find the conf/ folder")


GROUPS = ("model", "protocol", "experiment", "logger")


def _flat_keys(d: dict, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in d.items():
        keys.add(prefix + str(k))
        if isinstance(v, dict):
            keys |= _flat_keys(v, f"{prefix}{k}.")
    return keys


def known_keys(conf: Path) -> set[str]:
    """Every key an override may name: the main config's and each config group's."""
    main = OmegaConf.to_container(OmegaConf.load(conf / "config.yaml"), resolve=False)
    main.pop("defaults", None)
    main.pop("hydra", None)
    keys = _flat_keys(main) | set(GROUPS)
    for group in GROUPS:
        if group == "experiment":  # global packages: they set the keys above
            continue
        for f in (conf / group).glob("*.yaml"):
            body = OmegaConf.to_container(OmegaConf.load(f), resolve=False) or {}
            body.pop("defaults", None)
            keys |= _flat_keys(body, f"{group}.")
    return keys


def check_override_keys(argv: list[str], conf: Path) -> None:
    """Refuse ``key=value`` overrides naming no key of the config, with the nearest key, before
    Hydra does (its message is six lines and exit 1). ``+key=`` appends (checked later) and
    ``hydra.*`` is Hydra's own."""
    keys = known_keys(conf)
    for arg in argv:
        key, sep, _ = arg.partition("=")
        if not sep or arg.startswith(("+", "~", "-")) or key.startswith("hydra"):
            continue
        if key not in keys:
            near = difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}?" if near else "see python -m ggans --help"
            raise GGansError(f"{key}: unknown key; {hint}")


def check_group_choices(argv: list[str], conf: Path) -> None:
    """Refuse ``group=choice`` overrides naming no file in conf/group/, before Hydra does."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value in ("null", ""):
            continue
        allowed = sorted(p.stem for p in (conf / key).glob("*.yaml"))
        for choice in value.split(","):
            if choice not in allowed:
                raise GGansError(f"{key}={choice!r}: must be one of {', '.join(allowed)}")


def latest_unfinished(out: Path) -> Path:
    """For ``resume=true`` in a fresh timestamped folder: the newest sibling run folder with a
    checkpoint and no summary (the run to continue); ``out`` itself when there is none."""
    candidates = [
        p
        for p in out.parent.iterdir()
        if p != out and (p / "checkpoints").is_dir() and not (p / "summary.json").exists()
    ]
    if not candidates:
        return out
    found = max(candidates, key=lambda p: p.stat().st_mtime)
    log.info("resume=true: continuing %s", found)
    return found


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from ggans.config import from_dict
    from ggans.run import run
    from ggans.tracking import make_loggers

    for noisy in ("absl", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        run_cfg = from_dict(container)
        if cfg.get("distributed"):
            import jax

            jax.distributed.initialize()
        out = Path(HydraConfig.get().runtime.output_dir)
        resume = cfg.get("resume", "auto")
        if resume is True and not (out / "checkpoints").is_dir():
            out = latest_unfinished(out)
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        loggers = make_loggers(container.get("logger"), run_cfg, out, container)
        run(run_cfg, out, progress=cfg.get("progress", "auto"), loggers=loggers, resume=resume)
    except GGansError as err:
        print(f"ggans: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Entry point of ``python -m ggans`` and the ``ggans`` script."""
    conf = config_dir()
    try:
        check_override_keys(sys.argv[1:], conf)
        check_group_choices(sys.argv[1:], conf)
    except GGansError as err:
        print(f"ggans: error: {err}", file=sys.stderr)
        sys.exit(2)
    hydra.main(version_base="1.3", config_path=str(conf), config_name="config")(_task)()
