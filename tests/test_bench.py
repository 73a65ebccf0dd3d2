"""nexlab.analysis.bench: llama-bench / llama-batched-bench records, the memory-bandwidth copy, the stock Q4_K_M.

Timings are never checked against targets (machines are noisy): the tests check that the tools ran
what was asked (test sizes, stream counts, threads), that nexlab copied their fields faithfully
(each printed rate equals the token count over the printed time, within the printing's rounding),
the bookkeeping every record carries, the JSON round trip of the CLI and one-line errors on bad
input. The stock file is checked against llama.cpp itself (it loads and runs; its expert bytes equal
llama-quantize's Q4_K_M of a BF16 file holding the dequantized NVFP4 values, which gguf-py checks)
and its types against nexlab.model.mixes's independent reading of llama-quantize's mix.
"""

from __future__ import annotations

import json
import math
import subprocess

import gguf
import numpy as np
import pytest

import nexlab
from nexlab.analysis import bench as B
from nexlab.cli import main
from nexlab.core import text as core_text
from nexlab.llamacpp.build import tool_path
from nexlab.model import mixes as QZ

PP, TG, REPS, PARALLEL = 32, 8, 2, (1, 2)
COMMON = ("tool", "variant", "file", "file_bytes", "expert_types", "threads", "device", "llama_cpp",
          "nexlab_version", "command")


@pytest.fixture(scope="module")
def records(nexlab_gguf):
    return B.run_bench([nexlab_gguf("nvfp4")], pp=PP, tg=TG, reps=REPS, parallel=PARALLEL, npl_pp=PP, npl_tg=TG,
                       threads=1, labels=["tiny NVFP4-BF16"], show_progress=False)


@pytest.fixture(scope="module")
def stock(nexlab_gguf, tmp_path_factory):
    return B.make_stock_q4_k_m(nexlab_gguf("nvfp4"), tmp_path_factory.mktemp("stock") / "stock-Q4_K_M.gguf",
                               threads=2, show_progress=False)


def _within_print_rounding(printed_rate: float, tokens: int, printed_seconds: float) -> bool:
    """batched-bench prints seconds and rates with %f (6 decimals) from float32 arithmetic: the rate it
    printed equals tokens / seconds up to the 5e-7 s rounding of the seconds and float32 error."""
    expected = tokens / printed_seconds
    bound = expected * (5e-7 / (printed_seconds - 5e-7) + 1e-6) + 1e-6
    return abs(printed_rate - expected) <= bound


# ----------------------------------------------------------------------------- llama-bench records
def test_llama_bench_records_are_the_tests_asked(records, nexlab_gguf):
    lb = [r for r in records if r["tool"] == "llama-bench"]
    assert [(r["test"], r["n_prompt"], r["n_gen"]) for r in lb] == [(f"pp{PP}", PP, 0), (f"tg{TG}", 0, TG)]
    path = nexlab_gguf("nvfp4")
    for r in lb:
        assert all(k in r for k in COMMON + B.LLAMA_BENCH_FIELDS)
        assert r["variant"] == "tiny NVFP4-BF16" and r["file"] == str(path)
        assert r["file_bytes"] == path.stat().st_size and 0 < r["model_size"] < r["file_bytes"]
        assert r["expert_types"] == {"NVFP4": 24}  # 8 layers x gate/up/down
        assert r["threads"] == r["n_threads"] == 1 and r["reps"] == REPS == len(r["samples_ns"])
        assert r["nexlab_version"] == nexlab.__version__ and r["device"]["backend"] == "cpu"
        assert r["llama_cpp"]["llama_cpp_python"] == "0.3.36" and r["build_commit"]
        assert f"-m {path} -p {PP} -n {TG} -r {REPS} -t 1 " in r["command"] and r["command"].endswith("-o json")
        assert math.isfinite(r["avg_ts"]) and r["avg_ts"] > 0 and math.isfinite(r["stddev_ts"]) and r["stddev_ts"] >= 0


def test_llama_bench_rates_are_tokens_over_its_own_sample_times(records):
    """avg_ts is llama-bench's mean of per-repetition rates (n_prompt + n_gen) / seconds: recomputed
    from its samples_ns, to the 6 significant digits it prints samples_ts with."""
    for r in (r for r in records if r["tool"] == "llama-bench"):
        rates = [1e9 * (r["n_prompt"] + r["n_gen"]) / ns for ns in r["samples_ns"]]
        np.testing.assert_allclose(r["samples_ts"], rates, rtol=1e-5)
        np.testing.assert_allclose(r["avg_ts"], np.mean(rates), rtol=1e-5)
        np.testing.assert_allclose(r["avg_ns"], np.mean(r["samples_ns"]), rtol=1e-9, atol=1)


# ----------------------------------------------------------------------------- llama-batched-bench records
def test_batched_bench_has_one_row_per_stream_count(records):
    bb = [r for r in records if r["tool"] == "llama-batched-bench"]
    assert [r["pl"] for r in bb] == list(PARALLEL)
    for r in bb:
        assert all(k in r for k in COMMON + B.BATCHED_BENCH_FIELDS)
        assert (r["pp"], r["tg"], r["n_threads"], r["threads"]) == (PP, TG, 1, 1)
        assert r["n_kv"] == r["pl"] * (PP + TG)
        assert r["ctx"] == max(PARALLEL) * (PP + TG) == B.batched_ctx(PARALLEL, PP, TG) <= r["n_kv_max"]
        assert f"-c {r['ctx']} " in r["command"] and "-npl 1,2 " in r["command"]
        assert 1 <= r["runs"] <= B.BATCHED_ATTEMPTS
        for k in ("t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed"):
            assert math.isfinite(r[k]) and r[k] > 0, k


def _losing_rows(monkeypatch, lost_runs: int):
    """Wrap the real tool runner so that the first ``lost_runs`` runs lose their last JSONL row, as
    llama.cpp's unflushed logger sometimes does (see nexlab.analysis.bench); return the -npl of every run."""
    real, npls = B._run_tool, []

    def run(cmd, file):
        out = real(cmd, file)
        npls.append(cmd[cmd.index("-npl") + 1])
        if len(npls) <= lost_runs:
            lines = out.splitlines()
            rows = [i for i, ln in enumerate(lines) if ln.startswith("{")]
            if rows:  # (under load the real tool may have lost it already: the same case)
                out = "\n".join(lines[:rows[-1]] + lines[rows[-1] + 1:])
        return out

    monkeypatch.setattr(B, "_run_tool", run)
    return npls


def test_batched_bench_reruns_only_the_stream_counts_whose_rows_were_lost(nexlab_gguf, monkeypatch):
    npls = _losing_rows(monkeypatch, 1)
    recs = B.batched_bench(nexlab_gguf("nvfp4"), parallel=(1, 2, 4), npl_pp=8, npl_tg=2, threads=1)
    assert npls == ["1,2,4", "4"]
    assert [(r["pl"], r["runs"]) for r in recs] == [(1, 1), (2, 1), (4, 2)]
    assert all("-npl 1,2,4 " in r["command"] and r["n_kv"] == r["pl"] * 10 for r in recs)


def test_batched_bench_context_holds_the_warm_up(nexlab_gguf):
    """One stream of 4 + 2 tokens needs 6 cells, but batched-bench's 16-token warm-up must fit too."""
    assert B.batched_ctx((1,), 4, 2) == B.BATCHED_WARMUP_TOKENS == 16 and B.batched_ctx((2,), 8, 2) == 20
    (r,) = B.batched_bench(nexlab_gguf("nvfp4"), parallel=(1,), npl_pp=4, npl_tg=2, threads=1)
    assert (r["pl"], r["n_kv"], r["ctx"]) == (1, 6, 16)


def test_batched_bench_row_lost_in_every_run_is_an_error(nexlab_gguf, monkeypatch):
    npls = _losing_rows(monkeypatch, B.BATCHED_ATTEMPTS)
    with pytest.raises(RuntimeError, match=r"no row for 1 streams .* in 3 runs"):
        B.batched_bench(nexlab_gguf("nvfp4"), parallel=(1,), npl_pp=8, npl_tg=2, threads=1)
    assert npls == ["1"] * B.BATCHED_ATTEMPTS


def test_batched_bench_rates_are_stream_tokens_over_its_times(records):
    """S_PP = B*PP/T_PP, S_TG = B*TG/T_TG, S = B*(PP+TG)/T and T = T_PP + T_TG, within the rounding
    of what batched-bench printed: the fields were copied under the right names."""
    for r in (r for r in records if r["tool"] == "llama-batched-bench"):
        b = r["pl"]
        assert _within_print_rounding(r["speed_pp"], b * r["pp"], r["t_pp"])
        assert _within_print_rounding(r["speed_tg"], b * r["tg"], r["t_tg"])
        assert _within_print_rounding(r["speed"], b * (r["pp"] + r["tg"]), r["t"])
        assert abs(r["t"] - (r["t_pp"] + r["t_tg"])) <= 1.5e-6 + 1e-6 * r["t"]


def test_records_round_trip_through_json(records):
    assert json.loads(json.dumps(records)) == records
    rows = B.llama_bench_rows(records) + B.batched_bench_rows(records)
    assert len(rows) == len(records)


def test_each_thread_count_gets_its_own_run(nexlab_gguf):
    recs = B.run_bench(nexlab_gguf("nvfp4"), pp=8, tg=2, reps=1, parallel=None, threads="1,2", show_progress=False)
    assert [(r["threads"], r["n_threads"], r["test"]) for r in recs] == [
        (1, 1, "pp8"), (1, 1, "tg2"), (2, 2, "pp8"), (2, 2, "tg2")]
    assert recs[0]["variant"] == "NVFP4"  # from the file name nexlab-nvfp4.gguf


# ----------------------------------------------------------------------------- CLI
def test_cli_json_output_round_trips(nexlab_gguf, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", str(nexlab_gguf("nvfp4")), "--pp", "16", "--tg", "4", "--reps", "1", "--parallel", "1,2",
               "--npl-pp", "16", "--npl-tg", "4", "-t", "1", "--json", "-o", str(out), "-q"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert [(r["tool"], r.get("test"), r.get("pl")) for r in printed] == [
        ("llama-bench", "pp16", None), ("llama-bench", "tg4", None),
        ("llama-batched-bench", None, 1), ("llama-batched-bench", None, 2)]
    assert {r["variant"] for r in printed} == {"NVFP4"}


def test_cli_prints_tables(nexlab_gguf, capsys):
    assert main(["bench", str(nexlab_gguf("nvfp4")), "--pp", "8", "--tg", "2", "--reps", "1", "--no-batched",
                 "-t", "1", "--label", "tiny", "-q"]) == 0
    out = capsys.readouterr().out
    assert "| variant | size MiB | threads | test | t/s |" in out and "| tiny |" in out and "| pp8 |" in out


@pytest.mark.parametrize("args, words", [
    (["--parallel", "0"], ["--parallel", "'0'"]),
    (["--parallel", "abc"], ["--parallel", "'abc'"]),
    (["--parallel", "1,,2"], ["--parallel"]),
    (["--pp", "-1"], ["--pp", "-1"]),
    (["--reps", "0"], ["--reps"]),
    (["--batch", "0"], ["--batch"]),
    (["--npl-tg", "0"], ["--npl-tg"]),
    (["-t", "0"], ["--threads"]),
    (["--pp", "0", "--tg", "0"], ["--pp", "--tg"]),
    (["--label", "a", "--label", "b"], ["2 labels for 1 files"]),
])
def test_cli_bad_parameters_give_one_line_errors(nexlab_gguf, capsys, args, words):
    assert main(["bench", str(nexlab_gguf("nvfp4")), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nexlab bench: error:") and "\n" not in err
    assert all(w in err for w in words), err


def test_cli_missing_and_truncated_files_are_named(nexlab_gguf, tmp_path, capsys):
    missing = tmp_path / "missing.gguf"
    assert main(["bench", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(missing) in err and "does not exist" in err
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(nexlab_gguf("nvfp4").read_bytes()[: 3_000_000])
    assert main(["bench", str(cut)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(cut) in err and "truncated" in err
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    assert main(["bench", str(text)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(text) in err and "not a GGUF file" in err


def test_a_file_llama_cpp_cannot_run_is_a_one_line_runtime_error(nexlab_gguf, tmp_path):
    """A GGUF gguf-py reads but llama.cpp refuses (no tensors, no architecture): the tool's own error."""
    p = tmp_path / "empty.gguf"
    w = gguf.GGUFWriter(p, arch="qwen35moe")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(RuntimeError, match=r"^llama-bench failed \(exit \d+\) on .*empty\.gguf: ") as e:
        B.llama_bench(p, pp=8, tg=2, reps=1, threads=1)
    assert "\n" not in str(e.value)


def test_parse_int_list():
    assert core_text.parse_int_list("1, 4,8,4", "--parallel") == (1, 4, 8)
    assert core_text.parse_int_list([2, np.int64(3)], "--threads") == (2, 3)
    assert core_text.parse_int_list(5, "--threads") == (5,)
    for bad in ("", "1,", "x", "1.5", [0], [], [True], [1.0]):
        with pytest.raises(ValueError, match="--parallel"):
            core_text.parse_int_list(bad, "--parallel")


@pytest.mark.parametrize("name, label", [("Nex-N2-mini-NVFP4-BF16.gguf", "NVFP4-BF16"),
                                         ("x-nvfp4_q8_0.gguf", "NVFP4-Q8_0"),
                                         ("stock-q4_k_m.gguf", "Q4_K_M"), ("model.Q6_K.gguf", "Q6_K"),
                                         ("nexlab-nvfp4_all.gguf", "nexlab-nvfp4_all"), ("my_model.gguf", "my_model")])
def test_variant_label_from_file_name(name, label):
    assert B.variant_label(name) == label


# ----------------------------------------------------------------------------- bandwidth
def test_measure_bandwidth_reports_copy_and_read_write_rates():
    r = B.measure_bandwidth(nbytes=4 << 20, repeats=3)
    assert r["nbytes"] == 4 << 20 and len(r["seconds"]) == 3 and r["best_seconds"] == min(r["seconds"]) > 0
    for k in ("copy_gb_s", "read_write_gb_s", "roofline_gb_s"):
        assert math.isfinite(r[k]) and r[k] > 0
    assert r["copy_gb_s"] == pytest.approx((4 << 20) / r["best_seconds"] / 1e9)
    assert r["read_write_gb_s"] == pytest.approx(2 * r["copy_gb_s"]) == r["roofline_gb_s"]
    with pytest.raises(ValueError, match="nbytes"):
        B.measure_bandwidth(nbytes=0)


# ----------------------------------------------------------------------------- stock Q4_K_M
def test_stock_has_k_quant_experts_of_llama_quantizes_mix(stock, nexlab_gguf):
    src = gguf.GGUFReader(nexlab_gguf("nvfp4"))
    out = {t.name: t.tensor_type.name for t in gguf.GGUFReader(stock["path"]).tensors}
    assert stock["expert_types"] == {k: v for k, v in out.items() if k.endswith("_exps.weight")}
    assert len(stock["expert_types"]) == 24 and "NVFP4" not in out.values()
    # down experts Q6_K in use_more_bits layers (0, 3, 6, 7 of 8), every other expert Q4_K
    assert {k for k, v in stock["expert_types"].items() if v == "Q6_K"} == {
        f"blk.{i}.ffn_down_exps.weight" for i in (0, 3, 6, 7)}
    assert {v for k, v in stock["expert_types"].items() if "down" not in k} == {"Q4_K"}
    n_layer = int(src.fields["qwen35moe.block_count"].contents())
    n_expert = int(src.fields["qwen35moe.expert_count"].contents())
    plans = QZ.plan_types([(t.name, tuple(int(x) for x in reversed(t.shape)), t.tensor_type.name) for t in src.tensors],
                          "q4_k_m", n_layer, n_expert=n_expert, keep_nvfp4=False)
    assert {p.name: p.ggml_type for p in plans} == out


def test_stock_loads_and_runs_in_llama_cpp(stock):
    recs = B.llama_bench(stock["path"], pp=8, tg=2, reps=1, threads=1)
    assert [r["test"] for r in recs] == ["pp8", "tg2"] and all(r["avg_ts"] > 0 for r in recs)
    assert recs[0]["variant"] == "Q4_K_M" and recs[0]["expert_types"] == {"Q4_K": 20, "Q6_K": 4}
    rows = B.batched_bench(stock["path"], parallel="3,1", npl_pp=8, npl_tg=2, threads=1, label="stock")
    assert [(r["pl"], r["n_kv"], r["ctx"], r["variant"]) for r in rows] == [(3, 30, 30, "stock"), (1, 10, 30, "stock")]
    assert all(r["speed_tg"] > 0 for r in rows)


def test_cli_stock_and_bandwidth(stock, tmp_path, capsys):
    out = tmp_path / "stock.gguf"
    assert main(["stock", stock["source"], "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().out.strip().endswith("routed experts: Q4_K 20, Q6_K 4")
    assert out.read_bytes() == open(stock["path"], "rb").read()  # llama-quantize is deterministic
    assert main(["bandwidth", "--gib", "0.004", "--repeats", "2"]) == 0
    assert "GB/s read+write" in capsys.readouterr().out
    assert main(["bandwidth", "--gib", "0"]) == 1
    assert "--gib" in capsys.readouterr().err


def test_stock_equals_q4_k_m_of_bf16_experts_holding_the_nvfp4_values(stock, nexlab_gguf, tmp_path):
    """Requantizing NVFP4 experts = quantizing BF16 experts whose values are the NVFP4 ones.

    llama-quantize to BF16 first: the BF16 experts equal gguf-py's dequantization of the NVFP4 ones
    exactly (so BF16 holds NVFP4 values losslessly); Q4_K_M of that file is byte-identical to the stock.
    """
    exe, src = str(tool_path("llama-quantize")), nexlab_gguf("nvfp4")
    mid, again = tmp_path / "experts-bf16.gguf", tmp_path / "stock-from-bf16.gguf"
    subprocess.run([exe, "--allow-requantize", str(src), str(mid), "BF16", "2"], check=True, capture_output=True)
    subprocess.run([exe, str(mid), str(again), "Q4_K_M", "2"], check=True, capture_output=True)
    r_src, r_mid = gguf.GGUFReader(src), gguf.GGUFReader(mid)
    mids = {t.name: t for t in r_mid.tensors}
    n_nvfp4 = 0
    for t in r_src.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.NVFP4:
            m = mids[t.name]
            assert m.tensor_type == gguf.GGMLQuantizationType.BF16, t.name
            np.testing.assert_array_equal(gguf.quants.dequantize(m.data, m.tensor_type),
                                          gguf.quants.dequantize(t.data, t.tensor_type), err_msg=t.name)
            n_nvfp4 += 1
    assert n_nvfp4 == 48  # routed and shared experts
    a = {t.name: (t.tensor_type, bytes(t.data)) for t in gguf.GGUFReader(stock["path"]).tensors}
    b = {t.name: (t.tensor_type, bytes(t.data)) for t in gguf.GGUFReader(again).tensors}
    assert a.keys() == b.keys()
    assert [n for n in a if a[n] != b[n]] == []


def test_stock_refuses_inputs_already_quantized(stock, tmp_path):
    out = tmp_path / "twice.gguf"
    with pytest.raises(ValueError, match=r"tensor \S+ is already Q\d_K"):
        B.make_stock_q4_k_m(stock["path"], out)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="imatrix"):
        B.make_stock_q4_k_m(stock["source"], out, imatrix=tmp_path / "none.gguf")
    with pytest.raises(ValueError, match="is the input"):
        B.make_stock_q4_k_m(stock["source"], stock["source"])
