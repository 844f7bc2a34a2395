"""ncu source page (CSV) -> stall samples per SASS instruction and per execution count."""
import pytest

from experiments.ncu_source_summary import by_count, launches, parse, summary

_COLUMNS = ('"Address","Source","# Samples","Instructions Executed","stall_long_sb","stall_barrier",'
            '"stall_long_sb (Not Issued)"')


def _page(rows):
  return "\n".join(['"Kernel Name","void k<(int)8>(P)",', _COLUMNS] + rows)


def test_groups_by_execution_count_and_ranks_instructions():
  page = _page(['"0x7f00","  LDG.E.128 R8, desc[UR4][R2.64]","3","28672","1","0","1"',
                '"0x7f10","  IMMA.16832.S8.S8 R4, R4.ROW, R8.COL, R4","40","28672","38","0","38"',
                '"0x7f20","  @P0 BRA 0x7f00","9","7168","0","9","0"',
                '"0x7f30","  EXIT","0","3168","0","0","0"'])
  insts = parse(page)
  assert [i.address for i in insts] == [0x7F00, 0x7F10, 0x7F20, 0x7F30]
  assert insts[1].stalls == {"long_sb": 38}  # the not-issued column is not a separate reason
  assert by_count(insts) == [(28672, 2, 43), (7168, 1, 9), (3168, 1, 0)]
  text = summary(insts, top=2)
  assert text.splitlines()[0] == "52 samples over 67,680 instructions executed"
  assert "reasons: long_sb 75.0%, barrier 17.3%" in text
  top = [line for line in text.splitlines() if line.startswith("  0x")]
  assert "IMMA" in top[0] and "long_sb 38" in top[0] and "BRA" in top[1] and len(top) == 2


def test_rejects_other_pages():
  with pytest.raises(SystemExit, match="not ncu's --page source"):
    parse('"ID","Kernel Name","Metric Name"\n"0","k","gpu__time_duration.sum"')
  with pytest.raises(SystemExit, match="--section SourceCounters"):
    parse('"Address","Source"\n"0x0","EXIT"')


def test_splits_a_file_of_several_launches():
  """ncu writes one page a profiled launch (a warm-up and the launch timed): each parses alone."""
  first = _page(['"0x7f00","  EXIT","1","10","1","0","1"'])
  second = _page(['"0x7f00","  EXIT","2","10","0","2","0"', '"0x7f10","  BRA 0x7f00","0","4","0","0","0"'])
  pages = launches(first + "\n" + second)
  assert len(pages) == 2 and launches(first) == [first]
  assert [len(parse(p)) for p in pages] == [1, 2] and parse(pages[1])[0].stalls == {"barrier": 2}
