"""`fastema demo` end to end (short run)."""

from fastema.__main__ import main


def test_demo_command_prints_table_and_writes_plot(tmp_path, capsys):
    output = tmp_path / "demo.png"
    main(["demo", "--epochs", "2", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "raw accuracy | EMA accuracy" in printed
    assert str(output.resolve()) in printed
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in printed.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert len(rows) == 2
    for row in rows:
        raw, ema = (float(cell) for cell in row.split("|")[1:])
        assert 0.5 < raw <= 1 and 0.5 < ema <= 1
