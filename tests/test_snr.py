import numpy as np
import pytest

from pvq.cli import main
from pvq.codec.counts import pulses_for_bits
from pvq.eval.snr import ROW_LENGTH, pvq_quantize_rows, run_snr_experiment, snr_db


def test_pvq_rows_reconstruction_quality():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((8, ROW_LENGTH))
    K = pulses_for_bits(32, 3.0)
    fp16 = pvq_quantize_rows(rows, 32, K, gain="fp16")
    beta = pvq_quantize_rows(rows, 32, K, gain="beta", gain_bits=6)
    # ~3 bits of shape in 32 dims gives ~16.7 dB of shape SNR; gains cost a little.
    assert 15.5 < snr_db(rows, fp16) < 18.06
    assert 15.0 < snr_db(rows, beta) < snr_db(rows, fp16) + 0.1
    with pytest.raises(ValueError, match="gain storage"):
        pvq_quantize_rows(rows, 32, K, gain="fp8")


def test_snr_experiment_below_shannon_and_monotone(tmp_path):
    png, csv = tmp_path / "snr.png", tmp_path / "snr.csv"
    points = run_snr_experiment(samples=16, dimensions=[16, 64], out_png=str(png), out_csv=str(csv), quick=True)
    assert png.stat().st_size > 10_000 and csv.read_text().startswith("method,")
    for p in points:
        assert p.snr_db < 6.0206 * p.bits_per_value, p  # nothing beats rate-distortion
    for method in {p.method for p in points}:
        curve = sorted((p.bits_per_value, p.snr_db) for p in points if p.method == method)
        assert all(b[1] > a[1] for a, b in zip(curve, curve[1:])), method
    methods = {p.method for p in points}
    assert {"PVQ D=16", "PVQ D=64", "PVQ D=16 Beta5", "E8", "RTN", "Lloyd-Max"} <= methods


def test_cli_snr_prints_table(tmp_path, capsys):
    png = tmp_path / "fig.png"
    assert main(["snr", "--quick", "--samples", "8", "--dims", "32", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| method | setting | bits/value | SNR dB |" in out and "Shannon bound" in out
    assert png.exists()


def test_cli_snr_rejects_bad_group(tmp_path):
    with pytest.raises(ValueError, match="divide"):
        main(["snr", "--quick", "--samples", "8", "--dims", "48", "--plot", str(tmp_path / "x.png")])
