"""overfit_report on logged numbers: which curves it flags, and what it says."""

from __future__ import annotations

from sdnb.sd import overfit_report


def rows(train: list[float], val: list[float], every: int = 10) -> list[dict]:
    """log.csv rows: a training loss every 5 steps, a validation loss every `every` steps from step 0."""
    out = [{"step": 5 * (i + 1), "loss": loss} for i, loss in enumerate(train)]
    out += [{"step": every * i, "val_loss": v} for i, v in enumerate(val)]
    return sorted(out, key=lambda r: r["step"])


def test_validation_worse_than_before_fine_tuning_is_flagged_even_when_the_training_loss_is_flat(tmp_path):
    report = overfit_report(tmp_path, 3, rows([0.10, 0.10, 0.20, 0.10, 0.06, 0.07, 0.15, 0.10],
                                              [0.14, 0.18, 0.21, 0.20, 0.21]))
    assert report.overfitting and report.best_step == 0 and report.evaluations_since_best == 4
    assert "above its value before fine-tuning for 4 evaluations" in str(report)


def test_a_validation_loss_that_falls_first_is_judged_by_the_training_loss(tmp_path):
    falling_train = overfit_report(tmp_path, 3, rows([0.3, 0.25, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05],
                                                     [0.3, 0.2, 0.25, 0.27, 0.3]))
    flat_train = overfit_report(tmp_path, 3, rows([0.1, 0.1, 0.1, 0.1, 0.12, 0.12, 0.12, 0.12],
                                                  [0.3, 0.2, 0.25, 0.27, 0.3]))
    still_improving = overfit_report(tmp_path, 3, rows([0.3, 0.25, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05],
                                                       [0.3, 0.25, 0.2, 0.18, 0.15]))
    assert falling_train.overfitting and falling_train.best_step == 10 and "while the training loss fell" in str(falling_train)
    assert not flat_train.overfitting and not still_improving.overfitting
