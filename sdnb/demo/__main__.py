"""`python -m sdnb.demo --out runs/demo`: the four notebooks on the embedded default (see `sdnb.demo.run`)."""

from sdnb.demo.run import main

main()
