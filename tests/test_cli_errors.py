"""Issue 8: every CLI subcommand turns bad input into one clear error line (exit 2), an out-of-memory on the
GPU into advice (exit 3), and Ctrl-C into exit 130, never a traceback."""
import pytest
import torch

from hashattention.cli import main as cli


def _commands():
    sub = next(a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


COMMANDS = _commands()


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "demo" in capsys.readouterr().out
    assert cli.main([]) == 2


@pytest.mark.parametrize("cmd", COMMANDS)
def test_unknown_argument_is_a_usage_error(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--no-such-option-xyz"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and "Traceback" not in err


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2


def _patched(monkeypatch, cmd, exc):
    parser = cli.build_parser()
    def boom(args):
        raise exc
    orig = parser.parse_args
    def parse(argv=None):
        a = orig(argv)
        a.func = boom
        return a
    parser.parse_args = parse
    monkeypatch.setattr(cli, "build_parser", lambda: parser)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_oom_ctrl_c_and_bad_input_are_handled(cmd, monkeypatch, capsys):
    argv = [cmd] + (["attention"] if cmd == "bench" else [])
    try:
        cli.build_parser().parse_args(argv)
    except SystemExit:
        pytest.skip(f"{cmd} needs more arguments")
    _patched(monkeypatch, cmd, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert "smaller batch" in err and "budget" in err and "Traceback" not in err
    _patched(monkeypatch, cmd, KeyboardInterrupt())
    assert cli.main(argv) == 130
    _patched(monkeypatch, cmd, FileNotFoundError("/nope/maps.safetensors"))
    assert cli.main(argv) == 2 and "/nope/maps.safetensors" in capsys.readouterr().err


def test_demo_missing_maps_file_and_bad_lengths(capsys, monkeypatch):
    assert cli.main(["demo", "--lengths", "10"]) == 2
    assert "--lengths" in capsys.readouterr().err
    assert cli.main(["demo", "--samples", "0"]) == 2
    capsys.readouterr()
    if "memory" in COMMANDS:
        assert cli.main(["memory", "/no/such/model/dir"]) == 2, capsys.readouterr()
    if "import-maps" in COMMANDS:
        assert cli.main(["import-maps", "/no/such/authors.pt", "--out", "/tmp/ha_never_written"]) == 2
        assert "/no/such/authors.pt" in capsys.readouterr().err


def test_eval_bad_names_fail_before_the_model_loads(capsys, monkeypatch):
    import hashattention.cli.eval as ev
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: pytest.fail("the model was loaded before checking"))
    assert cli.main(["eval", "--tasks", "niah_single_noise,bogus_task"]) == 2
    err = capsys.readouterr().err
    assert "bogus_task" in err and "available" in err and "niah_multikey_text" in err
    assert cli.main(["eval", "--policies", "hash,bogus_policy"]) == 2
    err = capsys.readouterr().err
    assert "bogus_policy" in err and "available" in err and "quest" in err
    assert cli.main(["eval", "--budgets", "1/16,two"]) == 2
    assert "two" in capsys.readouterr().err
    assert cli.main(["eval", "--report", "/no/such/results.json"]) == 2
    assert "/no/such/results.json" in capsys.readouterr().err
