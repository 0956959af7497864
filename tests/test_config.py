"""Config precedence: flag > EDA_* env > --config FILE > ./eda.toml > XDG > default."""

import os

from tests.helpers import run


def _sub_count(tmp_path, *args, env=None):
    """Run a publisher-less eda-sub that only reports its idle timeout through exit/err."""
    return run("eda-sub", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t", *args, env=env)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_precedence_of_files_env_and_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    xdg = tmp_path / "xdg"
    env = {"XDG_CONFIG_HOME": str(xdg)}
    # each layer sets a different timeout; -W reports itself in the exit only,
    # so we look at which value eda-pub's --wait would use via a short idle run
    _write(xdg / "eda" / "config.toml", "[sub]\ntimeout = 0.2\n")
    result = _sub_count(tmp_path, env=env)
    assert result.returncode == 4  # XDG value applied: exits on idle timeout
    _write(tmp_path / "eda.toml", "[sub]\ntimeout = 'abc'\n")
    result = _sub_count(tmp_path, env=env)
    assert result.returncode == 2  # ./eda.toml overrides XDG (and is invalid)
    assert "eda.toml:2: key 'sub.timeout'" in result.stderr
    explicit = tmp_path / "explicit.toml"
    _write(explicit, "[sub]\ntimeout = 0.3\n")
    result = _sub_count(tmp_path, "-c", str(explicit), env=env)
    assert result.returncode == 4  # --config beats ./eda.toml
    result = _sub_count(tmp_path, env={**env, "EDA_CONFIG": str(explicit)})
    assert result.returncode == 4
    result = _sub_count(tmp_path, "-c", str(explicit), "-W", "x", env=env)
    assert result.returncode == 2 and "-W" in result.stderr  # the flag wins and is checked


def test_env_var_beats_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "eda.toml", "interface = 'no-such-if0'\n")
    result = _sub_count(tmp_path, "-W", "0.1")
    assert result.returncode == 2 and "no-such-if0" in result.stderr
    result = _sub_count(tmp_path, "-W", "0.1", env={"EDA_INTERFACE": "127.0.0.1"})
    assert result.returncode == 4, result.stderr


def test_unknown_key_in_program_table_names_file_line_and_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "eda.toml", "# comment\n[sub]\nraw = true\ncolour = 'red'\n")
    result = _sub_count(tmp_path, "-W", "0.1")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"eda-sub: error: {os.path.join('eda.toml')}:4: key 'sub.colour' is not an option of eda-sub"
    )


def test_toml_syntax_error_is_one_line_with_position(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "eda.toml", "[sub\n")
    result = _sub_count(tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.count("\n") == 1 and "eda.toml" in result.stderr and "line 1" in result.stderr
    )


def test_shared_keys_apply_to_every_program_and_other_tables_are_ignored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the top-level timeout is eda-sub's -W; [pub] has keys eda-sub does not know
    _write(tmp_path / "eda.toml", "timeout = 0.2\n[pub]\nrate = 5.0\nwait = 1.0\n")
    sub_result = run("eda-sub", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t")
    assert sub_result.returncode == 4, sub_result.stderr  # the shared key applied
    assert "no event for 0.2 s" in sub_result.stderr
    # a key eda-sub does not have, in its own table, is an error: the file was read
    _write(tmp_path / "eda.toml", "timeout = 0.2\n[pub]\nrate = 5.0\n[sub]\nrate = 5.0\n")
    sub_result = run("eda-sub", "--no-mdns", "--bind", "tcp://127.0.0.1:*", "t")
    assert sub_result.returncode == 2 and "eda.toml:5: key 'sub.rate'" in sub_result.stderr


def test_unknown_table_is_refused_naming_file_and_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "eda.toml", "interface = '127.0.0.1'\n\n[subb]\nhwm = 5\n")
    result = _sub_count(tmp_path, "-W", "0.1")
    assert result.returncode == 2
    assert result.stderr.startswith("eda-sub: error: eda.toml:3: unknown table [subb]")
    assert result.stderr.count("\n") == 1 and "[sub]" in result.stderr


def test_config_file_that_is_not_utf8_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eda.toml").write_bytes(b"# ok\n[sub]\nformat = '\xff'\n")
    result = _sub_count(tmp_path, "-W", "0.1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == "eda-sub: error: eda.toml:3: not valid UTF-8 (TOML files are UTF-8)\n"
