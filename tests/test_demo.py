"""`fastema demo` end to end (short run)."""

from fastema.__main__ import main


def test_demo_command_prints_table_and_writes_plot(tmp_path, capsys):
    output = tmp_path / "demo.png"
    main(["demo", "--epochs", "2", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "raw accuracy | EMA accuracy | mean |EMA - raw| weight" in printed
    assert str(output.resolve()) in printed
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in printed.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert len(rows) == 2
    for row in rows:
        raw, ema, gap = (float(cell) for cell in row.split("|")[1:])
        assert gap > 1e-4  # the EMA trails the weights: an update that copied the model would print 0
        # Chance is 0.1. After 2 epochs at a high constant learning rate the EMA (decay 0.99, a
        # ~100-step horizon, longer than the run) still holds early weights: 0.39-0.88 over the
        # data orders we tried (0.58-0.88 over seeds 0-5), and another CPU's rounding can move
        # a seeded run to another outcome in that spread.
        assert 0.5 < raw <= 1 and 0.3 < ema <= 1


def test_demo_is_reproducible_with_its_seed(tmp_path, capsys):
    from fastema.demo import run_demo

    first = run_demo(epochs=1, output=tmp_path / "first.png", seed=3)
    second = run_demo(epochs=1, output=tmp_path / "second.png", seed=3)
    assert first == second
