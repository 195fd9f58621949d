"""The strict config loader (megatron_spo.config) on a small dataclass tree."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import yaml

from megatron_spo.config import (
    SET_BY_CALLER,
    apply_overrides,
    describe,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)
from megatron_spo.errors import UserError


@dataclasses.dataclass(kw_only=True)
class Rho:
    d_half: float = 0.06
    """Drift at which rho halves (nats)."""
    mode: Literal["kl", "constant"] = "kl"
    """How rho is set."""


@dataclasses.dataclass(kw_only=True)
class Spo:
    rho: Rho = dataclasses.field(default_factory=Rho)
    eps: float = 0.05
    files: list[str] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)
    """Free-form options."""


@dataclasses.dataclass(kw_only=True)
class Optim:
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclasses.dataclass(kw_only=True)
class Trainer:
    spo: Spo = dataclasses.field(default_factory=Spo)
    optim: Optim = dataclasses.field(default_factory=Optim)
    name: str
    """Run name (required)."""
    steps: int | None = None
    wandb: bool = False
    out: Path = Path("runs")


@dataclasses.dataclass(kw_only=True)
class Root:
    trainer: Trainer


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides_build_the_tree(tmp_path):
    path = write(tmp_path, "trainer:\n  name: a\n  optim:\n    lr: 1e-5\n  spo:\n    rho: {d_half: 0.1}\n")
    cfg = load_config(Root, path, ["trainer.spo.rho.d_half=0.08", "trainer.spo.files=[x.jsonl, y.jsonl]",
                                   "trainer.steps=12", "trainer.wandb=true", "trainer.optim.betas=[0.8, 0.9]"])
    assert cfg.trainer.spo.rho.d_half == 0.08          # override beats the file
    assert cfg.trainer.optim.lr == 1e-5                # "1e-5" (a YAML 1.1 string) is accepted as float
    assert cfg.trainer.spo.files == ["x.jsonl", "y.jsonl"]
    assert cfg.trainer.steps == 12 and cfg.trainer.wandb is True
    assert cfg.trainer.optim.betas == (0.8, 0.9)
    assert cfg.trainer.spo.eps == 0.05 and cfg.trainer.spo.rho.mode == "kl"  # defaults kept
    assert isinstance(cfg.trainer.out, Path)


def test_empty_section_means_defaults(tmp_path):
    cfg = load_config(Root, write(tmp_path, "trainer:\n  name: a\n  optim:\n  spo:\n"))
    assert cfg.trainer.optim == Optim() and cfg.trainer.spo == Spo()


def test_unknown_key_names_dotted_key_and_valid_ones(tmp_path):
    path = write(tmp_path, "trainer:\n  name: a\n  spo:\n    rho:\n      d_halff: 0.1\n")
    with pytest.raises(UserError) as err:
        load_config(Root, path)
    msg = str(err.value)
    assert "'trainer.spo.rho.d_halff'" in msg and "d_half, mode" in msg and "c.yaml" in msg
    assert "\n" not in msg


def test_unknown_override_key_is_refused_before_building():
    with pytest.raises(UserError, match=r"unknown key 'trainer\.optim\.lrr'.*betas, lr, warmup"):
        load_config(Root, None, ["trainer.name=x", "trainer.optim.lrr=1"])
    with pytest.raises(UserError, match="is a value, not a section"):
        load_config(Root, None, ["trainer.name=x", "trainer.steps.sub=1"])


def test_free_form_dict_accepts_any_subkey():
    cfg = load_config(Root, None, ["trainer.name=x", "trainer.spo.extra.anything=3"])
    assert cfg.trainer.spo.extra == {"anything": 3}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.steps=ten", "'trainer.steps' expects int | null, got 'ten'"),
        ("trainer.wandb=1", "'trainer.wandb' expects bool, got 1"),
        ("trainer.optim.warmup=2.5", "'trainer.optim.warmup' expects int, got 2.5"),
        ("trainer.spo.rho.mode=exp", "'trainer.spo.rho.mode' expects one of 'kl', 'constant', got 'exp'"),
        ("trainer.spo.files=a.jsonl", "'trainer.spo.files' expects list[str], got 'a.jsonl'"),
        ("trainer.spo.files=[1]", "'trainer.spo.files[0]' expects str, got 1"),
        ("trainer.optim.lr=true", "'trainer.optim.lr' expects float, got True"),
        ("trainer.optim.betas=[0.9]", "'trainer.optim.betas' expects tuple[float, float]"),
        ("trainer.spo.rho=0.5", "'trainer.spo.rho' expects mapping (Rho), got 0.5"),
    ],
)
def test_wrong_types_name_key_type_and_value(override, expected):
    with pytest.raises(UserError) as err:
        load_config(Root, None, ["trainer.name=x", override])
    assert expected in str(err.value)


def test_missing_required_key_and_post_init_errors_name_the_section():
    with pytest.raises(UserError, match=r"missing required key 'trainer' \(mapping \(Trainer\)\)"):
        load_config(Root, None, [])
    with pytest.raises(UserError, match=r"missing required key 'trainer\.name' \(str\)"):
        load_config(Root, None, ["trainer.steps=1"])
    with pytest.raises(UserError, match=r"invalid 'trainer\.optim': lr must be > 0, got -1.0"):
        load_config(Root, None, ["trainer.name=x", "trainer.optim.lr=-1"])


def test_bad_files_and_bad_override_syntax(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(Root, tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(Root, write(tmp_path, "trainer: [unclosed\n"))
    with pytest.raises(UserError, match="mapping at the top level"):
        load_config(Root, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(UserError, match="section.key=value"):
        parse_override("trainer.name")
    with pytest.raises(UserError, match="section.key=value"):
        parse_override("trainer..name=x")


def test_override_values_are_yaml_scalars():
    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override("a=") == (["a"], "")


def test_apply_overrides_does_not_mutate_input():
    raw = {"trainer": {"name": "a", "spo": {"eps": 0.1}}}
    out = apply_overrides(Root, raw, ["trainer.spo.eps=0.2", "trainer.optim.lr=0.5"])
    assert raw["trainer"]["spo"]["eps"] == 0.1
    assert out["trainer"]["spo"]["eps"] == 0.2 and out["trainer"]["optim"] == {"lr": 0.5}


def test_save_round_trips_and_is_plain_yaml(tmp_path):
    cfg = load_config(Root, None, ["trainer.name=run1", "trainer.optim.lr=3e-4", "trainer.spo.files=[a]"])
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["trainer"]["optim"]["betas"] == [0.9, 0.999] and data["trainer"]["out"] == "runs"
    assert from_dict(Root, data) == cfg
    assert to_dict(cfg) == data
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


def test_describe_lists_leaves_with_docs():
    lines = describe(Root)
    assert "trainer.spo.rho.d_half (float) = 0.06  # Drift at which rho halves (nats)." in lines
    assert "trainer.name (str) = (required)  # Run name (required)." in lines


# ----------------------------------------------------------------------------- moved keys, program-set fields


@dataclasses.dataclass(kw_only=True)
class Engine:
    name: str = "hf"
    model: str | None = dataclasses.field(default=None, metadata=SET_BY_CALLER)
    """Filled in by the program."""


@dataclasses.dataclass(kw_only=True)
class Section:
    engine: Engine = dataclasses.field(default_factory=Engine)
    lr: float = 1e-6


@dataclasses.dataclass(kw_only=True)
class Moved:
    MOVED: ClassVar[dict] = {"old": "new.section", "new.rate": "new.lr", "new.engine": "new.engine.name",
                             "both": ("new.section", "other")}
    new: Section = dataclasses.field(default_factory=Section)


def test_old_keys_name_their_new_key_in_files_and_overrides(tmp_path):
    for text, old, new in [
        ("old:\n  lr: 1\n", "old.lr", "new.section.lr"),         # a whole old section: its first key
        ("new:\n  rate: 1\n", "new.rate", "new.lr"),
        ("new:\n  engine: vllm\n", "new.engine", "new.engine.name"),  # a value where a section is now
    ]:
        with pytest.raises(UserError) as err:
            load_config(Moved, write(tmp_path, text))
        assert str(err.value) == f"config '{tmp_path / 'c.yaml'}': key '{old}' moved to '{new}'"
    with pytest.raises(UserError, match=r"^command-line override 'new.rate=2': 'new.rate' moved to 'new.lr'$"):
        load_config(Moved, None, ["new.rate=2"])
    with pytest.raises(UserError, match=r"'both.x' moved to 'new.section.x' \(or 'other.x'\)$"):
        load_config(Moved, None, ["both.x=1"])
    # the new shape loads; a typo under a section that is also an old key stays an unknown key
    assert load_config(Moved, None, ["new.engine.name=vllm", "new.lr=2"]).new.engine.name == "vllm"
    with pytest.raises(UserError, match=r"unknown key 'new.engine.nam'; valid keys under 'new.engine': name$"):
        load_config(Moved, None, ["new.engine.nam=vllm"])


def test_program_set_fields_are_not_config_keys(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'new.engine.model'; valid keys under 'new.engine': name$"):
        load_config(Moved, None, ["new.engine.model=/m"])
    cfg = Moved(new=Section(engine=Engine(model="/m")))  # the program sets it
    assert to_dict(cfg) == {"new": {"engine": {"name": "hf"}, "lr": 1e-6}}  # and saved configs leave it out
    assert not any("model" in line for line in describe(Moved))


def test_values_are_set_verbatim_between_the_file_and_the_overrides(tmp_path):
    path = write(tmp_path, "trainer:\n  name: a\n  out: x\n")
    cfg = load_config(Root, path, ["trainer.name=c"], values={"trainer.out": "yes", "trainer.name": "b"})
    assert cfg.trainer.out == Path("yes") and cfg.trainer.name == "c"  # `yes` stays a path; overrides win
