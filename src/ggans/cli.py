"""``python -m ggans``: Hydra at the edge, the plain core inside.

Bad input (config values, data files, unknown config-group choices) is one line on stderr
naming the key and what is allowed, and exit code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import shutil
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ggans import plugins
from ggans.config import RunConfig
from ggans.errors import GGansError

log = logging.getLogger("ggans")


def config_dir() -> Path:
    """``conf/`` of the checkout, or the copy packaged inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError("ggans: cannot find the conf/ folder")


GROUPS = ("model", "protocol", "topology", "compression", "scale", "experiment", "logger")


@dataclass(frozen=True)
class CliConfig(RunConfig):
    """The schema of ``python -m ggans``: a RunConfig and the command line's own settings."""

    name: str = "${protocol.name}-N${nodes}-${data.split}-s${seed}"
    logger: Any = None  # the logger group: none | wandb
    resume: Any = "auto"  # auto: continue when the run folder holds a checkpoint | true | false
    progress: Any = "auto"  # auto (a bar on a terminal) | true | false
    distributed: bool = False  # multi-host: call jax.distributed.initialize() first
    seeds: int = 1  # S runs, seeds seed .. seed + S - 1, in one program, one folder each


EDGE_KEYS = tuple(
    f.name
    for f in dataclasses.fields(CliConfig)
    if f.name not in {g.name for g in dataclasses.fields(RunConfig)}
)


def run_config(container: dict[str, Any]) -> RunConfig:
    """The validated RunConfig of a composed command-line config (a plain container)."""
    from ggans.config import from_dict

    return from_dict({k: v for k, v in container.items() if k not in (*EDGE_KEYS, "hydra")})


def mutable(cls: type) -> type:
    """An unfrozen twin of a frozen dataclass, nested ones included, with the same defaults:
    Hydra sets a schema's values in place, which OmegaConf refuses on a frozen dataclass."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("derived"):  # not a setting: set from others when a run starts
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            kind = mutable(kind)
            default = field(default_factory=kind)
        elif f.default_factory is not dataclasses.MISSING:
            default = field(default_factory=f.default_factory)
        else:
            default = field(default=f.default)
        fields.append((f.name, kind, default))
    return dataclasses.make_dataclass(cls.__name__, fields)


ConfigStore.instance().store(name="ggans_schema", node=mutable(CliConfig))
# ``${floordiv:1000,${local_steps}}``: a value in rounds from one in iterations (experiments)
OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b), replace=True)


def known_keys(conf: Path) -> set[str]:
    """Every key an override may name: the schema's (its settings and the sections holding
    them), and the logger group's."""
    from ggans.config import flat

    settings = set(flat(CliConfig()))
    keys = settings | {k.rsplit(".", 1)[0] for k in settings if "." in k} | set(GROUPS)
    for f in (conf / "logger").glob("*.yaml"):
        body = OmegaConf.to_container(OmegaConf.load(f), resolve=False) or {}
        keys |= {f"logger.{k}" for k in body if k != "defaults"}
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
            if choice in allowed:
                continue
            if _registered(key, choice):
                raise GGansError(
                    f"{key}={choice!r}: registered, with no conf/{key}/{choice}.yaml; "
                    f"use {key}.name={choice}"
                )
            raise GGansError(f"{key}={choice!r}: must be one of {', '.join(allowed)}")


def _registered(group: str, name: str) -> bool:
    from ggans import protocols, topologies

    registry = {"protocol": protocols.PROTOCOLS, "topology": topologies.TOPOLOGIES}
    return name in registry.get(group, {})


def _overrides(argv: list[str]) -> list[str]:
    return [
        a
        for a in argv
        if "=" in a and not a.startswith("-") and not a.lstrip("+~").startswith("hydra")
    ]


def _variants(args: list[str]) -> list[list[str]]:
    """The override lists to check for a (multi)run: each sweep's first value with the others
    fixed, then every other value of each sweep in turn."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(args)
    choices = []
    for arg, o in zip(args, parsed, strict=True):
        key = arg.split("=", 1)[0]
        try:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else None
        except Exception:  # a sweep of a kind Hydra expands itself (glob, interval)
            values = None
        choices.append([f"{key}={v}" for v in values] if values else [arg])
    base = [c[0] for c in choices]
    variants = [base]
    for i, c in enumerate(choices):
        variants += [base[:i] + [v] + base[i + 1 :] for v in c[1:]]
    return variants


def _one_line(err: Exception) -> str:
    cause = err.__cause__ or err
    key = getattr(cause, "full_key", None)
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if key and first.startswith("Key "):
        return f"{key}: unknown key"
    if key and first.startswith("Value "):  # "Value 'x' of type 'str' could not be converted"
        kind = first.rsplit(" ", 1)[-1].lower()
        return f"{key}={first.split(chr(39))[1]!r}: must be of type {kind}"
    return first


def check_config(argv: list[str], conf: Path) -> None:
    """Compose the config each job of ``argv`` will get and validate it, before Hydra writes
    anything: a bad value or combination is one line, and no folder is made."""
    from hydra import compose, initialize_config_dir

    try:
        variants = _variants(_overrides(argv))
    except Exception as err:
        raise GGansError(f"overrides: {_one_line(err)}") from None
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for overrides in variants:
            try:
                cfg = compose("config", overrides=overrides)
                container = OmegaConf.to_container(cfg, resolve=True)
            except Exception as err:  # a bad value, or an interpolation that cannot resolve
                raise GGansError(_one_line(err)) from None
            run_config(container)


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


# Jobs of this process's multirun that stopped with an error (in-process launchers).
FAILED: list[str] = []


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ggans.run import Interrupted, prepare
    from ggans.runfolder import FolderBusy
    from ggans.tracking import make_loggers

    for noisy in ("absl", "jax._src.xla_bridge", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    made = Path(HydraConfig.get().runtime.output_dir)
    fresh = _only_hydras(made)
    out = made
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        run_cfg = run_config(container)
        if cfg.get("distributed"):
            import jax

            jax.distributed.initialize()
        resume = cfg.get("resume", "auto")
        if resume is True and not (out / "checkpoints").is_dir():
            out = latest_unfinished(out)
        logger = dict(container.get("logger") or {})
        choices = HydraConfig.get().runtime.choices
        if not logger.get("group") and choices.get("experiment"):
            quick = "-quick" if choices.get("scale") == "quick" else ""
            logger["group"] = f"{choices['experiment']}{quick}"
        seeds = cfg.get("seeds", 1)
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise GGansError(f"seeds={seeds!r}: must be an integer >= 1")
        if seeds > 1:
            _run_seeds(cfg, run_cfg, seeds, out, resume, logger)
            return
        log.info("%s: run folder %s", run_cfg.name, out)
        session = prepare(run_cfg, out, resume=resume)
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        loggers = make_loggers(logger, run_cfg, out, container)
        summary = session.train(progress=cfg.get("progress", "auto"), loggers=loggers)
        _log_done(run_cfg.name, summary, out)
    except Interrupted as err:  # the round's records and checkpoint are saved
        print(f"ggans: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print(
            f"ggans: interrupted; run the same command (hydra.run.dir={out}) to resume from the "
            "last checkpoint",
            file=sys.stderr,
        )
        sys.exit(130)
    except (GGansError, OSError) as err:
        if isinstance(err, OSError):  # an unwritable folder, a full disk, a failed read
            err = GGansError(f"{err.filename or out}: {err.strerror or err}")
        print(f"ggans: error: {err}", file=sys.stderr)
        if fresh and out == made and not isinstance(err, FolderBusy) and _only_hydras(made):
            _remove_refused(made)
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # the other jobs go on
            FAILED.append(made.name)
            return
        sys.exit(2)
    finally:
        if fresh and out != made:
            _remove_refused(made)
        _release_compiled_programs()


def _run_seeds(cfg: DictConfig, run_cfg, seeds: int, out: Path, resume, logger: dict) -> list:
    """``seeds=S``: seeds seed .. seed + S - 1 in one program (:func:`ggans.seeds.run_seeds`),
    each in the folder (and W&B run) its own seed's name gives it."""
    from ggans.seeds import run_seeds
    from ggans.tracking import make_loggers

    jobs = []
    for seed in range(run_cfg.seed, run_cfg.seed + seeds):
        one = cfg.copy()
        OmegaConf.update(one, "seed", seed)
        container = OmegaConf.to_container(one, resolve=True)
        name = container["name"]
        folder = Path(str(out).replace(run_cfg.name, name)) if run_cfg.name in str(out) else (
            out.parent / f"{out.name}-s{seed}"
        )  # fmt: skip
        jobs.append((seed, folder, container, run_config(container)))
    by_folder = {}
    for _, folder, container, rc in jobs:
        log.info("%s: run folder %s", container["name"], folder)
        by_folder[Path(folder).absolute()] = (container, rc)

    def loggers(run):
        folder = Path(run.folder.path).absolute()
        container, rc = by_folder[folder]
        OmegaConf.save(OmegaConf.create(container), folder / "config.yaml")
        return make_loggers(logger, rc, folder, container)

    summaries = run_seeds(
        run_cfg,
        [seed for seed, *_ in jobs],
        [folder for _, folder, *_ in jobs],
        loggers=loggers,
        progress=cfg.get("progress", "auto"),
        resume=resume,
        names=[container["name"] for _, _, container, _ in jobs],
    )
    for (_, folder, container, _), summary in zip(jobs, summaries, strict=True):
        _log_done(container["name"], summary, folder)
    return summaries


def _log_done(name: str, summary: dict, out: Path) -> None:
    """One line at a run's end: its final mean scores and where its outputs are."""
    scores = " ".join(
        f"{k}={summary['final'][k]:.4g}" for k in ("ms_mean", "fid_mean") if k in summary["final"]
    )
    log.info("%s: done%s; outputs in %s", name, f" {scores}" if scores else "", out)


def _release_compiled_programs() -> None:
    """Drop the job's compiled programs: on XLA's CPU backend each compiled round holds about
    2,000 memory mappings, and a process past the kernel's limit (65,530) segfaults in the next
    compile; a multirun's jobs share one process with the basic launcher."""
    import jax

    jax.clear_caches()


def _only_hydras(folder: Path) -> bool:
    """Whether ``folder`` holds only what Hydra (and a released lock) put there."""
    return all(p.name in (".hydra", ".lock") or p.suffix == ".log" for p in folder.iterdir())


def _remove_refused(folder: Path) -> None:
    """A refused run leaves nothing behind: the folder Hydra made for it, and its parent when
    that is left empty (``outputs/runs/<name>``)."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


def main() -> None:
    """Entry point of ``python -m ggans`` and the ``ggans`` script."""
    conf = config_dir()
    try:
        plugins.load()
        check_override_keys(sys.argv[1:], conf)
        check_group_choices(sys.argv[1:], conf)
        if not {"--help", "-h", "--hydra-help", "--info", "-i"} & set(sys.argv[1:]):
            check_config(sys.argv[1:], conf)
    except GGansError as err:
        print(f"ggans: error: {err}", file=sys.stderr)
        sys.exit(2)
    hydra.main(version_base="1.3", config_path=str(conf), config_name="config")(_task)()
    if FAILED:
        print(f"ggans: error: {len(FAILED)} job(s) failed: {', '.join(FAILED)}", file=sys.stderr)
        sys.exit(2)
