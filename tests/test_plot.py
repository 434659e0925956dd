"""plot_training: one panel per quantity (a KL of 0.07 is not flattened by a CE of 9), validation
metrics for every kind of job, a legend that covers no curve; read from a log the real writer made."""
import numpy as np
import pytest

from sitra.evaluate import training_figure
from sitra.recipes import plot_training
from sitra.results import RunLog, read_log

STEPS = np.arange(1, 21)


def classifier_log(path):
    """A distill_classifier-shaped log: CE ~9 and a forward-KL term ~0.07 per step; validation
    accuracy, macro-F1, CE and the selection error every 5 steps (and at the start)."""
    rng = np.random.default_rng(0)
    with RunLog(path, "distill_classifier", "cls", {"seed": 0}) as log:
        for s in STEPS:
            ce, kl = 9.0 - 0.2 * s + rng.normal(0, 0.05), 0.07 + 0.01 * np.sin(s) - 0.001 * s
            log.train(int(s), loss=0.5 * ce + 0.5 * kl, ce=ce, forward_kl=kl, lr=1e-4, grad_norm=1.0 + s,
                      tokens_per_s=1e4)
            if s % 5 == 0 or s == 1:
                log.eval(int(s) - (s == 1), accuracy=0.5 + 0.02 * s, macro_f1=0.4 + 0.02 * s, ce=9.5 - 0.2 * s,
                         selection_error=0.5 - 0.02 * s)
        log.complete({"student/validation_accuracy": 0.9})
    return read_log(path)


def panels(fig) -> dict:
    """{panel title: {line label: (x, y)}} of a figure's axes."""
    return {ax.get_title(loc="left"): {line.get_label(): (line.get_xdata(), line.get_ydata()) for line in ax.get_lines()}
            for ax in fig.axes}


def test_each_quantity_has_its_own_axes_and_validation_is_shown(tmp_path):
    log = classifier_log(tmp_path / "cls.h5")
    fig, quantities = training_figure(log)
    drawn = panels(fig)
    assert list(drawn) == quantities == ["loss", "ce", "forward_kl", "accuracy", "macro_f1"]
    # the KD term on its own axis, whose range is the KL's own: not a flat line under a CE of 9
    kl_axis = fig.axes[quantities.index("forward_kl")]
    low, high = kl_axis.get_ylim()
    kl = log["train"]["forward_kl"]
    assert high < 0.2 and (kl.max() - kl.min()) / (high - low) > 0.5
    assert list(drawn["forward_kl"]) == ["train"]
    np.testing.assert_array_equal(drawn["forward_kl"]["train"][1], kl)
    # validation metrics: accuracy, macro-F1, and the validation CE beside the training CE
    for quantity in ("accuracy", "macro_f1"):
        x, y = drawn[quantity]["validation"]
        np.testing.assert_array_equal(x, log["eval"]["step"])
        np.testing.assert_array_equal(y, log["eval"][quantity])
    assert set(drawn["ce"]) == {"train", "validation"}
    np.testing.assert_array_equal(drawn["ce"]["train"][1], log["train"]["ce"])
    assert not {"lr", "grad_norm", "tokens_per_s", "selection_error"} & set(drawn)  # bookkeeping, not curves


def test_the_legend_covers_no_curve(tmp_path):
    fig, _ = training_figure(classifier_log(tmp_path / "cls.h5"))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend, area = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert legend.y0 >= area.y1 - 0.5, ax.get_title(loc="left")  # above the plotting area, not inside it


def test_eval_only_names_pair_with_training_names_and_perplexity(tmp_path):
    # a distill_geneformer-shaped log: eval_kl / eval_ce pair with kl / ce; exp(ce) with the perplexity
    with RunLog(tmp_path / "g.h5", "distill_geneformer", "g", {}) as log:
        for s in (1, 2, 3):
            log.train(s, loss=3.0 / s, kl=0.05 / s, ce=2.0 / s, mlm_accuracy=0.1 * s, distinct_shapes=2)
        log.eval(3, eval_loss=1.2, eval_kl=0.02, eval_ce=0.9, mlm_accuracy=0.3, perplexity=2.5)
        log.complete({})
    log = read_log(tmp_path / "g.h5")
    fig, quantities = training_figure(log)
    drawn = panels(fig)
    assert quantities == ["loss", "ce", "kl", "mlm_accuracy", "perplexity"]
    assert all(set(drawn[q]) == {"train", "validation"} for q in quantities)
    np.testing.assert_allclose(drawn["perplexity"]["train"][1], np.exp(log["train"]["ce"]))
    assert drawn["kl"]["validation"][1].tolist() == [0.02]


def test_the_job_writes_the_png_and_names_its_panels(tmp_path, capsys):
    classifier_log(tmp_path / "cls.h5")
    out = plot_training.run(plot_training.PlotTrainingArgs(log=str(tmp_path / "cls.h5")))
    assert out == tmp_path / "cls.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    said = capsys.readouterr().out
    assert "loss, accuracy curves of cls" in said and "a panel each: loss, ce, forward_kl, accuracy, macro_f1" in said
    with RunLog(tmp_path / "empty.h5", "x", "empty", {}) as log:
        log.complete({})
    with pytest.raises(Exception, match="holds no training or evaluation curves"):
        plot_training.run(plot_training.PlotTrainingArgs(log=str(tmp_path / "empty.h5")))
