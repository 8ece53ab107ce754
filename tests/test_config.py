"""The config schema: the dataclasses hold every default once; conf/ only chooses among them."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ggans.cli import EDGE_KEYS, config_dir, run_config
from ggans.config import OPERATIONAL, RunConfig, flat, from_dict
from ggans.errors import ConfigError
from ggans.runfolder import RunFolder


def composed(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def test_the_default_command_line_config_is_the_schema_default():
    cfg = run_config(composed())
    want = flat(RunConfig())
    got = flat(cfg)
    assert got.pop("name") == "gossip-N10-iid-s0" and want.pop("name") == "run"
    assert got.pop("model.impl") in ("cpu", "patches")
    want.pop("model.impl")
    assert got == want


def test_conf_sets_no_value_of_its_own_in_the_main_file():
    main = OmegaConf.to_container(OmegaConf.load(config_dir() / "config.yaml"))
    assert set(main) == {"defaults", "hydra"}


def test_the_tiny_model_and_an_experiment_override_the_schema():
    c = composed("experiment=quick")
    assert c["model"]["arch"] == "tiny" and c["nodes"] == 4 and c["eval"]["samples"] == 500
    assert c["model"]["g_lr"] == RunConfig().model.g_lr
    assert set(EDGE_KEYS) == {"logger", "resume", "progress", "distributed", "seeds"}


def test_an_unknown_nested_key_is_named_with_the_keys_allowed():
    with pytest.raises(ConfigError, match=r"model\.gp_wieght: unknown key \(allowed: arch, "):
        from_dict({"model": {"gp_wieght": 1.0}})
    with pytest.raises(ConfigError, match=r"^nodez: unknown key"):
        from_dict({"nodez": 3})


def test_operational_keys_are_real_keys():
    assert set(flat(RunConfig())) >= OPERATIONAL


def test_a_folder_written_before_the_schema_resumes_and_other_settings_are_refused(tmp_path):
    cfg = from_dict({"nodes": 4, "model": {"arch": "tiny"}})
    old = {  # run_config.json as the flat RunConfig wrote it, before protocol and co. nested
        k: v for k, v in flat(cfg).items() if k not in OPERATIONAL and "." not in k
    } | {k: v for k, v in flat(cfg).items() if k.split(".")[0] in ("model", "data", "eval")}
    old |= {"protocol": "gossip", "mix_optimizer": False, "mixing_form": "auto", "name": "x"}
    old = {k: v for k, v in old.items() if k not in OPERATIONAL}
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    assert RunFolder(tmp_path, cfg).check("auto") is None
    with pytest.raises(ConfigError, match=r"^nodes=6: the run folder .* holds a run with nodes=4"):
        RunFolder(tmp_path, from_dict({"nodes": 6, "model": {"arch": "tiny"}})).check("auto")
    with pytest.raises(ConfigError, match=r"^protocol.name='federated': .* protocol.name='gossip'"):
        cfg2 = from_dict({"nodes": 4, "model": {"arch": "tiny"}, "protocol": {"name": "federated"}})
        RunFolder(tmp_path, cfg2).check("auto")
