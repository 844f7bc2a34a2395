"""experiments.compile_only_gpu where jax's CUDA plugin is not installed (CI): its clear refusals,
its reading of ptxas' report, and the GPU specs it ships. The compiles themselves need the plugin
and ptxas; their numbers are in BENCHMARKS.md (session 39)."""
import pytest

from experiments import compile_only_gpu as cog

PTXAS_REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'loop_add_fusion' for 'sm_90a'
ptxas info    : Function properties for loop_add_fusion
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers
ptxas info    : Compiling entry function 'cqjax_lut_matmul__1' for 'sm_90a'
ptxas info    : Function properties for cqjax_lut_matmul__1
    184 bytes stack frame, 180 bytes spill stores, 176 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 184 bytes cumulative stack size
ptxas info    : Compiling entry function 'cqjax_grouped_lut_matmul' for 'sm_90a'
ptxas info    : Function properties for cqjax_grouped_lut_matmul
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 78 registers, used 1 barriers
"""


def test_reads_the_cqjax_kernels_of_a_ptxas_report():
  assert cog.parse_ptxas(PTXAS_REPORT) == [
      dict(kernel="cqjax_lut_matmul__1", stack=184, spill_stores=180, spill_loads=176, registers=255),
      dict(kernel="cqjax_grouped_lut_matmul", stack=0, spill_stores=0, spill_loads=0, registers=78)]


def test_ships_the_specs_of_the_gpus_benchmarked():
  assert {"h100_sxm", "h200"} <= set(cog.spec_names())


def test_refuses_an_unknown_spec():
  with pytest.raises(SystemExit, match=r"no GPU spec 'a100'.*h100_sxm, h200"):
    cog.compile_only_devices("a100")


def test_asks_for_the_cuda_plugin(monkeypatch):
  def no_plugin(*args, **kwargs):
    raise NotImplementedError("topology not implemented for cuda")  # what jax raises without the plugin

  monkeypatch.setattr(cog.topologies, "get_topology_desc", no_plugin)
  with pytest.raises(SystemExit, match=r"needs jax's CUDA plugin: pip install --no-deps --target DIR "
                                       r"jax-cuda12-plugin==\S+ jax-cuda12-pjrt==\S+, then run with PYTHONPATH=DIR"):
    cog.compile_only_devices("h200")


@pytest.mark.parametrize("argv,match", [
    (["--settings=codebook_w4_int8"], r"compiles codebook_w4_int8 with the CUDA kernels' library: give --cuda_library=PATH"),
    (["--settings=codebook_w4", "--trace_tokens=4"], r"a trace \(--trace_tokens\) needs one")])
def test_decode_step_count_without_a_gpu_refuses_what_needs_one(monkeypatch, argv, match):
  from experiments import profile_decode_step  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr("sys.argv", ["profile_decode_step", "--compile_for=h200", *argv])
  with pytest.raises(SystemExit, match=match):
    profile_decode_step.main()


def test_asks_for_a_built_cuda_library(tmp_path):
  with pytest.raises(SystemExit, match=r"no CUDA library at .*none.so: build one with python -m cuda_kernels.build"):
    cog.use_cuda_library(str(tmp_path / "none.so"))


def test_reads_registers_from_a_dump_and_names_a_ptx_ptxas_refuses(tmp_path, monkeypatch):
  """dumped_kernels runs ptxas on each PTX file with a cqjax_ entry (here a stand-in ptxas that
  prints the report above, or fails), skipping the others."""
  fake = tmp_path / "bin" / "ptxas"
  fake.parent.mkdir()
  report = tmp_path / "report.txt"
  report.write_text(PTXAS_REPORT)
  fake.write_text(f"#!/bin/sh\ncase \"$3\" in *bad.ptx) echo 'ptxas fatal   : syntax error' >&2; exit 1;; esac\n"
                  f"cat {report} >&2\n")
  fake.chmod(0o755)
  monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
  monkeypatch.setattr(cog, "_cuobjdump", lambda: None)  # registers alone; the K loop: the test below
  (tmp_path / "dump").mkdir()
  (tmp_path / "dump" / "module_0001.jit_f.ptx").write_text(".target sm_90a\n.visible .entry cqjax_lut_matmul__1(\n")
  (tmp_path / "dump" / "module_0001.jit_g.ptx").write_text(".target sm_90a\n.visible .entry loop_add_fusion(\n")
  rows = cog.dumped_kernels(str(tmp_path / "dump"))
  assert [r["kernel"] for r in rows] == ["cqjax_lut_matmul__1", "cqjax_grouped_lut_matmul"]  # one file read
  (tmp_path / "dump" / "module_0002.bad.ptx").write_text(".target sm_90a\n.visible .entry cqjax_lut_matmul(\n")
  with pytest.raises(SystemExit, match=r"ptxas failed on .*module_0002.bad.ptx: ptxas fatal   : syntax error"):
    cog.dumped_kernels(str(tmp_path / "dump"))


SASS = """
\tcode for sm_90a
\t\tFunction : cqjax_lut_matmul__1
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
        /*0010*/                   PRMT R4, R2, R3, R5 ;                       /* 0x0000000502047216 */
        /*0020*/                   FFMA R6, R4, R7, R6 ;                       /* 0x0000000704067223 */
        /*0030*/              @!P0 BRA 0x10 ;                                 /* 0x0000000000008947 */
        /*0040*/                   EXIT ;                                      /* 0x000000000000794d */
\t\t..........

\t\tFunction : loop_add_fusion
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   FADD R0, R1, R2 ;                           /* 0x0000000201007221 */
        /*0010*/                   FADD R0, R0, R2 ;                           /* 0x0000000200007221 */
        /*0020*/                   FADD R0, R0, R3 ;                           /* 0x0000000300007221 */
        /*0030*/                   FADD R0, R0, R4 ;                           /* 0x0000000400007221 */
        /*0040*/               @P0 BRA 0x0 ;                                   /* 0x0000000000000947 */
        /*0050*/                   EXIT ;                                      /* 0x000000000000794d */
"""


def test_splits_a_sass_listing_by_function():
  functions = cog.sass_functions(SASS)
  assert list(functions) == ["cqjax_lut_matmul__1", "loop_add_fusion"]
  assert "PRMT" in functions["cqjax_lut_matmul__1"] and "FADD" not in functions["cqjax_lut_matmul__1"]


def test_reads_each_kernels_k_loop_from_its_cubin(tmp_path, monkeypatch):
  """With a cuobjdump (here a stand-in printing the listing above), each cqjax_ kernel gets its own
  function's K loop, not another kernel's of the same file."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (tmp_path / "report.txt").write_text(PTXAS_REPORT.split("ptxas info    : Compiling entry function 'cqjax_grouped")[0])
  (tmp_path / "sass.txt").write_text(SASS)
  for name, body in (("ptxas", f"cat {tmp_path / 'report.txt'} >&2; touch \"$5\""),
                     ("cuobjdump", f"test -f \"$2\" && cat {tmp_path / 'sass.txt'}")):
    (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / name).chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
  (tmp_path / "dump").mkdir()
  (tmp_path / "dump" / "module_0001.jit_f.ptx").write_text(".target sm_90a\n.visible .entry cqjax_lut_matmul__1(\n")
  (row,) = cog.dumped_kernels(str(tmp_path / "dump"))
  assert row["kernel"] == "cqjax_lut_matmul__1" and row["registers"] == 255
  assert row["loop_instructions"] == 3 and row["loop_opcodes"] == {"PRMT": 1, "FFMA": 1, "BRA": 1}


def test_a_loaded_library_drops_every_wrapper_s_cached_availability(tmp_path, monkeypatch):
  """use_cuda_library makes each CUDA wrapper ask the library again, the bit-plane kernel's too (the
  dispatcher's W4A4 fusion), so a compile-only step takes the kernels it would on the GPU."""
  from cuda_kernels import expert_slots, lut_matmul, lut_matmul_bitplane, lut_matmul_int8  # pylint: disable=g-import-not-at-top
  modules = (lut_matmul, lut_matmul_int8, lut_matmul_bitplane, expert_slots)
  for module in modules:
    module.available()  # cached: False without a GPU
  (tmp_path / "lib.so").write_bytes(b"")
  monkeypatch.setattr(lut_matmul, "library", lut_matmul.library)  # restored after the test
  monkeypatch.setattr(cog.ctypes.cdll, "LoadLibrary", lambda path: object())
  cog.use_cuda_library(str(tmp_path / "lib.so"))
  assert [m.available.cache_info().currsize for m in modules] == [0] * len(modules)
