import json

from tests.helpers import load_script


def test_prints_swin_t_row_next_to_the_paper(tmp_path, capsys):
    rows = load_script("model_table").main(["--models", "swin_t", "--json", str(tmp_path / "table.json")])
    assert [(r["model"], r["params"], round(r["gmacs"], 1)) for r in rows] == [("swin_t", 28_288_354, 4.5)]
    assert json.loads((tmp_path / "table.json").read_text()) == rows
    assert "| swin_t | 224 | 7 | 28,288,354 (28.3M) | 28M | 4.49 (4.5) | 4.5 |" in capsys.readouterr().out
