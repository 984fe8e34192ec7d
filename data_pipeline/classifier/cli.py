"""`hibari corpus classifier train | eval | train-from-sources`."""

from __future__ import annotations

import json

from data_pipeline.readers import add_input_arguments


def register(subparsers) -> None:
    """Add `classifier` (with its sub-commands) to the `hibari corpus` sub-parsers."""
    parser = subparsers.add_parser("classifier", help="train / evaluate the document quality classifier")
    sub = parser.add_subparsers(dest="classifier_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    train = sub.add_parser("train", help="labelled documents -> model dir; prints held-out accuracy, F1, ROC AUC")
    add_input_arguments(train)  # --input (JSONL/txt/parquet/arrow/saved datasets), --text-key, --text-format, --split
    train.add_argument("--label-key", default="label", help="field holding each document's class (default label)")
    train.add_argument("--positive", default=None,
                       help="label value of the wanted class (default: 'good', with exactly two classes)")
    _add_common(train)
    train.set_defaults(func=_train)

    sources = sub.add_parser("train-from-sources",
                             help="positive = curated text (e.g. Wikipedia), negative = random cleaned web text")
    sources.add_argument("--positive", required=True, nargs="+", action="extend", metavar="PATH",
                         help="documents of the positive class (any input format of --input elsewhere)")
    sources.add_argument("--negative", required=True, nargs="+", action="extend", metavar="PATH",
                         help="documents of the negative class")
    add_input_arguments(sources, input=False)  # --text-key, --text-format, --split
    sources.add_argument("--max-per-class", type=int, default=None,
                         help="keep a seeded random sample of at most this many documents per class")
    _add_common(sources)
    sources.set_defaults(func=_train_from_sources)

    evaluate = sub.add_parser("eval", help="accuracy, F1 and ROC AUC of a model on labelled documents")
    evaluate.add_argument("--model", required=True, help="model dir written by `classifier train`")
    add_input_arguments(evaluate)  # --input, --text-key, --text-format, --split
    evaluate.add_argument("--label-key", default="label")
    evaluate.add_argument("--positive", default=None, help="positive label value (default: the model's)")
    evaluate.add_argument("--threshold", type=float, default=0.5, help="score at or above which a doc is positive")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    evaluate.set_defaults(func=_eval)


def _add_common(parser) -> None:
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--holdout", type=float, default=0.2, help="held-out fraction for the report (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="split and sampling seed (default 0)")
    parser.add_argument("--min-n", type=int, default=1, help="shortest character n-gram (default 1)")
    parser.add_argument("--max-n", type=int, default=3, help="longest character n-gram (default 3)")
    parser.add_argument("--bucket-bits", type=int, default=18, help="2**bits hashed n-gram buckets (default 18)")
    parser.add_argument("--no-fold-width", action="store_true",
                        help="keep full-/half-width variants apart (default: fold them to one character)")
    parser.add_argument("--lowercase", action="store_true", help="also fold ASCII letters to lower case")
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--l2", type=float, default=1e-4, help="L2 penalty on the mean log loss")
    parser.add_argument("--no-balance", action="store_true",
                        help="weight documents equally (default: each class is half of the loss)")
    parser.add_argument("--quiet", action="store_true")


def _configs(args):
    from data_pipeline.classifier.features import FeatureConfig
    from data_pipeline.classifier.model import TrainConfig
    from hibari.errors import HibariError

    try:
        features = FeatureConfig(args.min_n, args.max_n, args.bucket_bits, not args.no_fold_width,
                                 args.lowercase)
    except ValueError as err:
        raise HibariError(f"--min-n/--max-n/--bucket-bits: {err}") from None
    if args.epochs < 1 or args.learning_rate <= 0 or args.l2 < 0:
        raise HibariError("--epochs >= 1, --learning-rate > 0 and --l2 >= 0 expected")
    return features, TrainConfig(args.epochs, args.learning_rate, args.l2, not args.no_balance)


def _print_report(report: dict, out: str) -> None:
    h = report["heldout"]
    skipped = report.get("source", {}).get("skipped_no_text", 0)
    print(f"classifier: {report['training_documents']:,} training / {report['heldout_documents']:,} held-out "
          f"documents -> {out}" + (f" ({skipped:,} records without text skipped)" if skipped else ""))
    print(f"held-out: accuracy {h['accuracy']:.4f}  F1 {h['f1']:.4f}  ROC AUC {h['roc_auc']:.4f}  "
          f"(precision {h['precision']:.4f}, recall {h['recall']:.4f}, positives {h['positives']})")


def _train(args) -> int:
    from data_pipeline.classifier.train import read_labelled, train_classifier

    features, train = _configs(args)
    texts, labels, positive, negative, skipped = read_labelled(args.input, args.label_key, args.positive,
                                                               args.text_key, args.split, args.text_format)
    report = train_classifier(texts, labels, args.out, positive, negative, features, train, args.holdout,
                              args.seed, show_progress=not args.quiet,
                              source={"inputs": list(args.input), "skipped_no_text": skipped})
    _print_report(report, args.out)
    return 0


def _train_from_sources(args) -> int:
    from data_pipeline.classifier.train import train_from_sources
    from hibari.errors import HibariError

    if args.max_per_class is not None and args.max_per_class < 1:
        raise HibariError(f"--max-per-class {args.max_per_class}: expected a positive number")
    features, train = _configs(args)
    report = train_from_sources(args.positive, args.negative, args.out, args.text_key, args.max_per_class,
                                args.split, args.text_format, features=features, train=train,
                                holdout=args.holdout, seed=args.seed, show_progress=not args.quiet)
    _print_report(report, args.out)
    return 0


def _eval(args) -> int:
    from data_pipeline.classifier.train import evaluate

    metrics = evaluate(args.model, args.input, args.label_key, args.positive, args.text_key, args.threshold,
                       args.split, args.text_format)
    if args.json:
        print(json.dumps(metrics))
        return 0
    skipped = metrics["skipped_no_text"]
    print(f"{metrics['documents']:,} documents ({metrics['positives']:,} {metrics['positive_label']}): "
          f"accuracy {metrics['accuracy']:.4f}  F1 {metrics['f1']:.4f}  ROC AUC {metrics['roc_auc']:.4f}  "
          f"(threshold {metrics['threshold']:g})" + (f"; {skipped:,} records without text skipped" if skipped else ""))
    return 0
