import pandas as pd
import pytest
import torch

from heretic_like.cli import main
from heretic_like.report import plot_residuals, project_2d
from tests.conftest import study_config


def test_report_from_a_study(tiny_llama, tmp_path, capsys):
    config = study_config(tmp_path, tiny_llama, n_trials=3)
    assert main(["--config", str(config)]) == 0
    (journal,) = (tmp_path / "checkpoints").glob("*.journal")
    out = tmp_path / "report"
    assert main(["report", "--study", str(journal), "--out", str(out), "--trial", "0", "--residuals"]) == 0
    table = pd.read_csv(out / "trials.csv")
    assert list(table["trial"]) == [0, 1, 2]
    assert {"state", "kl_divergence", "refusals", "attn.o_proj.max_weight"} <= set(table.columns)
    for name in ("pareto.png", "kernels_trial0.png", "residuals.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", "--study", str(journal), "--out", str(out), "--trial", "7"]) == 2
    assert "trial 7 is not a completed trial" in capsys.readouterr().err


def test_pca_projection_separates_planted_clusters(tmp_path):
    g = torch.Generator().manual_seed(0)
    harmless = torch.randn(40, 2, 16, generator=g)
    harmful = torch.randn(40, 2, 16, generator=g)
    harmful[:, :, 3] += 10.0
    bad, good, method = project_2d(harmful[:, 0], harmless[:, 0])
    if method == "PCA":  # first component is the planted axis: the groups split along it
        assert (bad[:, 0].mean() - good[:, 0].mean()).abs() > 8
    assert plot_residuals(harmful, harmless, tmp_path / "r.png", "t") in ("PCA", "PaCMAP")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_summary_block_says_what_was_chosen_measured_and_written(tmp_path):
    import pandas as pd

    from heretic_like.summary import RunSummary, summary_block

    capability = pd.DataFrame({"metric": ["multiple choice"], "base": [0.5], "edited": [0.48], "delta": [-0.02]})
    full = summary_block(RunSummary(7, "the knee", 2, 64, 20, 0.0171, {"refusals_long": 3, "length": 256},
                                    capability, tmp_path / "out", "checkpoints/x.journal",
                                    {"load": 3.04, "trials": 1800.2}, exported_kl=0.0189))  # fmt: skip
    assert "Chosen trial 7: the knee" in full and "2/64 in the study's short responses (unedited model: 20/64)" in full
    assert "3/64 with 256-token responses" in full and "multiple choice -0.020" in full and "0.0171" in full
    assert "time       load 3 s, trials 1800 s" in full and "0.0189 with the exported weights" in full
    assert f"evaluate --compare {tmp_path / 'out'}" in full and "chat --study checkpoints/x.journal --trial 7" in full
    bare = summary_block(RunSummary(7, "r", 2, 64, 20, 0.01, None, None, None, "s.journal"))
    assert "256-token" not in bare and "capability" not in bare and "evaluate --compare" not in bare
    assert "exported weights" not in bare


def test_kl_axis_is_readable_within_one_decade_and_across_several():
    """A 12-trial study spans KL 0.018-0.06: a log axis there shows no major tick at all. Every
    range must get at least three labelled ticks inside the data."""
    import matplotlib.pyplot as plt

    from heretic_like.report import _kl_axis

    for kl, scale in (([0.018, 0.025, 0.06], "linear"), ([0.004, 0.03, 0.5], "log"), ([0.0, 0.01, 0.4], "symlog")):
        fig, ax = plt.subplots()
        ax.scatter(kl, range(len(kl)))
        _kl_axis(ax, kl)
        fig.canvas.draw()
        lo, hi = ax.get_xlim()
        labelled = [t for t in ax.xaxis.get_major_ticks() if lo <= t.get_loc() <= hi and t.label1.get_text()]
        assert ax.get_xscale() == scale and len(labelled) >= 3, (kl, [t.label1.get_text() for t in labelled])
        plt.close(fig)


def test_residual_plot_takes_heretics_labels_colours_and_style(tmp_path):
    from heretic_like.config import load_settings
    from heretic_like.errors import HereticError
    from heretic_like.report import ResidualPlotStyle

    settings = load_settings(None, {"residual_plot_style": "dark_background",
                                    "bad_prompts": {"residual_plot_label": "bad ones", "residual_plot_color": "red"}})
    style = ResidualPlotStyle.from_settings(settings)
    assert style.harmful == ("bad ones", "red") and style.harmless == ("harmless", "royalblue")
    style.check()
    harmful, harmless = torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    plot_residuals(harmful, harmless, tmp_path / "r.png", "t", style)
    assert (tmp_path / "r.png").stat().st_size > 1000
    with pytest.raises(HereticError, match="residual_plot_style: 'nope' is not a matplotlib style"):
        ResidualPlotStyle.from_settings(load_settings(None, {"residual_plot_style": "nope"})).check()
    with pytest.raises(HereticError, match="good_prompts.residual_plot_color: 'blurple'"):
        colour = {"good_prompts": {"residual_plot_color": "blurple"}}
        ResidualPlotStyle.from_settings(load_settings(None, colour)).check()
