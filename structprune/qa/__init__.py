"""SQuAD 2.0 question answering: data loading, features, post-processing, the official metric,
evaluation and a resumable fine-tuning loop.

Typical use::

    from structprune.qa import load_squad, evaluate_qa, train_qa
    train = load_squad("train-v2.0.json"); dev = load_squad("dev-v2.0.json")
    train_qa(model, tokenizer, train, "runs/teacher", epochs=2, lr=5e-5, batch_size=32,
             max_length=384, doc_stride=128, warmup_ratio=0.1, weight_decay=0.01, seed=42)
    metrics, predictions = evaluate_qa(model, tokenizer, dev)

Needs the ``qa`` extra (``datasets``); importing :mod:`structprune` itself does not.
"""
from structprune.qa.data import load_squad, squad_json_to_records
from structprune.qa.evaluate import evaluate_qa, predict_logits
from structprune.qa.features import (
    build_eval_features,
    build_train_features,
    collate,
    prepare_eval_features,
    prepare_train_features,
)
from structprune.qa.metric import compute_exact, compute_f1, normalize_answer, references_from, squad_v2_metric
from structprune.qa.postprocess import postprocess_qa_predictions
from structprune.qa.checkpoints import checkpoint_state, load_checkpoint_weights
from structprune.qa.train import default_param_groups, train_qa

__all__ = [
    "build_eval_features",
    "build_train_features",
    "checkpoint_state",
    "collate",
    "compute_exact",
    "compute_f1",
    "default_param_groups",
    "evaluate_qa",
    "load_checkpoint_weights",
    "load_squad",
    "normalize_answer",
    "postprocess_qa_predictions",
    "predict_logits",
    "prepare_eval_features",
    "prepare_train_features",
    "references_from",
    "squad_json_to_records",
    "squad_v2_metric",
    "train_qa",
]
