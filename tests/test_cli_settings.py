"""``syncfw node serve`` settings (flags > SYNCFW_* > TOML file > defaults), their checks,
the logging options and the defaults in every ``--help``."""

from __future__ import annotations

import argparse
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncfw.cli import build_parser, main
from syncfw.cli.logs import configure_logging
from syncfw.cli.settings import SERVE_OPTIONS, SettingsError, resolve


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["node", "serve", *argv])


def test_precedence_is_flag_then_environment_then_file_then_default(tmp_path: Path) -> None:
    conf = tmp_path / "n.toml"
    conf.write_text(
        'db = "from-file.db"\nid = "t7"\nfleet = "file-fleet"\nlisten = "127.0.0.1:7001"\n'
        'seed = ["10.0.0.1:7000", "10.0.0.2:7000"]\npeer_bytes_per_s = 1000\n'
        'preset = "metered"\nadmin_remote = true\n'
    )
    env = {
        "SYNCFW_FLEET": "env-fleet",
        "SYNCFW_SEED": "10.0.0.3:7000, 10.0.0.4:7000",
        "SYNCFW_PEER_BYTES_PER_S": "2000.5",
    }
    got = resolve(serve_args("--config", str(conf), "--peer-bytes-per-s", "3000"), environ=env)
    assert got.db == "from-file.db" and got.node_id == "t7"  # the file
    assert got.fleet == "env-fleet"  # the environment over the file
    assert got.seed == ["10.0.0.3:7000", "10.0.0.4:7000"]  # a list replaced, not merged
    assert got.peer_bytes_per_s == 3000.0  # the flag over both
    assert got.preset == "metered" and got.admin_remote is True and got.listen == "127.0.0.1:7001"
    assert got.authority == "cloud" and got.status_every == 1.0  # defaults
    assert got.sources["fleet"].startswith("SYNCFW_FLEET=")
    assert got.sources["authority"] == "default"
    # the file named by the environment, and a flag list over it
    got = resolve(serve_args("x.db", "--seed", "h:1"), environ={"SYNCFW_CONFIG": str(conf)})
    assert got.db == "x.db" and got.seed == ["h:1"] and got.fleet == "file-fleet"


@pytest.mark.parametrize(
    ("argv", "env", "toml", "said"),
    [
        (["--seed", "nonsense"], {}, "", "--seed: 'nonsense' must be host:port"),
        ([], {"SYNCFW_SEED": "a:1,nonsense"}, "", "SYNCFW_SEED='a:1,nonsense': 'nonsense' must be"),
        ([], {}, 'seed = ["a:99999"]', "seed: 'a:99999' must be host:port with port 1..65535"),
        ([], {}, 'seed = "a:1"', "seed: 'a:1' is not a list of strings"),
        (
            ["--listen", "127.0.0.1:70000"],
            {},
            "",
            "--listen: '127.0.0.1:70000' port '70000' is not",
        ),
        (["--listen", "nohost"], {}, "", "--listen: 'nohost' must be host:port"),
        (["--peer-bytes-per-s", "fast"], {}, "", "--peer-bytes-per-s: 'fast' is not a number"),
        ([], {}, 'peer_bytes_per_s = "fast"', "peer_bytes_per_s: 'fast' is not a number"),
        ([], {}, "status_every = true", "status_every: True is not a number"),
        (["--status-every", "0"], {}, "", "--status-every: 0.0 must be a number above 0"),
        ([], {"SYNCFW_PRESET": "fast"}, "", "SYNCFW_PRESET='fast': 'fast' is not one of lan"),
        ([], {}, "seeds = []", "unknown key(s) 'seeds'"),
        ([], {}, "id = ", "not valid TOML"),
        ([], {"SYNCFW_SEEDS": "a:1"}, "", "unknown environment variable(s) SYNCFW_SEEDS"),
        (["--id", "a/b"], {}, "", "--id: 'a/b' must be 1-256 letters"),
        (["--shared", "site"], {}, "", "--shared: 'site' must be a key prefix ending in '/'"),
        (
            ["--proxy", "127.0.0.1:3128"],
            {},
            "",
            "--proxy: '127.0.0.1:3128' must be http://host:port",
        ),
        (["--admin", "0.0.0.0:0"], {}, "", "'0.0.0.0:0' is not a loopback address"),
        (["--ca", "ca.pem"], {}, "", "--ca, --cert and --key go together"),
        ([], {}, 'admin_remote = "yes"', "admin_remote: 'yes' is not true or false"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting_its_source_and_value(
    tmp_path: Path, argv: list[str], env: dict[str, str], toml: str, said: str
) -> None:
    base = ["x.db", "--id", "t7"] if "--id" not in argv else ["x.db"]
    if toml:
        conf = tmp_path / "bad.toml"
        conf.write_text(toml + "\n")
        base += ["--config", str(conf)]
    with pytest.raises(SettingsError) as exc:
        resolve(serve_args(*base, *argv), environ=env)
    assert said in str(exc.value)
    if toml:
        assert str(conf) in str(exc.value)  # which file


def test_a_missing_required_setting_says_every_place_it_may_come_from() -> None:
    with pytest.raises(
        SettingsError, match=r"--id is required \(or SYNCFW_ID, or 'id' in --config\)"
    ):
        resolve(serve_args("x.db"), environ={})
    with pytest.raises(SettingsError, match="db is required"):
        resolve(serve_args("--id", "t7"), environ={})


def test_a_refused_setting_exits_2_before_anything_is_opened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "n.db"
    assert main(["node", "serve", str(db), "--id", "t7", "--seed", "nonsense"]) == 2
    assert "syncfw node: --seed: 'nonsense' must be host:port" in capsys.readouterr().out
    assert not db.exists()
    monkeypatch.setenv("SYNCFW_STATUS_EVERY", "soon")
    assert main(["node", "serve", str(db), "--id", "t7"]) == 2
    assert "SYNCFW_STATUS_EVERY='soon': 'soon' is not a number" in capsys.readouterr().out
    assert not db.exists()


def test_every_serve_setting_has_a_flag_a_variable_and_a_file_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["node", "serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for opt in SERVE_OPTIONS:
        if not opt.flag:  # the logging settings: their flags are every verb's
            assert f"--{opt.name}" in text
            continue
        assert opt.env in text, opt.name
        if opt.default not in (None, [], False):
            assert f"(default: {opt.default})" in text, opt.name
    for opt in SERVE_OPTIONS:  # the file takes every key
        assert opt.key == opt.name.replace("-", "_")


def _parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


def test_every_help_shows_the_defaults_and_takes_the_logging_options() -> None:
    for path, parser in _parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
                continue
            if action.dest in ("help", "version"):
                continue
            assert f"(default: {action.default})" in text, (path, action.dest)
        assert "--log-level" in text and "--log-format" in text and "-v" in text, path


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "debug", "inspect", "x.db"],
        ["inspect", "x.db", "--log-level", "DEBUG"],
        ["inspect", "-v", "x.db"],
        ["-v", "node", "serve", "x.db", "--id", "a"],
        ["node", "serve", "x.db", "--id", "a", "-v"],
        ["node", "--log-level", "DEBUG", "serve", "x.db", "--id", "a"],
    ],
)
def test_log_options_are_taken_before_or_after_the_verb(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.log_level == "DEBUG" or args.verbose


def test_log_level_before_the_verb_is_not_undone_by_the_verb() -> None:
    args = build_parser().parse_args(
        ["--log-level", "ERROR", "--log-format", "json", "inspect", "x.db"]
    )
    assert (args.log_level, args.log_format, args.verbose) == ("ERROR", "json", False)
    args = build_parser().parse_args(["inspect", "x.db"])
    assert (args.log_level, args.log_format, args.verbose) == (
        None,
        None,
        False,
    )  # main: INFO, text


def test_serve_takes_the_logging_settings_from_the_environment_and_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "n.toml"
    conf.write_text('log_level = "debug"\nlog_format = "json"\n')
    got = resolve(serve_args("x.db", "--id", "a", "--config", str(conf)), environ={})
    assert (got.log_level, got.log_format) == ("debug", "json")
    got = resolve(
        serve_args("x.db", "--id", "a", "--config", str(conf)),
        environ={"SYNCFW_LOG_LEVEL": "ERROR"},
    )
    assert got.log_level == "ERROR"
    got = resolve(
        serve_args("x.db", "--id", "a", "--log-level", "warning"),
        environ={"SYNCFW_LOG_LEVEL": "ERROR"},
    )
    assert got.log_level == "WARNING"  # the flag, before or after the verb, wins
    got = resolve(
        build_parser().parse_args(
            ["--log-level", "critical", "node", "serve", "x.db", "--id", "a"]
        ),
        environ={},
    )
    assert got.log_level == "CRITICAL"
    with pytest.raises(SettingsError, match="SYNCFW_LOG_LEVEL='loud': 'loud' is not one of DEBUG"):
        resolve(serve_args("x.db", "--id", "a"), environ={"SYNCFW_LOG_LEVEL": "loud"})


def test_logging_sets_syncfw_loggers_only_and_writes_json() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    before = (root.level, list(root.handlers), logging.getLogger("syncfw").level)
    try:
        configure_logging("INFO", "json", verbose=True, stream=out)
        assert logging.getLogger("syncfw.mesh").getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("aiosqlite").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("grpc").getEffectiveLevel() == logging.WARNING
        logging.getLogger("aiosqlite").debug("noise")
        logging.getLogger("syncfw.mesh").debug("t7 learned %d member(s)", 2)
        logging.getLogger("asyncio").warning("a real problem")
        configure_logging("WARNING", "text", stream=out)  # replaces its handler, keeps one
        logging.getLogger("syncfw.mesh").info("hidden")
        assert sum(getattr(h, "_syncfw_cli", False) for h in root.handlers) == 1
    finally:
        for h in [h for h in root.handlers if getattr(h, "_syncfw_cli", False)]:
            root.removeHandler(h)
        root.setLevel(before[0])
        logging.getLogger("syncfw").setLevel(before[2])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["logger"], x["level"], x["message"]) for x in lines] == [
        ("syncfw.mesh", "DEBUG", "t7 learned 2 member(s)"),
        ("asyncio", "WARNING", "a real problem"),
    ]
    assert all(x["time"].endswith("+00:00") and x["ts"] > 0 for x in lines)


def test_the_readme_config_example_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    conf = tmp_path / "t7.toml"
    conf.write_text(readme.split("```toml\n", 1)[1].split("```", 1)[0])
    got = resolve(serve_args("--config", str(conf)), environ={})
    assert (got.node_id, got.fleet, got.preset, got.seed) == (
        "t7",
        "mine-7",
        "metered",
        ["depot.yard:7000"],
    )
    assert all(src.startswith("config ") for k, src in got.sources.items() if k in ("db", "listen"))


@pytest.mark.parametrize("preset", ["lan", "metered", "test"])
def test_the_served_transport_takes_the_presets_connect_timeout_and_backoff(preset: str) -> None:
    from syncfw.cli.node_cmd import PRESETS, node_parts

    got = resolve(
        serve_args("x.db", "--id", "a", "--preset", preset, "--proxy", "http://p:3128"), environ={}
    )
    parts = node_parts(got)
    mesh = PRESETS[preset]()
    assert parts.transport.connect_timeout_s == mesh.connect_timeout_s
    assert parts.transport.max_reconnect_backoff_s == mesh.max_reconnect_backoff_s
    assert parts.transport.http_proxy == "http://p:3128"
