"""Progress and logging: tqdm bars on a terminal, one log line per item otherwise, the ``helios_jax`` logger
silenced the usual way, the CLI's ``--log-level``, and the compile note said once per program. No model runs
here (test_generation.py and test_cli.py run the pipeline with these)."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from helios_jax import cli, compilation, progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def info(caplog):
    """INFO records of the helios_jax loggers (no CLI handler: what a library user gets)."""
    caplog.set_level(logging.INFO, logger="helios_jax")
    return caplog


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("helios_jax")]


def test_off_a_terminal_each_chunk_is_one_log_line_and_nothing_is_drawn(info):
    stream = io.StringIO()
    with progress.ChunkProgress([6, 3, 3], stream=stream) as bar:
        for frames in (33, 33, 31):
            bar.chunk_done(frames)
    lines = _messages(info)
    assert len(lines) == 3 and stream.getvalue() == ""
    assert lines[0].startswith("chunk 1/3: ") and "(33 frames, 6 steps)" in lines[0] and "ETA" in lines[0]
    assert lines[2].startswith("chunk 3/3: ") and "(31 frames, 3 steps)" in lines[2]


def test_on_a_terminal_tqdm_draws_a_chunk_bar_and_a_step_bar_with_eta_and_logs_nothing(info):
    terminal = FakeTerminal()
    with progress.ChunkProgress([6, 3], stream=terminal) as bar:
        bar.chunk_done(33)
        bar.chunk_done(33)
    drawn = terminal.getvalue()
    assert "chunk: 100%" in drawn and "2/2" in drawn, drawn
    assert "steps: " in drawn and "9/9" in drawn, drawn  # moved by each chunk's steps
    assert "<" in drawn and "33 frames, 3 steps" in drawn  # tqdm's [elapsed<remaining] and the note
    assert _messages(info) == []


def test_disabled_progress_shows_nothing(info):
    stream = FakeTerminal()
    with progress.ChunkProgress([1, 1], enabled=False, stream=stream) as bar:
        bar.chunk_done(33)
        bar.chunk_done(33)
    assert stream.getvalue() == "" and _messages(info) == []


def test_a_long_run_logs_about_the_asked_number_of_lines(info):
    with progress.Progress(1000, "training", stream=io.StringIO(), lines=10) as bar:
        for _ in range(1000):
            bar.advance(note="loss 0.5")
    lines = _messages(info)
    assert len(lines) == 10 and lines[-1].startswith("training 1000/1000: ") and "(loss 0.5)" in lines[-1]


def test_the_library_is_silenced_by_its_logger_level(info):
    library = logging.getLogger("helios_jax")
    before = library.level
    library.setLevel(logging.WARNING)
    try:
        with progress.ChunkProgress([1], stream=io.StringIO()) as bar:
            bar.chunk_done(33)
        compilation.note_first_run(object(), "a program")
    finally:
        library.setLevel(before)
    assert _messages(info) == []


def test_the_compile_note_is_said_once_per_program(info, monkeypatch, tmp_path):
    monkeypatch.setattr(compilation, "_RUN", set())
    before = compilation.jax.config.jax_compilation_cache_dir
    compilation.jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    try:
        for key in ("a", "a", "b", "a"):
            compilation.note_first_run(key, f"program {key}")
        compilation.jax.config.update("jax_compilation_cache_dir", None)
        compilation.note_first_run("c", "program c")
    finally:
        compilation.jax.config.update("jax_compilation_cache_dir", before)
    assert _messages(info) == [f"compiling program a (first run; cached in {tmp_path})",
                               f"compiling program b (first run; cached in {tmp_path})",
                               "compiling program c (first run; the persistent cache is off)"]


@pytest.fixture
def cli_logging():
    """The CLI's handler and level, removed afterwards so later tests see the library's defaults."""
    library = logging.getLogger("helios_jax")
    before = library.level
    yield library
    for handler in [h for h in library.handlers if isinstance(h, progress.LogHandler)]:
        library.removeHandler(handler)
    library.setLevel(before)


def test_cli_log_level_before_or_after_the_command_and_one_handler(cli_logging, monkeypatch):
    parser = cli.parser()
    assert parser.parse_args(["convert", "a", "b"]).log_level == "INFO"
    assert parser.parse_args(["--log-level", "debug", "convert", "a", "b"]).log_level == "DEBUG"
    assert parser.parse_args(["--log-level", "ERROR", "convert", "a", "b", "--log_level", "warning"]).log_level \
        == "WARNING"
    cli.configure_logging("INFO")
    cli.configure_logging("WARNING")  # a second command in one process replaces the handler
    assert sum(isinstance(h, progress.LogHandler) for h in cli_logging.handlers) == 1
    assert cli_logging.level == logging.WARNING
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    logging.getLogger("helios_jax.generate").info("hidden")
    logging.getLogger("helios_jax.generate").warning("shown")
    assert stderr.getvalue() == "warning: shown\n"


def test_cli_invalid_log_level_exits_2(cli_logging, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--log-level", "LOUD", "convert", "a", "b"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid choice: 'LOUD'" in err, err
