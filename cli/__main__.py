"""`python -m cli`: the same as the `w2sctl` entry point."""

from cli.main import main

main()
