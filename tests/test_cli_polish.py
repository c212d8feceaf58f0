"""CLI polish (issue 28): --help shows every option's default; ``eval --lm-eval`` without its extra
is one line and exit status 2; ``serve --ray`` binds every Ray component to --host."""

from __future__ import annotations

import argparse
import sys

import pytest

from shirakit.cli import SUBCOMMANDS, build_parser, main


def _subparsers():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    for command in SUBCOMMANDS:
        sub = choices[command]
        if sub._populate is not None:  # serve adds its flags on first use
            populate, sub._populate = sub._populate, None
            populate(sub)
        yield command, sub


def test_help_shows_the_default_of_every_option(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: nothing wraps inside "(default: ...)"
    checked = 0
    for command, sub in _subparsers():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if not action.option_strings or action.default in (None, argparse.SUPPRESS):
                continue
            block = " ".join(sub._get_formatter()._format_action(action).split())  # its lines in --help
            assert block in text, f"{command} {action.option_strings}: not in --help"
            assert block.endswith(f"(default: {action.default})"), f"{command}: {block!r}"
            checked += 1
        # a None default is not printed as "None": the help text says what it means
        assert "(default: None)" not in sub.format_help(), command
    assert checked >= 30  # the walk did reach the flags (train, serve, eval, ...)


def test_lm_eval_without_its_extra_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert main(["eval", str(adapter), "--lm-eval", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "shirakit[eval]"' in err, err


@pytest.mark.parametrize("argv, named", [
    (["--limit", "5"], "--limit goes with --lm-eval"),
    (["--lm-eval", "a,,b"], "expected comma-separated task names"),
    (["--lm-eval", "x", "--include-path", "{root}/nowhere"], "--include-path"),
    (["--lm-eval", "x", "--limit", "2.5"], "--limit 2.5"),
    (["--lm-eval", "x", "--data", "{root}/d.jsonl"], "--data does not apply to --lm-eval"),
])
def test_bad_lm_eval_arguments(tmp_path, capsys, argv, named):
    pytest.importorskip("lm_eval")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert main(["eval", str(adapter), *[a.format(root=tmp_path) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", {"dashboard_host": "127.0.0.1"}),
    ("10.1.2.3", {"dashboard_host": "127.0.0.1", "_node_ip_address": "10.1.2.3"}),
    ("0.0.0.0", {"dashboard_host": "127.0.0.1"}),
    ("::1", {"dashboard_host": "::1"}),
])
def test_serve_ray_binds_what_it_starts_to_host(monkeypatch, host, expected):
    """``serve --ray --host H``: ray.init gets H for the node and the dashboard (a public H never
    exposes the dashboard), serve.start's HTTP proxy H; Ray itself is not started here."""
    pytest.importorskip("ray")
    from ray import serve

    from shirakit.serve import ray_app

    calls = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("ray.init", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(serve, "start", lambda **kw: calls.setdefault("start", kw))
    monkeypatch.setattr(serve, "run", lambda app, **kw: calls.setdefault("run", kw))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.setdefault("shutdown", True))
    monkeypatch.setattr("time.sleep", lambda s: (_ for _ in ()).throw(KeyboardInterrupt))  # Ctrl-C at once
    monkeypatch.setattr(ray_app, "build_app", lambda *a, **kw: "app")
    parser = argparse.ArgumentParser()
    from shirakit.serve.server import add_arguments

    add_arguments(parser)
    args = parser.parse_args(["--ray", "--host", host, "--port", "8123"])
    assert ray_app.run_ray(args) == 0
    assert calls["init"] == {"ignore_reinit_error": True, **expected}
    assert calls["start"]["http_options"] == {"host": host, "port": 8123}
    assert calls["shutdown"] is True
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")  # joining a cluster: it is bound already
    assert ray_app.ray_init_args(host) == {"ignore_reinit_error": True}
