"""`python -m train`: the same as the `mushcam-train` console script."""

from train.cli import main

main()
