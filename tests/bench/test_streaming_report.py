"""`kvlab ppl --mode streaming` end to end on tiny-llama: the report, and PPL over a tail of the text."""

import json

from kvlab.cli import main


def test_streaming_report_scores_only_the_tail_when_asked(tmp_path):
    args = ["ppl", "--mode", "streaming", "--model", "tiny-llama", "--dataset", "pg19"]
    args += ["--max-tokens", "40", "--cache-tokens", "8", "--score-from", "30", "--output", str(tmp_path)]
    args += ["--press", "window", "--press", "streaming_llm", "--press", "recompute"]
    assert main(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert {name: row["tokens_scored"] for name, row in rows.items()} == {
        "window": 10,
        "streaming_llm": 10,
        "recompute": 10,
    }
    assert rows["recompute"]["first_scored"] == 30 and len(rows["window"]["cumulative_ppl"]) == 39
    report = (tmp_path / "report.md").read_text()
    assert "PPL over tokens 30..39 only" in report and (tmp_path / "cumulative_ppl.png").is_file()


def test_score_from_outside_the_text_is_one_clear_error(tmp_path, capsys):
    args = ["ppl", "--mode", "streaming", "--model", "tiny-llama", "--dataset", "pg19", "--max-tokens", "40"]
    assert main([*args, "--score-from", "40", "--output", str(tmp_path)]) == 2
    assert "--score-from must be in [1, 39]" in capsys.readouterr().err
