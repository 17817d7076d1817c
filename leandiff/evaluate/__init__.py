"""Evaluation: the per-dataset feature network, reference statistics, quality metrics, the eval
harness (one row per checkpoint × solver × NFE × runtime), the cost bench and the HTML report.

Public API::

    load_classifier(dataset_or_dir) -> Classifier
    reference_stats(classifier, dataset=None, data_dir=None, split="test") -> ReferenceStats
    evaluate_checkpoint(ckpt, EvalConfig(...), grid_path=None) -> dict   # one results row
    write_report(rows, out_dir) -> Path                                   # index.html
"""
from .classifier import Classifier, ClassifierConfig, embed, load_classifier, save_classifier, train_classifier
from .harness import EvalConfig, evaluate_checkpoint
from .protocol import append_row, markdown_header, markdown_row, read_rows
from .quality import METRICS
from .metrics import (FeatureAccumulator, KIDConfig, confidence, denoising_mse, fid, frechet_distance,
                      inception_score, kid, label_spread, precision_recall)
from .reference import ReferenceStats, compute_reference_stats, reference_stats

__all__ = ["Classifier", "ClassifierConfig", "EvalConfig", "FeatureAccumulator", "KIDConfig", "METRICS", "ReferenceStats",
           "append_row", "compute_reference_stats", "confidence", "denoising_mse", "embed", "evaluate_checkpoint",
           "fid", "frechet_distance", "inception_score", "kid", "label_spread", "load_classifier", "markdown_header",
           "markdown_row", "precision_recall", "read_rows", "reference_stats", "save_classifier", "train_classifier",
           "write_report"]


def __getattr__(name):  # the report pulls in matplotlib: import it only when asked for
    if name == "write_report":
        from .report import write_report
        return write_report
    raise AttributeError(name)
