"""scripts/sass_summary.py on a small made-up source-page CSV (the layout ncu --page source --csv writes)."""

import pytest

SCRIPT_NAME = "sass_summary"  # the conftest's `script` fixture loads it

HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","stall_wait",'
          '"stall_barrier","stall_wait (Not Issued)"')
ROWS = [  # (source, samples, executed, wait, barrier): a prologue run, a hot loop run of 3, an epilogue
    ("LDC R1, c[0x0][0x28]", 1, 10, 1, 0),
    ("FLO.U32 R5, R4", 40, 1000, 30, 0),
    ("@!P0 FSETP.GT.AND P1, PT, R2, R3, PT", 20, 1000, 10, 0),
    ("BRA 0x100", 10, 1000, 2, 0),
    ("BAR.SYNC.DEFER_BLOCKING 0x0", 30, 10, 0, 30),
    ("EXIT", 0, 10, 0, 0),
]


@pytest.fixture(scope="module")
def ss(script):
    return script


@pytest.fixture
def csv_file(tmp_path):
    lines = ['"Kernel Name","k_made_up",', HEADER]
    lines += [f'"0x{16 * i:x}","{src}","{s}","{e}","{w}","{b}","0"' for i, (src, s, e, w, b) in enumerate(ROWS)]
    path = tmp_path / "k.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_opcode_classes_count_executed_instructions(ss, csv_file):
    name, executed, samples = ss.summarize(csv_file)
    assert name == "k_made_up"
    assert executed["FLO"] == 1000 and executed["FSETP"] == 1000 and executed["BAR"] == 10
    assert samples["FLO"] == 40 and sum(executed.values()) == 3030


def test_blocks_rank_straight_line_runs_by_instructions(ss, csv_file):
    lines = ss.blocks(csv_file, 2)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| SASS")]
    assert len(rows) == 2
    hot = rows[0].split(" | ")
    assert hot[0] == "| 1-3" and hot[1] == "3" and hot[3] == "99.0%"  # 3000 of 3030 executed
    assert "wait 60%" in hot[5] and "FLO 1" in hot[6]
    assert rows[1].startswith("| 4-5 ")  # the epilogue run (BAR, EXIT: 10 each) follows the prologue's single LDC


def test_main_prints_both_tables(ss, csv_file, capsys):
    assert ss.main([str(csv_file), "--blocks", "3"]) == 0
    out = capsys.readouterr().out
    assert "| FLO |" in out and "straight-line runs" in out
