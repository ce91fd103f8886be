"""Reports on a study: a trials table, the trade-off plot, a trial's kernels, residual projections.

Everything is drawn from what the study stored; only the residual plots need the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from .ablation import Edit  # noqa: E402
from .config import Settings  # noqa: E402
from .directions import RefusalGeometry, collect_residuals, cross_layer_cosine  # noqa: E402
from .errors import HereticError  # noqa: E402
from .records import TRIAL_VALUES, StudyRecord, response_prefix_of, trial_edit  # noqa: E402
from .results import ExportRule, choose_best, pareto_front, trials_table  # noqa: E402


def all_trials_table(study: optuna.Study) -> pd.DataFrame:
    """Every trial, whatever its state, with its scores, timings and sampled parameters."""
    rows = []
    for t in StudyRecord(study).trials(states=None):
        row = {"trial": t.number, "state": t.state.name}
        row.update({key: t.attr(key) for key in TRIAL_VALUES})
        row.update(t.params)
        rows.append(row)
    return pd.DataFrame(rows)


def _kl_axis(ax, kl: list[float]) -> None:
    """An x axis on which the KL values can be read. Within one decade (the usual case: a 12-trial
    study spans KL 0.018-0.06) a log axis has no major tick at all, so it stays linear; wider,
    it is logarithmic with ticks at 1, 2 and 5 of each decade, labelled as plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    positive = [v for v in kl if v > 0]
    if not positive or max(positive) / min(positive) < 10:
        ax.set_xlim(left=0)
        return
    if len(positive) < len(kl):  # a trial with KL 0 (no edit) sits at 0 on a symmetric-log axis
        ax.set_xscale("symlog", linthresh=min(positive) / 2)
    else:
        ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def plot_pareto(study: optuna.Study, chosen: int | None, path: Path) -> None:
    table = trials_table(study)
    front = pareto_front(table)
    record = StudyRecord(study)
    base = record.base_refusals
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(table["kl_divergence"], table["refusals"], s=18, c="0.6", label="trial")
    pruned = [t for t in record.trials((optuna.trial.TrialState.PRUNED,)) if t.refusals_at_least is not None]
    if pruned:
        ax.scatter([t.kl_divergence for t in pruned], [t.refusals_at_least for t in pruned],
                   s=18, facecolors="none", edgecolors="0.6", label="pruned (refusals ≥)")  # fmt: skip
    ax.step(front["kl_divergence"], front["refusals"], where="post", c="tab:blue", lw=1.2)
    ax.scatter(front["kl_divergence"], front["refusals"], s=28, c="tab:blue", label="Pareto front")
    if chosen is not None and chosen in set(table["trial"]):
        row = table[table["trial"] == chosen].iloc[0]
        ax.scatter([row["kl_divergence"]], [row["refusals"]], marker="*", s=220, c="tab:red", zorder=5,
                   label=f"chosen: trial {chosen}")  # fmt: skip
    if base is not None:
        ax.axhline(base, ls="--", c="0.4", lw=0.8, label=f"unedited ({base})")
    _kl_axis(ax, [*table["kl_divergence"], *(t.kl_divergence for t in pruned)])
    ax.set_xlabel("KL divergence from the original (first response token)")
    ax.set_ylabel(f"refusals / {record.n_harmful_eval or '?'}")
    ax.set_title(f"Study '{study.study_name}': {len(table)} trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kernels(edit: Edit, num_layers: int, number: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, kernel in edit.named_kernels().items():
        style = dict(marker="o", label=name) if name in edit.kernels else \
            dict(marker="s", ls="--", label="second peak (each layer's own direction)")  # fmt: skip
        ax.plot(range(num_layers), kernel.weights(num_layers).numpy(), ms=3, **style)
    index = "each layer's own" if edit.direction_index is None else f"layer {edit.direction_index:.4g}"
    if edit.direction_index is not None:
        ax.axvline(edit.direction_index, ls=":", c="0.3", label="the direction's layer")
    ax.set_xlabel("layer")
    ax.set_ylabel("ablation weight w")
    ax.set_title(f"Trial {number}: per-layer edit strength (direction: {index})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layer_metrics(geometry: RefusalGeometry, path: Path, title: str,
                       window: tuple[float, float] = (0.0, 1.0)) -> None:  # fmt: skip
    """Left: SNR, cosine dissimilarity and quality per layer, each on its own scale (quality is
    ~100x smaller than SNR: on a shared axis it is a flat line at zero), the searched window
    shaded and its best layer marked; right: the cosine between every pair of layers' directions."""
    table = geometry.metrics()
    fig = plt.figure(figsize=(12, 6))
    grid = fig.add_gridspec(3, 2, width_ratios=[1.4, 1], hspace=0.15)
    best, last = geometry.best_layer(window), max(geometry.num_layers - 1, 1)
    panels = [("snr", "SNR", "|r| / max(|mu_harmful|, |mu_harmless|)", "tab:blue"),
              ("dissimilarity", "1 - cos", "1 - cos(mu_harmful, mu_harmless)", "tab:orange"),
              ("quality", "quality", "SNR x (1 - cos): picks the best layer", "tab:green")]  # fmt: skip
    values = {"snr": table["snr"], "dissimilarity": 1 - table["cosine"], "quality": table["quality"]}
    axes = []
    for row, (key, label, meaning, colour) in enumerate(panels):
        ax = fig.add_subplot(grid[row, 0], sharex=axes[0] if axes else None)
        ax.plot(table["layer"], values[key], marker="o", ms=3, c=colour, label=meaning)
        if window != (0.0, 1.0):
            ax.axvspan(window[0] * last, window[1] * last, color="0.92",
                       label="search.direction_index window" if row == 2 else None)  # fmt: skip
        ax.axvline(best, ls=":", c="0.3", label=f"best layer ({best})" if row == 2 else None)
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="upper left")
        ax.tick_params(labelbottom=row == 2)
        axes.append(ax)
    axes[0].set_title("Refusal direction quality per layer")
    axes[-1].set_xlabel("layer")
    right = fig.add_subplot(grid[:, 1])
    image = right.imshow(cross_layer_cosine(geometry.directions).numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    right.set_xlabel("layer")
    right.set_ylabel("layer")
    right.set_title("cosine between layers' directions")
    fig.colorbar(image, ax=right, fraction=0.046)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def project_2d(harmful: torch.Tensor, harmless: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """2-D projection of one layer's residuals: PaCMAP when installed, else PCA."""
    both = torch.cat([harmful, harmless]).double()
    try:
        import pacmap

        points = torch.from_numpy(pacmap.PaCMAP(n_components=2).fit_transform(both.numpy()))
        method = "PaCMAP"
    except ImportError:
        centred = both - both.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        points = centred @ v[:2].T
        method = "PCA"
    return points[: len(harmful)], points[len(harmful) :], method


@dataclass(frozen=True)
class ResidualPlotStyle:
    """How residual plots look (Heretic's residual_plot_* keys): labels and colours of the
    harmful and harmless sets, and a matplotlib style sheet."""

    harmful: tuple[str, str] = ("harmful", "darkorange")  # (label, colour)
    harmless: tuple[str, str] = ("harmless", "royalblue")
    sheet: str = "default"

    @classmethod
    def from_settings(cls, settings: Settings) -> ResidualPlotStyle:
        bad, good = settings.bad_prompts, settings.good_prompts
        return cls((bad.residual_plot_label or cls.harmful[0], bad.residual_plot_color or cls.harmful[1]),
                   (good.residual_plot_label or cls.harmless[0], good.residual_plot_color or cls.harmless[1]),
                   settings.residual_plot_style)  # fmt: skip

    def check(self) -> None:
        """Fail with one line before any slow work, not in matplotlib after it."""
        from matplotlib.colors import is_color_like

        if self.sheet != "default" and self.sheet not in plt.style.available:
            raise HereticError(f"residual_plot_style: '{self.sheet}' is not a matplotlib style "
                               f"(e.g. {', '.join(sorted(plt.style.available)[:4])}, ...)")  # fmt: skip
        for key, (_, colour) in (("bad_prompts", self.harmful), ("good_prompts", self.harmless)):
            if not is_color_like(colour):
                raise HereticError(f"{key}.residual_plot_color: '{colour}' is not a matplotlib colour")


def plot_residuals(harmful: torch.Tensor, harmless: torch.Tensor, path: Path, title: str,
                   style: ResidualPlotStyle = ResidualPlotStyle()) -> str:  # fmt: skip
    """One panel per layer: harmful vs harmless residuals (n_prompts, n_layers, d)."""
    layers = harmful.shape[1]
    cols = min(6, layers)
    rows = (layers + cols - 1) // cols
    method = "PCA"
    with plt.style.context(style.sheet):
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
        for layer in range(rows * cols):
            ax = axes[layer // cols][layer % cols]
            ax.set_xticks([])
            ax.set_yticks([])
            if layer >= layers:
                ax.axis("off")
                continue
            bad, good, method = project_2d(harmful[:, layer], harmless[:, layer])
            ax.scatter(good[:, 0], good[:, 1], s=4, c=style.harmless[1], label=style.harmless[0])
            ax.scatter(bad[:, 0], bad[:, 1], s=4, c=style.harmful[1], label=style.harmful[0])
            ax.set_title(f"layer {layer}", fontsize=8)
        axes[0][0].legend(fontsize=6, markerscale=2)
        fig.suptitle(f"{title} ({method})")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return method


def write_residual_plot(settings: Settings, loaded, prompts, response_prefix: str, batch_size: int,
                        path: Path) -> Path:  # fmt: skip
    """Collect the direction prompts' residuals and plot them (report --residuals, plot_residuals)."""
    style = ResidualPlotStyle.from_settings(settings)
    style.check()
    bad = collect_residuals(loaded, prompts.harmful, prompts.system("harmful"), batch_size, "harmful residuals",
                            response_prefix, settings.direction_position)  # fmt: skip
    good = collect_residuals(loaded, prompts.harmless, prompts.system("harmless"), batch_size, "harmless residuals",
                             response_prefix, settings.direction_position)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_residuals(bad, good, path, f"{settings.residual_plot_title}: {settings.model}", style)
    return path


def write_report(study: optuna.Study, settings: Settings, out_dir: str | Path, trial: int | None = None,
                 residuals: bool = False) -> list[Path]:  # fmt: skip
    """Write the report files into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = trials_table(study)
    chosen = trial if trial is not None else choose_best(table, ExportRule.of(settings, study))
    written = [out / "trials.csv", out / "pareto.png"]
    all_trials_table(study).to_csv(written[0], index=False)
    plot_pareto(study, chosen, written[1])
    num_layers = StudyRecord(study).num_layers
    if chosen is not None and num_layers:
        edit, _ = trial_edit(study, chosen)
        written.append(out / f"kernels_trial{chosen}.png")
        plot_kernels(edit, num_layers, chosen, written[-1])
    from .geometry import GeometryOptions, cached_geometry

    geometry = cached_geometry(GeometryOptions.from_settings(settings), num_layers) if num_layers else None
    if geometry is not None:
        written += [out / "layers.csv", out / "layers.png"]
        geometry.metrics().to_csv(written[-2], index=False)
        plot_layer_metrics(geometry, written[-1], f"Layer metrics: {settings.model}", settings.search.layer_window)
    if residuals:
        from .model import load_model
        from .prompts import load_all_prompts

        ResidualPlotStyle.from_settings(settings).check()
        prompts = load_all_prompts(settings)
        loaded = load_model(settings)
        written.append(write_residual_plot(settings, loaded, prompts, response_prefix_of(settings, study),
                                           settings.batch_size or 8, out / "residuals.png"))  # fmt: skip
    return written
